"""The decode watchdog: every clip is decoded in a child process that is killed if it hangs.

Why a process: a decode that hangs in native code cannot be interrupted from Python. decord's
native loop holds the GIL (dmlc/decord#373), so no other thread of the process even runs; a
segmentation fault in FFmpeg kills the whole process. Only another process can give up on it.

Design (one child per decoding process, i.e. per DataLoader worker or per ``num_workers=0`` loader; the
child's side is :mod:`datasets.decoders.decode_process`):

- the child is *forked* from the process that decodes, on its first decode: it inherits the imported
  decoder library and the registered backends, so it starts in milliseconds (measured: 15-20 ms from
  a process with torch loaded), not in the seconds a fresh interpreter needs; the backend object is
  then created inside it. The child is single-threaded, ignores SIGINT, dies with its parent
  (``PR_SET_PDEATHSIG``), and sends FFmpeg's stderr to ``/dev/null`` (set ``GLIMPSE_DECODER_STDERR=1``
  to keep it): an error reaches the loader as one line, which names the shard and the key;
- one exchange per batch (:meth:`DecodeWatchdog.decode_many`): the compressed bytes of the batch's clips
  go into a shared-memory input buffer and one pickled *plan* per clip (``plan(num_frames) -> frame
  indices``: the clip sampler with a copy of the sample's generator) into a pipe, in one write. The
  child decodes the clips back to back (its caches stay hot: one exchange per clip measured 0.2-0.3 ms
  more per 32x32 clip), writes each clip's frames behind the previous one's in a shared output buffer,
  and answers each with a fixed binary header (nothing the child sends is unpickled). The parent copies
  the frames out. A batch that does not fit the buffers gets a new child with larger ones (the output
  buffer stops growing at 256 MiB; a larger batch is split over several exchanges);
- the parent waits at most ``timeout_s`` for each clip's answer. No answer: the child is killed
  (SIGKILL) and that clip gets :class:`DecodeTimeout`. End of file instead of the answer: the child died
  on that clip, which gets :class:`DecoderCrash` naming the signal or exit status. The clips behind it
  go to a new child; the loader counts the sample (``decode_timeout``, ``decoder_crash``) and goes on;
- never forked from a process that holds a Ray connection (a ``loader_workers=0`` loader inside a Ray
  driver or worker): there the loader decodes in-process (:func:`holds_ray_connection` says why);
- after ``recycle_after`` decodes the child is replaced, which bounds what a leaking native decoder
  can accumulate (decord leaks on failed decodes).

Cost (``jobs/benchmark_data.py``, 2 shared cores): the fork takes 15-20 ms once per worker and epoch; per
clip, the pipe, the plan and the copies cost about 0.15 ms of CPU in the loader and 0.1-0.3 ms in the
child (more on small clips, whose decoder state the child reloads into cold caches), and a copy of the
decoded frames (17 MiB for 32 frames of 568x320: 3-5 ms with the page faults). Why not a thread, which
costs nothing: it can neither interrupt a native loop that holds the GIL nor survive a segfault.
``timeout_s=0`` decodes in the calling process instead (:class:`InProcessReader`): the fast path, with
no protection.
"""

from __future__ import annotations

import logging
import os
import pickle
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from datasets.decoders import open_video_source, quiet_native_logs, resolve_decoder
from datasets.decoders.base import DecoderCrash, DecodeTimeout, VideoDecodeError
from datasets.decoders.decode_process import (
    DECODE_ERROR,
    HEADER,
    INDEX_ERROR,
    OK,
    TOO_BIG,
    DecodeProcess,
)
from datasets.decoders.registry import get_backend

__all__ = ["DecodeResult", "DecodeWatchdog", "FixedPlan", "InProcessReader", "IndexPlan", "make_reader"]

IndexPlan = Callable[[int], np.ndarray]
"""``plan(num_frames) -> int64 frame indices``: deterministic and picklable (it runs in the child)."""

logger = logging.getLogger(__name__)

_MIB = 1 << 20
_OUT_CAP = 256 * _MIB  # frames buffer: grown to hold a whole batch, up to this (then batches are split)
_PIPE_BUDGET = 32 * 1024  # request bytes per exchange: well under a pipe's 64 KiB, so a write never blocks


class FixedPlan:
    """The plan that asks for the same ``indices`` whatever the video's length (``-1``: the last frame)."""

    def __init__(self, indices) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)

    def __call__(self, num_frames: int) -> np.ndarray:
        return np.where(self.indices < 0, num_frames + self.indices, self.indices)


class DecodeResult(NamedTuple):
    """A decoded clip: the video's frame count, the indices the plan chose, ``uint8 (N, H, W, 3)`` frames."""

    num_frames: int
    indices: np.ndarray
    frames: np.ndarray


class InProcessReader:
    """Decode in this process (``timeout_s=0``): the fast path, without a watchdog."""

    def __init__(self, decoder: str) -> None:
        self.decoder = resolve_decoder(decoder)

    def decode(self, data: bytes, plan: IndexPlan) -> DecodeResult:
        source = open_video_source(data, self.decoder)
        try:
            indices = np.asarray(plan(source.num_frames), dtype=np.int64)
            return DecodeResult(source.num_frames, indices, source.get(indices))
        finally:
            source.close()

    def decode_many(self, jobs: Sequence[tuple[bytes, IndexPlan]]) -> list[DecodeResult | Exception]:
        """One :meth:`decode` per job; a clip's ``VideoDecodeError``/``IndexError`` is returned, not raised."""
        results: list[DecodeResult | Exception] = []
        for data, plan in jobs:
            try:
                results.append(self.decode(data, plan))
            except (VideoDecodeError, IndexError) as e:
                results.append(e)
        return results

    def close(self) -> None:
        pass


def holds_ray_connection() -> bool:
    """Whether this process is a connected Ray driver or worker (not a DataLoader worker forked from one).

    Such a process must not fork decode children (Ray's "forking new processes" anti-pattern). Measured:
    in a Ray driver after a Ray Train run, the first decode in a forked child left the driver's GCS
    connection broken ("Missing :authority header" in its log subscriber) and every later GCS call of the
    driver (a Tune sweep's first) hung. DataLoader workers, forked before any decode child, are not affected.
    """
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    from torch.utils.data import get_worker_info

    return get_worker_info() is None


def make_reader(decoder: str, timeout_s: float) -> InProcessReader | DecodeWatchdog:
    """The reader a loader uses: :class:`DecodeWatchdog` for ``timeout_s > 0``, else in-process.

    In a process that holds a Ray connection (a ``loader_workers=0`` loader in a Ray driver or worker) the
    decode is in-process, without the watchdog: see :func:`holds_ray_connection`. Use ``loader_workers >= 1``
    there to keep the protection against hung or crashing decodes."""
    if timeout_s > 0 and hasattr(os, "fork"):
        if not holds_ray_connection():
            return DecodeWatchdog(decoder, timeout_s)
        logger.debug("decode watchdog off in this process: it holds a Ray connection and must not fork "
                    "(loader_workers >= 1 keeps the watchdog)")
    return InProcessReader(decoder)


class DecodeWatchdog:
    """Decode clips in a forked child process; abandon one after ``timeout_s`` seconds (see the module doc).

    Create it in the process that decodes (a loader creates one per worker, lazily). ``decode`` raises
    :class:`DecodeTimeout`, :class:`DecoderCrash` or :class:`VideoDecodeError` (bad bytes), and
    ``IndexError`` when the plan asks for frames the video does not have. Not thread-safe.
    """

    def __init__(self, decoder: str, timeout_s: float, *, recycle_after: int = 10_000,
                 in_bytes: int = 4 * _MIB, out_bytes: int = 16 * _MIB) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.decoder = resolve_decoder(decoder)
        # Load the backend here, before any fork, so that every child inherits it ready to decode.
        ok, why = get_backend(self.decoder).available()
        if not ok:
            raise RuntimeError(f"video decoder {self.decoder!r} is not usable here: {why}")
        quiet_native_logs()
        self.timeout_s = float(timeout_s)
        self.recycle_after = recycle_after
        self._in_bytes, self._out_bytes = in_bytes, out_bytes
        self._child: DecodeProcess | None = None
        self._owner = os.getpid()
        self.children_started = 0
        self._cpu_done = 0.0  # CPU seconds of the decode processes that ended (as last reported)
        self._finalizer = weakref.finalize(self, DecodeWatchdog._shutdown, [None])

    @property
    def child_pid(self) -> int | None:
        """PID of the live decode process, if any."""
        return self._child.pid if self._child is not None else None

    @property
    def cpu_seconds(self) -> float:
        """CPU seconds the decode processes used so far, all threads (each reports its ``process_time`` in
        every answer; a killed child's last decode is not included)."""
        return self._cpu_done + (self._child.cpu if self._child is not None else 0.0)

    def _ensure_child(self) -> DecodeProcess:
        if os.getpid() != self._owner:
            raise RuntimeError("a DecodeWatchdog is used in the process that created it only (make one per worker)")
        child = self._child
        if child is not None and child.decodes >= self.recycle_after:
            self._cpu_done += child.cpu
            child.stop()  # bounds whatever a native decoder leaks to one child's lifetime
            child = self._child = None
        if child is None:
            child = self._child = DecodeProcess(self.decoder, self._in_bytes, self._out_bytes)
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, DecodeWatchdog._shutdown, [child])
            self.children_started += 1
        return child

    @staticmethod
    def _shutdown(holder: list) -> None:
        child = holder[0]
        if child is not None and os.getpid() == child.owner:  # not in a process forked from the owner
            try:
                child.stop()
            except (OSError, ValueError):
                pass

    def _discard_child(self) -> str:
        child, self._child = self._child, None
        if child is None:
            return "no child"
        self._cpu_done += child.cpu
        return child.kill()

    def decode(self, data: bytes, plan: IndexPlan) -> DecodeResult:
        """Decode one clip; raises what :meth:`decode_many` would return for it."""
        (result,) = self.decode_many([(data, plan)])
        if isinstance(result, BaseException):
            raise result
        return result

    def decode_many(self, jobs: Sequence[tuple[bytes, IndexPlan]]) -> list[DecodeResult | Exception]:
        """Decode several clips in one exchange: a result, or the exception of each clip, in order.

        Every request is written at once and the answers are read in order: the child decodes the clips
        back to back, which keeps its caches hot (one exchange per clip costs about 0.3 ms more per clip
        on small clips, measured). Each clip has its own timeout; after a clip that hangs or kills the
        child, the clips behind it go to a new child.
        """
        pending = [(bytes(data), plan) for data, plan in jobs]
        results: list[DecodeResult | Exception] = []
        while pending:
            done = self._exchange(pending)
            results.extend(done)
            pending = pending[len(done):]
        return results

    def _exchange(self, jobs: list[tuple[bytes, IndexPlan]]) -> list[DecodeResult | Exception]:
        """Send ``jobs`` (or as many as fit the pipe) to the child; the results of a prefix of them."""
        requests, offsets, total = [], [], 0
        for data, plan in jobs:
            request = pickle.dumps((total, len(data), plan, not requests), protocol=pickle.HIGHEST_PROTOCOL)
            if requests and (sum(map(len, requests)) + len(request) > _PIPE_BUDGET):
                break  # the rest in the next exchange: a full pipe must never block the parent
            requests.append(request)
            offsets.append(total)
            total += len(data)
        if total > self._in_bytes:
            self._in_bytes = 2 * total
        if self._child is not None and total > len(self._child.in_buf):
            self._cpu_done += self._child.cpu
            self._child.stop()  # these inputs do not fit its buffer: the next child gets a bigger one
            self._child = None
        child = self._ensure_child()
        for (data, _), offset in zip(jobs, offsets):
            child.in_buf[offset : offset + len(data)] = data
        child.decodes += len(requests)
        results: list[DecodeResult | Exception] = []
        try:
            child.requests.send(*requests)
            for i in range(len(requests)):
                if not child.replies.wait(self.timeout_s):
                    how = self._discard_child()
                    results.append(DecodeTimeout(f"{self.decoder} decode did not finish within {self.timeout_s:g} s "
                                                 f"(decode process killed: {how})"))
                    return results
                reply = child.replies.recv()
                child.cpu = HEADER.unpack_from(reply)[-1]
                if reply[0] == TOO_BIG:  # the child skips the rest of this exchange: drain it
                    for _ in range(i + 1, len(requests)):
                        child.cpu = HEADER.unpack_from(child.replies.recv())[-1]
                    self._grow_out(child, reply)
                    return results
                results.append(self._unpack(child, reply))
        except (EOFError, OSError):  # end of file, broken pipe: the child died on clip len(results)
            how = self._discard_child()
            results.append(DecoderCrash(f"the {self.decoder} decode process died ({how})"))
        return results

    def _grow_out(self, child: DecodeProcess, reply: bytes) -> None:
        """A clip's frames did not fit behind the earlier ones'. Grow the buffer to twice what this exchange
        needed, up to ``_OUT_CAP`` (beyond it only for a clip larger than the cap), with a new child; at the
        cap, the remaining clips simply go to the next exchange, which starts at offset 0."""
        _, need, used = HEADER.unpack_from(reply)[:3]
        target = max(min(_OUT_CAP, 2 * (used + need)), 2 * need if need > _OUT_CAP else 0)
        if target > len(child.out_buf):
            self._out_bytes = max(self._out_bytes, target)
            self._discard_child()

    def _unpack(self, child: DecodeProcess, reply: bytes) -> DecodeResult | Exception:
        status, n, k, t, h, w, offset, _ = HEADER.unpack_from(reply)
        body = memoryview(reply)[HEADER.size:]
        if status != OK:
            message = bytes(body).decode("utf-8", "replace")
            if status == DECODE_ERROR:
                return VideoDecodeError(message)
            if status == INDEX_ERROR:
                return IndexError(message)
            return RuntimeError(f"the {self.decoder} decode process failed: {message}")
        indices = np.frombuffer(body[: 8 * k], dtype=np.int64).copy()
        frames = np.frombuffer(child.out_buf, dtype=np.uint8, count=t * h * w * 3, offset=offset)
        return DecodeResult(n, indices, frames.reshape(t, h, w, 3).copy())

    def close(self) -> None:
        """Stop the decode process (also done when the watchdog is garbage-collected or the process exits)."""
        child, self._child = self._child, None
        if child is not None:
            self._cpu_done += child.cpu
            self._finalizer.detach()
            child.stop()
