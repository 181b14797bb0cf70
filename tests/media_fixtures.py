"""Real, small test media for the reading-side tests: mp4 via PyAV, images via Pillow, tar shards.

Frames carry their own index: frame ``t`` is flat with red ``16 * (t % 16) + 8`` and green
``16 * (t // 16) + 8``, which survives H.264 compression, so :func:`frame_ids` recovers which frame a
decoder returned.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

from datasets.encode import encode_video
from datasets.manifest import Manifest, ShardInfo, write_manifest


def indexed_frames(num_frames: int, height: int = 32, width: int = 64) -> np.ndarray:
    """``uint8 (T, H, W, 3)``: frame ``t`` encodes ``t`` in its red and green levels (``t < 256``)."""
    t = np.arange(num_frames)
    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (16 * (t % 16) + 8)[:, None, None]
    frames[..., 1] = (16 * (t // 16) + 8)[:, None, None]
    frames[..., 2] = 128
    return frames


def frame_ids(frames: np.ndarray) -> list[int]:
    """Recover the index of each decoded :func:`indexed_frames` frame."""
    r = frames[..., 0].reshape(len(frames), -1).mean(1)
    g = frames[..., 1].reshape(len(frames), -1).mean(1)
    return [int(round((gg - 8) / 16)) * 16 + int(round((rr - 8) / 16)) for rr, gg in zip(r, g)]


def indexed_video(num_frames: int, height: int = 32, width: int = 64, fps: float = 8) -> bytes:
    return encode_video(indexed_frames(num_frames, height, width), fps)


def textured_video(num_frames: int, size: int = 64, seed: int = 0, fps: float = 10) -> bytes:
    """A moving textured pattern (real motion, so decoders actually predict between frames)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, ((size + num_frames) // 4 + 1, (size + 2 * num_frames) // 4 + 1, 3), dtype=np.uint8)
    base = np.repeat(np.repeat(blocks, 4, 0), 4, 1)  # 4x4 blocks: compressible, not flat
    frames = np.stack([base[t : t + size, 2 * t : 2 * t + size] for t in range(num_frames)])
    return encode_video(np.ascontiguousarray(frames), fps)


def image_bytes(label: int, size: int = 40, fmt: str = "JPEG", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)
    arr[..., 0] = 20 * label
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def video_sample(key: str, label: int | None, data: bytes, **extra: Any) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key, "mp4": data,
                              "json": json.dumps({"video_id": f"vid-{key}", "label": str(label)}).encode()}
    if label is not None:
        sample["cls"] = str(label).encode("ascii")
    sample.update(extra)
    return sample


def image_sample(key: str, label: int | None, data: bytes, ext: str = "jpg", **extra: Any) -> dict[str, Any]:
    sample: dict[str, Any] = {"__key__": key, ext: data}
    if label is not None:
        sample["cls"] = str(label).encode("ascii")
    sample.update(extra)
    return sample


def write_shards(folder: Path, shards: Sequence[Sequence[dict[str, Any]]], kind: str,
                 classes: Sequence[str]) -> Path:
    """Write ``shards`` (lists of samples) as ``shards-%06d.tar`` plus a manifest; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, samples in enumerate(shards):
        name = f"shards-{i:06d}.tar"
        with wds.TarWriter(str(folder / name)) as sink:
            for s in samples:
                sink.write(s)
        infos.append(ShardInfo(name=name, count=len(samples), bytes=(folder / name).stat().st_size))
    write_manifest(folder, Manifest(kind=kind, classes=list(classes), shards=infos))
    return folder
