"""Throughput of the video pipeline against decord alone on the same clips (``jobs/benchmark_data.py``).

Both sides run in this process, single-threaded (``torch.set_num_threads(1)``, decord
``num_threads=1``), so the ratio is per core:

- *pipeline*: a training :func:`~datasets.loader.build_video_dataset` iterated directly
  (``num_workers=0``): tar reading, shuffle buffer, label parsing, decoding, clip sampling,
  random short-side scale, crop, flip, normalisation and batching -> ``float (B, C, T, H, W)``;
- *decord*: for the very clips the pipeline produced (same videos, same frame indices, recorded from
  its ``frame_index``/``video_id`` outputs), ``decord.VideoReader(io.BytesIO(bytes))`` and one
  ``get_batch`` on the sorted unique indices, bytes already in memory.

After a warm-up epoch, each round runs one epoch of the pipeline and, after every batch, decord on
that batch's clips; alternating batch by batch exposes both sides to the same machine load. Both
wall-clock and CPU time (``time.process_time``: all threads of the process) are measured; the
headline ``ratio`` uses CPU time, i.e. cost per core, which other processes on a shared machine
disturb much less than wall time. Rates are totals over all rounds.
"""

from __future__ import annotations

import io
import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.loader import build_video_dataset
from datasets.manifest import resolve_source
from datasets.samples import parse_sample
from datasets.specs import VideoSpec
from datasets.streams import shard_samples
from datasets.video import open_video

__all__ = ["BenchmarkResult", "benchmark_video_pipeline"]


@dataclass(frozen=True)
class BenchmarkResult:
    clips: int  # per round
    rounds: int
    ratio: float  # pipeline / decord clips per CPU second: the per-core cost ratio (1.0 = free pipeline)
    ratio_wall: float  # the same from wall-clock time (noisier on a shared machine)
    pipeline_clips_per_cpu_s: float
    decord_clips_per_cpu_s: float
    pipeline_clips_per_s: float
    decord_clips_per_s: float
    pipeline_round_s: list[float]
    decord_round_s: list[float]
    pipeline_round_cpu_s: list[float]
    decord_round_cpu_s: list[float]
    frames_per_clip: int
    decoded_frames_per_clip: float  # unique frame indices per clip handed to get_batch
    video_size: tuple[int, int]
    spec: dict[str, Any]
    batch_size: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _decord_clips(clips: list[tuple[bytes, list[int]]]) -> None:
    import decord

    for data, indices in clips:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        reader.get_batch(indices).asnumpy()  # (T', H, W, 3) uint8
        del reader


class _Clock:
    """Wall and CPU (all threads of this process) seconds spent inside ``with`` blocks."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += time.process_time() - self._c


def _interleaved_round(dataset, videos: dict[str, bytes]) -> tuple[_Clock, _Clock, list[str]]:
    """One epoch of the pipeline; after each batch, decord alone on that batch's clips.

    Timing batch by batch, alternating, exposes both sides to the same machine load.
    """
    pipe, dec = _Clock(), _Clock()
    ids: list[str] = []
    it = iter(dataset)
    while True:
        with pipe:
            batch = next(it, None)
        if batch is None:
            return pipe, dec, ids
        assert batch["video"].dtype == torch.float32 and batch["video"].ndim == 5
        clips = [(videos[v], np.unique(idx).tolist()) for v, idx in zip(batch["video_id"], batch["frame_index"].numpy())]
        ids.extend(batch["video_id"])
        with dec:
            _decord_clips(clips)


def benchmark_video_pipeline(
    source: str | Path,
    spec: VideoSpec,
    *,
    clips: int,
    batch_size: int = 8,
    rounds: int = 3,
    shuffle_buffer: int = 64,
    seed: int = 0,
) -> BenchmarkResult:
    """Measure clips/s of the training pipeline and of raw decord on the same clips (see module doc)."""
    torch.set_num_threads(1)
    samples = max(batch_size, clips // batch_size * batch_size)
    dataset = build_video_dataset(source, train=True, spec=spec, batch_size=batch_size, seed=seed,
                                  samples_per_epoch=samples, shuffle_buffer=shuffle_buffer)

    # The raw side's inputs: every video's bytes in memory, keyed as the pipeline names them.
    resolved = resolve_source(source)
    num_classes = len(resolved.classes) if resolved.classes else None
    videos: dict[str, bytes] = {}
    for url in resolved.urls:
        for raw in shard_samples(url, on_error=lambda u, e: None):
            parsed = parse_sample(raw, "video", num_classes)
            videos[parsed.video_id] = parsed.data
    with open_video(next(iter(videos.values()))) as v:
        size = tuple(v.get(np.array([0])).shape[1:3])

    _, _, first_ids = _interleaved_round(dataset, videos)  # warm-up: page cache, codecs, allocator
    pipe_s, dec_s, pipe_cpu, dec_cpu = [], [], [], []
    for _ in range(rounds):
        pipe, dec, ids = _interleaved_round(dataset, videos)
        if ids != first_ids:
            raise RuntimeError("the pipeline produced different clips on another pass: it is not deterministic")
        pipe_s.append(pipe.wall)
        dec_s.append(dec.wall)
        pipe_cpu.append(pipe.cpu)
        dec_cpu.append(dec.cpu)
    n = len(first_ids)
    decoded = [len(np.unique(i)) for b in itertools.islice(iter(dataset), 4) for i in b["frame_index"].numpy()]
    # Totals over all rounds: with batch-by-batch alternation, load changes hit both sides alike.
    pipe_rate, dec_rate = n * rounds / sum(pipe_s), n * rounds / sum(dec_s)
    pipe_cpu_rate, dec_cpu_rate = n * rounds / sum(pipe_cpu), n * rounds / sum(dec_cpu)
    return BenchmarkResult(
        clips=n, rounds=rounds,
        ratio=pipe_cpu_rate / dec_cpu_rate, ratio_wall=pipe_rate / dec_rate,
        pipeline_clips_per_cpu_s=pipe_cpu_rate, decord_clips_per_cpu_s=dec_cpu_rate,
        pipeline_clips_per_s=pipe_rate, decord_clips_per_s=dec_rate,
        pipeline_round_s=pipe_s, decord_round_s=dec_s, pipeline_round_cpu_s=pipe_cpu, decord_round_cpu_s=dec_cpu,
        frames_per_clip=spec.num_frames, decoded_frames_per_clip=float(np.mean(decoded)),
        video_size=size, spec=asdict(spec), batch_size=batch_size,
    )
