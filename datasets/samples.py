"""Turn raw shard samples (``{"__key__", "__url__", "mp4" | "jpg" | ..., "cls", "json"}``) into
model inputs, or reject them with a :class:`~datasets.stats.BadSample` naming the reason.

Only the entries listed here are read, and each by its own safe decoder: ``cls`` as an ASCII
integer, ``json`` with :func:`json.loads`, images with Pillow (restricted to JPEG/PNG/WebP/BMP),
videos with :mod:`datasets.video`. Any other entry (``.pyd``, ``.pth``, ``.pickle``, ``.txt``...) makes
the sample an ``unknown_extension`` bad sample: nothing in a shard is ever unpickled.

Sample dicts produced here (STYLE.md #10):

- video, training: ``{"video": (C, T, H, W), "label": int, "video_id": str, "frame_index": int64 (T,)}``
  where ``"video"`` is the transform's output (``uint8`` in the loader, which normalises whole batches);
- video, evaluation (one per view): the same plus ``"clip_index"`` and ``"spatial_index"``;
- image: ``{"image": float (3, H, W), "label": int, "key": str}``.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from datasets.clip_sampling import ClipInfo, RandomClipSampler, UniformClipSampler, union_indices
from datasets.stats import BadSample
from datasets.video import VideoDecodeError, open_video

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "ImageSampleDecoder",
    "ParsedSample",
    "VideoSampleDecoder",
    "parse_sample",
]

VIDEO_EXTENSIONS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
_META_EXTENSIONS = ("cls", "json")
# Pillow is asked for these formats only: no exotic parser ever sees shard bytes.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")  # JPEG covers MPO (multi-picture) files too


@dataclass(frozen=True)
class ParsedSample:
    """A validated raw sample: which shard and key, the media bytes, the label, the raw metadata.

    ``meta`` (the ``json`` entry) is parsed on first use: a loader reads it after the batch's
    clips are decoded, not in the decode loop.
    """

    url: str
    key: str
    data: bytes
    label: int
    raw_meta: bytes | None = None

    @cached_property
    def meta(self) -> dict[str, Any]:
        if self.raw_meta is None:
            return {}
        try:
            obj = json.loads(self.raw_meta)
        except (ValueError, UnicodeDecodeError):
            return {}  # metadata is optional: a broken json entry does not cost the sample its label
        return obj if isinstance(obj, dict) else {}

    @property
    def video_id(self) -> str:
        vid = self.meta.get("video_id")
        return str(vid) if vid not in (None, "") else self.key


def parse_sample(raw: dict[str, Any], kind: str, num_classes: int | None = None) -> ParsedSample:
    """Check a raw webdataset sample of ``kind`` (``"video"`` or ``"image"``) and pick its fields.

    Raises :class:`BadSample` with reason ``unknown_extension``, ``missing_data``, ``missing_label``
    or ``bad_label``. ``num_classes`` (from the manifest) bounds the label when known.
    """
    media = VIDEO_EXTENSIONS if kind == "video" else IMAGE_EXTENSIONS
    entries = [k for k in raw if not k.startswith("__")]
    unknown = sorted(k for k in entries if k not in media and k not in _META_EXTENSIONS)
    if unknown:
        raise BadSample("unknown_extension", f"unknown extension(s) {unknown} in a {kind} dataset")
    present = [k for k in media if k in raw]
    if not present:
        raise BadSample("missing_data", f"no {kind} entry (expected one of {list(media)}), has {sorted(entries)}")
    if "cls" not in raw:
        raise BadSample("missing_label", "no 'cls' entry")
    label = _parse_label(raw["cls"], num_classes)
    return ParsedSample(url=str(raw.get("__url__", "?")), key=str(raw.get("__key__", "?")),
                        data=raw[present[0]], label=label, raw_meta=raw.get("json"))


def _parse_label(value: Any, num_classes: int | None) -> int:
    try:
        text = value.decode("ascii") if isinstance(value, (bytes, bytearray)) else str(value)
        label = int(text.strip())
    except (UnicodeDecodeError, ValueError):
        raise BadSample("bad_label", f"'cls' is not an ASCII integer: {value[:20]!r}") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
        raise BadSample("bad_label", f"label {label} outside {bound}")
    return label


# ----------------------------------------------------------------------------- video


class VideoSampleDecoder:
    """Decode and transform a parsed video sample.

    ``train(sample, rng)``: one clip from :class:`RandomClipSampler`, through the training transform;
    it is :meth:`load_train` (decode) then :meth:`finish_train` (transform), which a loader may call in
    two passes over a batch: decoding all clips, then transforming all of them, keeps each phase's
    code and data hot in the CPU caches (measured: the transform costs half as much per clip).
    ``views(sample)``: the ``K x S`` evaluation views. The video is opened and decoded once: the
    ``K`` clips' frame indices are merged and sorted (decoders want sorted indices), and since
    every evaluation transform acts frame by frame, it runs once on the merged frames; each clip
    then gathers its frames.
    """

    def __init__(
        self,
        *,
        train_sampler: RandomClipSampler,
        eval_sampler: UniformClipSampler,
        train_transform: Callable[..., torch.Tensor],
        eval_transform: Callable[..., torch.Tensor],
        backend: str = "auto",
    ) -> None:
        self.train_sampler = train_sampler
        self.eval_sampler = eval_sampler
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.backend = backend

    def load_train(self, sample: ParsedSample, rng: np.random.Generator) -> tuple[ParsedSample, np.ndarray, ClipInfo]:
        """Decode one random clip: ``(sample, uint8 (T, H, W, 3) frames, clip)``; :class:`BadSample` if undecodable."""
        try:
            with open_video(sample.data, backend=self.backend) as video:
                clip = self.train_sampler(video.num_frames, rng)
                frames = video.get(clip.indices)  # (T, H, W, 3) uint8
        except (VideoDecodeError, IndexError) as e:
            raise BadSample("decode_error", str(e)) from None
        return sample, frames, clip

    def finish_train(self, loaded: tuple[ParsedSample, np.ndarray, ClipInfo], rng: np.random.Generator) -> dict[str, Any]:
        """Transform a :meth:`load_train` result with the same ``rng`` (after the clip sampler's draw)."""
        sample, frames, clip = loaded
        x = self.train_transform(frames, rng)  # (C, T, crop, crop)
        return {"video": x, "label": sample.label, "video_id": sample.video_id,
                "frame_index": torch.from_numpy(clip.indices)}

    def train(self, sample: ParsedSample, rng: np.random.Generator) -> dict[str, Any]:
        """:meth:`load_train` then :meth:`finish_train`."""
        return self.finish_train(self.load_train(sample, rng), rng)

    def views(self, sample: ParsedSample) -> list[dict[str, Any]]:
        try:
            with open_video(sample.data, backend=self.backend) as video:
                clips = self.eval_sampler(video.num_frames)
                union, positions = union_indices(clips)
                frames = video.get(union)  # (U, H, W, 3) uint8, U = frames used by any clip
        except (VideoDecodeError, IndexError) as e:
            raise BadSample("decode_error", str(e)) from None
        crops = self.eval_transform(frames)  # (S, C, U, crop, crop)
        items = []
        for clip, pos in zip(clips, positions):
            clip_views = crops[:, :, torch.from_numpy(pos)]  # (S, C, T, crop, crop)
            for s in range(clip_views.shape[0]):
                items.append({"video": clip_views[s], "label": sample.label, "video_id": sample.video_id,
                              "frame_index": torch.from_numpy(clip.indices), "clip_index": clip.clip_index,
                              "spatial_index": s})
        return items


# ----------------------------------------------------------------------------- image


@contextmanager
def _seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators for one sample, then restore them.

    timm's transforms draw from the global generators; restoring keeps a ``num_workers=0`` loader
    from disturbing the training process's own random streams.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def decode_image(data: bytes):
    """Encoded image bytes -> RGB ``PIL.Image``; :class:`BadSample` (``bad_image``) when undecodable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:
            im.load()  # force full decoding here: truncated files fail now, not inside a transform
            return im.convert("RGB")
    except Exception as e:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, DecompressionBomb...
        raise BadSample("bad_image", f"cannot decode image ({len(data)} bytes): {type(e).__name__}: {e}") from None


class ImageSampleDecoder:
    """Decode a parsed image sample and apply a timm transform (seeded per sample when training)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        self.transform = transform

    def load_train(self, sample: ParsedSample, rng: np.random.Generator | None = None) -> tuple[ParsedSample, Any]:
        """Decode the image: ``(sample, PIL image)``; :class:`BadSample` (``bad_image``) if undecodable."""
        return sample, decode_image(sample.data)

    def finish_train(self, loaded: tuple[ParsedSample, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Apply the transform; with ``rng``, timm's global generators are seeded from it for this sample."""
        sample, image = loaded
        if rng is None:
            x = self.transform(image)
        else:
            with _seeded_global_rngs(int(rng.integers(2**63))):
                x = self.transform(image)
        return {"image": x, "label": sample.label, "key": sample.key}

    def __call__(self, sample: ParsedSample, rng: np.random.Generator | None = None) -> dict[str, Any]:
        return self.finish_train(self.load_train(sample, rng), rng)

    def views(self, sample: ParsedSample) -> list[dict[str, Any]]:
        """Evaluation: the one (deterministic) view of an image, as a list like the video decoder's."""
        return [self(sample)]
