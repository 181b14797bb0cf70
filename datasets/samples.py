"""Turn raw shard samples (``{"__key__", "__url__", "mp4" | "jpg" | ..., "cls", "json"}``) into
model inputs, or reject them with a :class:`~datasets.stats.BadSample` naming the reason.

Only the entries listed here are read, and each by its own safe decoder: ``cls`` as an ASCII
integer, ``json`` with :func:`json.loads`, images with Pillow (restricted to JPEG/PNG/WebP/BMP),
videos with :mod:`datasets.decoders` (in a watchdog process, see :mod:`datasets.decoders.watchdog`). Any other entry (``.pyd``, ``.pth``, ``.pickle``, ``.txt``...) makes
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
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from datasets.clip_sampling import ClipInfo, RandomClipSampler, UniformClipSampler, union_indices
from datasets.decoders.base import DecoderCrash, DecodeTimeout, VideoDecodeError
from datasets.decoders.watchdog import DecodeResult, make_reader
from datasets.stats import BadSample

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


def _pack_rng(rng: np.random.Generator) -> Any:
    """A compact, picklable copy of a generator's state (Philox: plain ints, ~20 us to ship and rebuild)."""
    state = rng.bit_generator.state
    if state["bit_generator"] != "Philox":
        return rng
    inner = state["state"]
    return (inner["key"].tolist(), inner["counter"].tolist(), state["buffer"].tolist(), state["buffer_pos"],
            state["has_uint32"], state["uinteger"])


def _unpack_rng(packed: Any) -> np.random.Generator:
    if isinstance(packed, np.random.Generator):
        return packed
    key, counter, buffer, pos, has_uint32, uinteger = packed
    bits = np.random.Philox(key=key)
    bits.state = {"bit_generator": "Philox",
                  "state": {"counter": np.array(counter, np.uint64), "key": np.array(key, np.uint64)},
                  "buffer": np.array(buffer, np.uint64), "buffer_pos": pos, "has_uint32": has_uint32,
                  "uinteger": uinteger}
    return np.random.Generator(bits)


class _TrainPlan:
    """``plan(num_frames) -> indices`` of a training clip (see :mod:`datasets.decoders.watchdog`).

    Called in this process (no watchdog), it draws from the sample's own generator and keeps the
    clip. Pickled into a decode process, it carries a copy of the generator's state; the caller then
    draws the same clip again from its own generator, which advances it exactly as in-process.
    """

    def __init__(self, sampler: RandomClipSampler, rng: np.random.Generator) -> None:
        self.sampler, self.rng = sampler, rng
        self.clip: ClipInfo | None = None

    def __call__(self, num_frames: int) -> np.ndarray:
        self.clip = self.sampler(num_frames, self.rng)
        return self.clip.indices

    def __reduce__(self):
        return _train_plan_from_state, (self.sampler, _pack_rng(self.rng))


def _train_plan_from_state(sampler: RandomClipSampler, packed: Any) -> _TrainPlan:
    return _TrainPlan(sampler, _unpack_rng(packed))


class _EvalPlan:
    """``plan(num_frames) -> indices``: the union of the ``K`` evaluation clips' frames (sorted)."""

    def __init__(self, sampler: UniformClipSampler) -> None:
        self.sampler = sampler
        self.clips: list[ClipInfo] | None = None
        self.positions: list[np.ndarray] | None = None

    def __call__(self, num_frames: int) -> np.ndarray:
        self.clips = self.sampler(num_frames)
        union, self.positions = union_indices(self.clips)
        return union

    def __reduce__(self):
        return _EvalPlan, (self.sampler,)


# Why a sample's video could not be used -> the bad-sample reason it is counted under.
def _bad_video(e: Exception) -> BadSample:
    if isinstance(e, DecodeTimeout):
        return BadSample("decode_timeout", str(e))
    if isinstance(e, DecoderCrash):
        return BadSample("decoder_crash", str(e))
    return BadSample("decode_error", str(e))


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

    Decoding: backend ``decoder`` (:mod:`datasets.decoders`; ``auto`` is resolved here, once), in a
    :class:`~datasets.decoders.watchdog.DecodeWatchdog` child process with ``decode_timeout_s``
    (``0``: in this process). The reader is created lazily in the process that decodes (each
    DataLoader worker makes its own) and is never pickled. A video that cannot be decoded raises
    :class:`BadSample` with reason ``decode_error``, ``decode_timeout`` or ``decoder_crash``.
    """

    def __init__(
        self,
        *,
        train_sampler: RandomClipSampler,
        eval_sampler: UniformClipSampler,
        train_transform: Callable[..., torch.Tensor],
        eval_transform: Callable[..., torch.Tensor],
        decoder: str = "auto",
        decode_timeout_s: float = 0.0,
    ) -> None:
        from datasets.decoders import resolve_decoder

        self.train_sampler = train_sampler
        self.eval_sampler = eval_sampler
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.decoder = resolve_decoder(decoder)  # the auto notice, if any, once here (not per worker)
        self.decode_timeout_s = float(decode_timeout_s)
        self._reader = None
        self._reader_pid = -1

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_reader"], state["_reader_pid"] = None, -1  # each process makes its own reader
        return state

    @property
    def reader(self):
        """This process's reader (created on first use; a forked copy makes a new one)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = make_reader(self.decoder, self.decode_timeout_s)
            self._reader_pid = os.getpid()
        return self._reader

    def _decode(self, sample: ParsedSample, plan: Callable[[int], np.ndarray]) -> DecodeResult:
        try:
            return self.reader.decode(sample.data, plan)
        except (VideoDecodeError, IndexError) as e:
            raise _bad_video(e) from None

    def load_train(self, sample: ParsedSample, rng: np.random.Generator) -> tuple[ParsedSample, np.ndarray, ClipInfo]:
        """Decode one random clip: ``(sample, uint8 (T, H, W, 3) frames, clip)``; :class:`BadSample` if undecodable."""
        plan = _TrainPlan(self.train_sampler, rng)
        return self._train_loaded(sample, rng, plan, self._decode(sample, plan))

    def load_train_many(self, items: list[tuple[ParsedSample, np.random.Generator]]) -> list[Any]:
        """:meth:`load_train` of several samples in one exchange with the decode process (a batch's clips,
        decoded back to back); each entry is the loaded clip or the :class:`BadSample` to count."""
        plans = [_TrainPlan(self.train_sampler, rng) for _, rng in items]
        results = self.reader.decode_many([(sample.data, plan) for (sample, _), plan in zip(items, plans)])
        out: list[Any] = []
        for (sample, rng), plan, result in zip(items, plans, results):
            if isinstance(result, (VideoDecodeError, IndexError)):
                out.append(_bad_video(result))
            elif isinstance(result, BaseException):
                raise result  # not the data's fault (e.g. a bug in the decode process): stop
            else:
                out.append(self._train_loaded(sample, rng, plan, result))
        return out

    def _train_loaded(self, sample: ParsedSample, rng: np.random.Generator, plan: _TrainPlan,
                      result: DecodeResult) -> tuple[ParsedSample, np.ndarray, ClipInfo]:
        clip = plan.clip
        if clip is None:  # decoded in a watchdog process: draw the same clip from our own generator
            clip = self.train_sampler(result.num_frames, rng)
            if not np.array_equal(clip.indices, result.indices):
                raise RuntimeError(f"the decode process chose frames {result.indices.tolist()}, this process "
                                   f"{clip.indices.tolist()}: the clip sampler is not deterministic")
        return sample, result.frames, clip

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
        plan = _EvalPlan(self.eval_sampler)
        result = self._decode(sample, plan)  # frames: (U, H, W, 3) uint8, U = frames used by any clip
        if plan.clips is None:  # decoded in a watchdog process: the same clips, computed here
            if not np.array_equal(plan(result.num_frames), result.indices):
                raise RuntimeError("the decode process chose other evaluation frames than this process")
        clips, positions = plan.clips, plan.positions
        crops = self.eval_transform(result.frames)  # (S, C, U, crop, crop)
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
