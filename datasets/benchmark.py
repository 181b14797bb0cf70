"""Video data benchmarks behind ``jobs/benchmark_data.py``: what the pipeline costs next to decoding alone.

1. :func:`benchmark_pipeline_vs_raw`, per decoder backend, on one set of shards:

   - *pipeline*: a training :func:`~datasets.loader.build_video_dataset` iterated directly
     (``num_workers=0``): tar reading, shuffle buffer, label parsing, the decode watchdog's process,
     decoding, clip sampling, random short-side scale, crop, flip, normalisation (``output="float"``)
     and batching;
   - *raw*: for the very clips the pipeline produced (same videos, same frame indices, recorded from its
     ``frame_index``/``video_id`` outputs), the backend alone in this process, bytes already in memory:
     open, decode the sorted unique indices, close. That is torchcodec's ``VideoDecoder`` +
     ``get_frames_at``, decord's ``VideoReader`` + ``get_batch``, and for PyAV the demux index, seeks and
     decoding of :mod:`datasets.decoders.pyav_backend`.

   After a warm-up epoch, each round runs one epoch of the pipeline and, after every batch, the raw
   decode of that batch's clips: alternating batch by batch exposes both sides to the same machine load.
   Both run single-threaded (``torch.set_num_threads(1)``, one FFmpeg thread). CPU time counts this
   process (``time.process_time``, all threads) plus the decode process (its own ``process_time``,
   reported with every answer), so ``ratio`` (pipeline / raw clips per CPU-second) is the cost per
   core, which other processes on a shared machine disturb much less than wall time (``ratio_wall``).
2. :func:`benchmark_backends`: backend against backend on the same clips at Kinetics-like geometry
   (:func:`ensure_kinetics_like`: H.264, 568x320, 25 fps, 10 s, x264 defaults), raw decode and pipeline,
   16 and 32 frames at stride 4, short side 256-320 -> 224 crops.
3. :func:`benchmark_memory`: RSS over many decodes per backend, of a good clip and of a truncated mp4
   (every decode fails), in a fresh process per backend, decoding in that process (no watchdog: the
   backend's own behaviour).
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datasets.decoders import get_backend, quiet_native_logs
from datasets.decoders.memory import (
    MEMORY_CLIP,
    MemoryRun,
    benchmark_memory,
    keep_freed_buffers,
    memory_clips,
    rss_mib,
)
from datasets.loader import build_video_dataset
from datasets.manifest import Manifest, ShardInfo, resolve_source, write_manifest
from datasets.samples import parse_sample
from datasets.specs import VideoSpec
from datasets.streams import shard_samples

__all__ = [
    "MEMORY_CLIP",
    "BackendRun",
    "Measured",
    "MemoryRun",
    "PipelineVsRaw",
    "benchmark_backends",
    "benchmark_memory",
    "benchmark_pipeline_vs_raw",
    "ensure_kinetics_like",
    "kinetics_like_frames",
    "memory_clips",
    "rss_mib",
]


@dataclass(frozen=True)
class Measured:
    """What a benchmark decoded and produced: the source clips, the clip geometry, the batches."""

    source: str
    videos: int
    video_size: tuple[int, int]  # (H, W) of the decoded frames, before any resize
    frames_per_video: float  # mean over the videos
    codec: str
    num_frames: int
    stride: int
    train_short_side: tuple[int, int]  # the short side is scaled to a random size in this range...
    crop_size: int  # ...then cropped to crop_size x crop_size
    resize: str  # "downscale", "upscale" or "mixed": from video_size to train_short_side
    batch_shape: tuple[int, ...]
    batch_dtype: str
    decoded_frames_per_clip: float  # unique frame indices per clip handed to the decoder


@dataclass(frozen=True)
class PipelineVsRaw:
    decoder: str
    output: str  # the batches' dtype: "float" (normalised in the loader) or "uint8" (normalised on the device)
    watchdog: bool  # decoded in the watchdog's child process (decode_timeout_s > 0)
    clips: int  # per round
    rounds: int
    ratio: float  # pipeline / raw clips per CPU-second: the per-core cost ratio (1.0 = free pipeline)
    ratio_wall: float  # the same from wall-clock time (noisier on a shared machine)
    pipeline_clips_per_cpu_s: float
    raw_clips_per_cpu_s: float
    pipeline_clips_per_s: float
    raw_clips_per_s: float
    pipeline_round_cpu_s: list[float]
    raw_round_cpu_s: list[float]
    pipeline_round_s: list[float]
    raw_round_s: list[float]


class _Clock:
    """Wall and CPU seconds inside ``with`` blocks; CPU includes the given child processes."""

    def __init__(self, children: Any = None) -> None:
        self.wall = self.cpu = 0.0
        self._children = children  # callable -> CPU seconds of decode processes so far

    def _cpu_now(self) -> float:
        return time.process_time() + (self._children() if self._children else 0.0)

    def __enter__(self) -> _Clock:
        self._w, self._c = time.perf_counter(), self._cpu_now()
        return self

    def __exit__(self, *exc) -> None:
        self.wall += time.perf_counter() - self._w
        self.cpu += self._cpu_now() - self._c


def _children_cpu(dataset) -> float:
    """CPU seconds of the dataset's decode processes so far (0 without a watchdog)."""
    return getattr(dataset.sample_decoder._reader, "cpu_seconds", 0.0)


def _raw_decode(backend, clips: Sequence[tuple[bytes, np.ndarray]]) -> None:
    for data, indices in clips:
        source = backend.open(data)
        source.get(indices)  # (T', H, W, 3) uint8
        source.close()


def _read_videos(source: str | Path) -> dict[str, bytes]:
    """Every video's bytes in memory, keyed as the pipeline names them (``video_id``)."""
    resolved = resolve_source(source)
    num_classes = len(resolved.classes) if resolved.classes else None
    videos: dict[str, bytes] = {}
    for url in resolved.urls:
        for raw in shard_samples(url, on_error=lambda u, e: None):
            parsed = parse_sample(raw, "video", num_classes)
            videos[parsed.video_id] = parsed.data
    return videos


def _describe(source: str | Path, videos: dict[str, bytes], spec: VideoSpec, batch: dict[str, Any],
              decoded: list[int]) -> Measured:
    import av

    sizes, lengths, codecs = set(), [], set()
    for data in videos.values():
        with av.open(io.BytesIO(data)) as c:
            s = c.streams.video[0]
            sizes.add((s.codec_context.height, s.codec_context.width))
            lengths.append(int(s.frames or 0))
            codecs.add(s.codec_context.name)
    h, w = max(sizes)
    lo, hi = spec.train_short_side
    short = min(min(s) for s in sizes)
    resize = "downscale" if hi <= short else "upscale" if lo >= max(min(s) for s in sizes) else "mixed"
    return Measured(
        source=str(source), videos=len(videos), video_size=(h, w), frames_per_video=float(np.mean(lengths)),
        codec="/".join(sorted(codecs)), num_frames=spec.num_frames, stride=spec.stride,
        train_short_side=spec.train_short_side, crop_size=spec.crop_size, resize=resize,
        batch_shape=tuple(batch["video"].shape), batch_dtype=str(batch["video"].dtype).replace("torch.", ""),
        decoded_frames_per_clip=float(np.mean(decoded)),
    )


def _interleaved_round(dataset, videos: dict[str, bytes], backend,
                       max_batches: int | None = None) -> tuple[_Clock, _Clock, list[str]]:
    """One epoch of the pipeline; after each batch, the backend alone on that batch's clips."""
    pipe, raw = _Clock(lambda: _children_cpu(dataset)), _Clock()
    ids: list[str] = []
    it = iter(dataset)
    for _ in range(max_batches or len(dataset)):
        with pipe:
            batch = next(it, None)
        if batch is None:
            break
        clips = [(videos[v], np.unique(idx)) for v, idx in zip(batch["video_id"], batch["frame_index"].numpy())]
        ids.extend(batch["video_id"])
        with raw:
            _raw_decode(backend, clips)
    return pipe, raw, ids


def benchmark_pipeline_vs_raw(
    source: str | Path,
    spec: VideoSpec,
    decoders: Sequence[str],
    *,
    clips: int,
    batch_size: int = 8,
    rounds: int = 3,
    shuffle_buffer: int = 64,
    seed: int = 0,
    warmup_epoch: bool = True,
) -> tuple[Measured, list[PipelineVsRaw]]:
    """Pipeline against raw decode of the same clips, for each backend in ``decoders`` (see module doc).

    ``warmup_epoch=False`` warms up with one batch instead of a whole epoch (long clips).
    """
    torch.set_num_threads(1)
    quiet_native_logs()
    keep_freed_buffers()  # this process stands for a loader worker, which sets it (raw decode gains too)
    samples = max(batch_size, clips // batch_size * batch_size)
    videos = _read_videos(source)
    results, measured = [], None
    for name in decoders:
        backend = get_backend(name)
        dataset = build_video_dataset(source, train=True, spec=replace(spec, decoder=name), batch_size=batch_size,
                                      seed=seed, samples_per_epoch=samples, shuffle_buffer=shuffle_buffer)
        # Warm-up: page cache, codecs, allocator, the decode process.
        first_ids = _interleaved_round(dataset, videos, backend, max_batches=None if warmup_epoch else 1)[2]
        pipe_cpu, raw_cpu, pipe_s, raw_s = [], [], [], []
        for _ in range(rounds):
            pipe, raw, ids = _interleaved_round(dataset, videos, backend)
            if ids[: len(first_ids)] != first_ids or (warmup_epoch and ids != first_ids):
                raise RuntimeError("the pipeline produced different clips on another pass: it is not deterministic")
            first_ids = ids
            pipe_cpu.append(pipe.cpu)
            raw_cpu.append(raw.cpu)
            pipe_s.append(pipe.wall)
            raw_s.append(raw.wall)
        if measured is None:
            first = [b for _, b in zip(range(4), iter(dataset))]
            decoded = [len(np.unique(i)) for b in first for i in b["frame_index"].numpy()]
            measured = _describe(source, videos, spec, first[0], decoded)
        dataset.sample_decoder.reader.close()
        n = len(first_ids) * rounds
        results.append(PipelineVsRaw(
            decoder=name, output=spec.output, watchdog=spec.decode_timeout_s > 0, clips=len(first_ids), rounds=rounds,
            ratio=(n / sum(pipe_cpu)) / (n / sum(raw_cpu)), ratio_wall=(n / sum(pipe_s)) / (n / sum(raw_s)),
            pipeline_clips_per_cpu_s=n / sum(pipe_cpu), raw_clips_per_cpu_s=n / sum(raw_cpu),
            pipeline_clips_per_s=n / sum(pipe_s), raw_clips_per_s=n / sum(raw_s),
            pipeline_round_cpu_s=pipe_cpu, raw_round_cpu_s=raw_cpu, pipeline_round_s=pipe_s, raw_round_s=raw_s,
        ))
    return measured, results


# ----------------------------------------------------------------------------- Kinetics-like clips


def kinetics_like_frames(num_frames: int, height: int = 320, width: int = 568, seed: int = 0) -> np.ndarray:
    """``uint8 (T, H, W, 3)``: a drifting 8x8-block texture under a moving shading, with sensor-like noise.

    Real motion and detail, so H.264 spends about Kinetics' bit rate on it (~0.6 Mbit/s at 568x320,
    x264's defaults) and a decoder predicts between frames as it does on real footage.
    """
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 8 + num_frames + 1, width // 8 + 2 * num_frames + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(blocks, 8, 0), 8, 1)
    y, x = np.mgrid[0:height, 0:width]
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        frame = texture[t : t + height, 2 * t : 2 * t + width].astype(np.int16)
        frame += (40 * np.sin((x + 5 * t) / 23.0) * np.cos((y - 3 * t) / 19.0)).astype(np.int16)[..., None]
        frame += rng.integers(-6, 7, (height, width, 1), dtype=np.int16)
        out[t] = np.clip(frame, 0, 255)
    return out


def ensure_kinetics_like(root: str | Path, count: int, *, num_frames: int = 250, fps: float = 25.0) -> Path:
    """A shard folder of ``count`` Kinetics-like clips (see :func:`kinetics_like_frames`), built once.

    H.264 (x264 defaults: CRF 23, one key frame every 250 frames), 568x320 (short side 320, 16:9),
    ``num_frames`` frames at ``fps`` (10 s by default). Cached under ``root``; built in a temporary
    folder and renamed, so an interrupted build leaves nothing behind.
    """
    import webdataset as wds

    from datasets.encode import encode_video

    folder = Path(root).expanduser() / f"kinetics_like_v1_{count}x{num_frames}"
    if (folder / "manifest.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        name = "shards-000000.tar"
        with wds.TarWriter(str(tmp / name)) as sink:
            for i in range(count):
                data = encode_video(kinetics_like_frames(num_frames, seed=i), fps)
                sink.write({"__key__": f"clip{i:04d}", "mp4": data, "cls": str(i % 4).encode()})
        write_manifest(tmp, Manifest(kind="video", classes=["a", "b", "c", "d"],
                                     shards=[ShardInfo(name=name, count=count, bytes=(tmp / name).stat().st_size)]))
        try:
            os.rename(tmp, folder)
        except OSError:  # another process built it meanwhile
            if not (folder / "manifest.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


@dataclass(frozen=True)
class BackendRun:
    decoder: str
    output: str
    watchdog: bool
    num_frames: int
    stride: int
    clips: int
    raw_clips_per_s: float
    raw_clips_per_cpu_s: float
    pipeline_clips_per_s: float
    pipeline_clips_per_cpu_s: float
    ratio: float  # pipeline / raw, per CPU-second


def benchmark_backends(source: str | Path, decoders: Sequence[str], *, geometries: Sequence[tuple[int, int]],
                       clips: int, batch_size: int = 4, seed: int = 0, output: str = "float",
                       decode_timeout_s: float = VideoSpec.decode_timeout_s) -> tuple[list[Measured], list[BackendRun]]:
    """Backend against backend at Kinetics-like geometry: clips/s of raw decode and of the pipeline.

    For each ``(num_frames, stride)`` in ``geometries``: ``clips`` training clips (short side 256-320,
    224 crops, as TimeSformer/SparseFormer train), the same clips for every backend (the clip sampler
    depends on the seed, not on the backend), one warm-up batch, then raw decode and pipeline one batch
    after the other (see :func:`benchmark_pipeline_vs_raw`). Long clips: one round.
    """
    measured, runs = [], []
    for num_frames, stride in geometries:
        spec = VideoSpec(num_frames=num_frames, stride=stride, crop_size=224, train_short_side=(256, 320),
                         eval_short_side=256, output=output, decode_timeout_s=decode_timeout_s)
        m, results = benchmark_pipeline_vs_raw(source, spec, decoders, clips=clips, batch_size=batch_size,
                                               rounds=1, shuffle_buffer=0, seed=seed, warmup_epoch=False)
        measured.append(m)
        for r in results:
            runs.append(BackendRun(
                decoder=r.decoder, output=r.output, watchdog=r.watchdog, num_frames=num_frames, stride=stride,
                clips=r.clips,
                raw_clips_per_s=r.raw_clips_per_s, raw_clips_per_cpu_s=r.raw_clips_per_cpu_s,
                pipeline_clips_per_s=r.pipeline_clips_per_s, pipeline_clips_per_cpu_s=r.pipeline_clips_per_cpu_s,
                ratio=r.ratio,
            ))
    return measured, runs


def to_json(obj: Any) -> Any:
    """Dataclasses (and lists of them) as JSON-ready dicts."""
    if isinstance(obj, list):
        return [to_json(o) for o in obj]
    return asdict(obj)
