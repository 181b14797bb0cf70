"""Resident memory over many decodes, per backend (``jobs/benchmark_data.py --memory``, ``tests/test_decoders.py``).

Each backend runs in a fresh Python process that imports only the decoders (numpy, the decoding
library; torch for torchcodec), so "flat within 5 %" is measured against a decoding process's own
memory, not hidden under a large one. The process decodes ``decodes`` times a good clip, then as many
times a truncated mp4 (its first half: every decode fails), in the process itself (no watchdog: the
backend's own behaviour), and samples its RSS every ``decodes / 20``. Growth is counted after a 10 %
warm-up (allocator pools, codec tables).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from datasets.decoders import get_backend, quiet_native_logs

__all__ = ["MEMORY_CLIP", "MemoryRun", "benchmark_memory", "keep_freed_buffers", "memory_clips", "rss_mib"]

MEMORY_CLIP = "64x64 H.264, 16 frames, 8 decoded; truncated = its first half (every decode fails)"


@dataclass(frozen=True)
class MemoryRun:
    decoder: str
    kind: str  # "good" (a valid clip) or "truncated" (the first half of an mp4: every decode fails)
    decodes: int
    failures: int
    rss_mib: list[float]  # RSS of the decoding process, sampled every decodes / 20
    rss_after_warmup_mib: float  # at 10 % of the decodes
    rss_end_mib: float
    growth_pct: float  # (max after warm-up - after warm-up) / after warm-up
    kib_per_decode: float  # (end - after warm-up) per decode after warm-up
    flat: bool  # growth within 5 %


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_malloc_tuned = False


def keep_freed_buffers(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Make glibc's malloc reuse freed frame and batch buffers instead of unmapping them; once per process.

    Why: a decoded clip (8.7 MiB for 16 frames of 568x320), its resized copy and a float batch (38 MiB
    for four 16x224x224 clips) are each above glibc's ``mmap`` threshold (at most 32 MiB, adaptive), so
    every allocation was a fresh mapping and every page of it a page fault: measured 4,800 faults and
    8.7 ms of kernel time per 16-frame clip, 11 % of the pipeline's CPU. With allocations up to
    ``mmap_threshold`` served from the heap, and up to ``trim_threshold`` of freed heap kept, the same
    pages are reused: 850 faults and 1.5 ms per clip. The cost is that a process keeps its peak heap.

    Called in DataLoader workers, in the decode watchdog's processes and in the benchmark; not in a
    ``num_workers=0`` training process (whose memory is the caller's). ``False`` where malloc is not
    glibc's (musl, macOS): nothing changes there.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD,
                                                                                      trim_threshold))
    return _malloc_tuned


def rss_mib(pid: int | str = "self") -> float:
    """Resident set size of a process in MiB, from ``/proc/<pid>/status``."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/<pid>/status")


def memory_clips() -> tuple[bytes, bytes]:
    """The clips measured: a good one (16 frames of a drifting 8x8-block texture) and its first half."""
    from datasets.encode import encode_video

    blocks = np.random.default_rng(1).integers(0, 256, (8 + 16, 8 + 32, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(blocks, 8, 0), 8, 1)
    frames = np.stack([texture[t : t + 64, 2 * t : 2 * t + 64] for t in range(16)])  # (16, 64, 64, 3)
    good = encode_video(np.ascontiguousarray(frames), 10)
    return good, good[: len(good) // 2]


def benchmark_memory(decoders: Sequence[str], *, decodes: int) -> list[MemoryRun]:
    """RSS over ``decodes`` decodes of each :func:`memory_clips` clip, each backend in a fresh process."""
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    runs = []
    for name in decoders:
        out = subprocess.run([sys.executable, "-c", "from datasets.decoders.memory import main; main()",
                              name, str(decodes)], capture_output=True, text=True, env=env, cwd=repo)
        if out.returncode != 0:
            raise RuntimeError(f"the memory benchmark of {name!r} failed: {out.stderr.strip()[-2000:]}")
        runs += [MemoryRun(**run) for run in json.loads(out.stdout.splitlines()[-1])]
    return runs


def main() -> None:
    """Entry point of :func:`benchmark_memory`'s processes: ``-c ... <decoder> <decodes>``, JSON on stdout."""
    name, decodes = sys.argv[1], int(sys.argv[2])
    quiet_native_logs()
    good, truncated = memory_clips()
    with _stderr_to_devnull():
        runs = [_measure(name, kind, data, decodes) for kind, data in (("good", good), ("truncated", truncated))]
    print(json.dumps([asdict(r) for r in runs]))


@contextmanager
def _stderr_to_devnull():
    """decord prints a line per unreadable file from its C++ logging (the loaders decode in a watchdog
    process whose stderr is closed): keep 10,000 of them off the terminal."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _measure(name: str, kind: str, data: bytes, decodes: int) -> MemoryRun:
    backend = get_backend(name)
    idx = np.arange(0, 16, 2)
    samples, failures, every = [], 0, max(1, decodes // 20)
    for i in range(decodes):
        try:
            source = backend.open(data)
            try:
                source.get(idx)
            finally:
                source.close()
        except ValueError:  # VideoDecodeError
            failures += 1
        if (i + 1) % every == 0:
            samples.append(rss_mib())
    first = max(1, len(samples) // 10) - 1  # the sample at 10 % of the decodes
    warm, peak = samples[first], max(samples[first:])
    after = decodes - (first + 1) * every
    return MemoryRun(
        decoder=name, kind=kind, decodes=decodes, failures=failures, rss_mib=[round(s, 2) for s in samples],
        rss_after_warmup_mib=warm, rss_end_mib=samples[-1], growth_pct=100 * (peak - warm) / warm,
        kib_per_decode=1024 * (samples[-1] - warm) / max(after, 1), flat=(peak - warm) <= 0.05 * warm,
    )
