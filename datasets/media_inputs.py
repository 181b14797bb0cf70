"""Loose media files (and synthetic samples) -> a model input batch, outside the shard loaders.

For a command line that shows a model a few photos or clips (``jobs/visualize.py``). The pixels go
through the same functions as the loaders' evaluation pipeline (:mod:`datasets.transforms`,
:mod:`datasets.clip_sampling`):

1. frames as ``uint8 (C, T, H, W)`` (:func:`~datasets.transforms.frames_to_cthw`; an image is one frame);
2. :func:`cover_resize_crop`: :func:`~datasets.transforms.short_side_scale` to the smallest size that
   covers the model's ``H x W``, then the centre ``H x W`` crop (the evaluation crop of a non-square model);
3. :func:`~datasets.transforms.normalize` with the model's mean/std: ``float32``.

A video gives the one clip of :func:`whole_video_clip`: ``T`` frames at the stride that spreads them over
its whole length (``floor(n / T)``), centred as :class:`~datasets.clip_sampling.UniformClipSampler` centres
a single clip. :func:`to_display` undoes step 3 for drawing.

What the model takes is a :class:`MediaSpec`, read from its ``pretrained_cfg`` by the caller (this package
imports no model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from datasets.clip_sampling import ClipInfo, UniformClipSampler
from datasets.samples import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, decode_image
from datasets.stats import BadSample
from datasets.transforms import frames_to_cthw, normalize, short_side_scale

__all__ = [
    "MediaSpec",
    "center_crop",
    "cover_resize_crop",
    "cover_short_side",
    "load_media_files",
    "prepare_frames",
    "synthetic_media",
    "to_display",
    "whole_video_clip",
]


@dataclass(frozen=True)
class MediaSpec:
    """What a model takes per sample: ``shape`` ``(3, H, W)`` (images) or ``(3, T, H, W)`` (clips), and
    the mean/std its inputs are normalised with (``(x / 255 - mean) / std``)."""

    shape: tuple[int, ...]
    mean: tuple[float, ...] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, ...] = IMAGENET_DEFAULT_STD

    def __post_init__(self) -> None:
        if len(self.shape) not in (3, 4) or self.shape[0] != 3 or min(self.shape) < 1:
            raise ValueError(f"input shape must be (3, H, W) or (3, T, H, W), got {tuple(self.shape)}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    @classmethod
    def from_pretrained_cfg(cls, cfg: Mapping[str, Any] | None, input_size: Sequence[int] | None = None
                            ) -> MediaSpec:
        """From a timm ``pretrained_cfg`` dict: ``input_size`` (unless given: the built model's own shape
        may differ from the cfg's), ``mean`` and ``std`` (ImageNet's where absent)."""
        cfg = cfg or {}
        shape = input_size if input_size is not None else cfg.get("input_size")
        if shape is None:
            raise ValueError("the pretrained cfg has no input_size; pass input_size")
        return cls(tuple(shape), tuple(cfg.get("mean") or IMAGENET_DEFAULT_MEAN),
                   tuple(cfg.get("std") or IMAGENET_DEFAULT_STD))

    @property
    def is_video(self) -> bool:
        return len(self.shape) == 4

    @property
    def num_frames(self) -> int:
        """T for clips, 1 for images."""
        return self.shape[1] if self.is_video else 1

    @property
    def size(self) -> tuple[int, int]:
        """(H, W)."""
        return self.shape[-2], self.shape[-1]


# ----------------------------------------------------------------------------- pure functions


def cover_short_side(h: int, w: int, height: int, width: int) -> int:
    """The short-side size for :func:`~datasets.transforms.short_side_scale` that makes ``h x w`` frames
    cover ``height x width``: ``ceil(short * max(height / h, width / w))``, in exact integer arithmetic.

    The long side then comes out at ``floor(long * size / short) >= `` its target. A square target is the
    loaders' evaluation resize (short side to the crop size):

    >>> cover_short_side(50, 70, 64, 64), cover_short_side(80, 60, 64, 48), cover_short_side(30, 90, 32, 96)
    (64, 48, 32)
    >>> cover_short_side(100, 100, 64, 48)   # a wide target on a square image: the width decides
    64
    """
    short = min(h, w)
    # the larger of height * short / h and width * short / w, compared by cross-multiplying; then ceil
    a, b = (height * short, h) if height * w >= width * h else (width * short, w)
    return -(-a // b)


def center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre ``height x width`` crop of ``(..., H, W)`` (a view): top ``(H - height) // 2``, left
    ``(W - width) // 2``, floored as :func:`~datasets.transforms.uniform_crop_offsets` floors its centre."""
    h, w = x.shape[-2:]
    if height > h or width > w:
        raise ValueError(f"center_crop: {height}x{width} does not fit frames of {h}x{w}")
    top, left = (h - height) // 2, (w - width) // 2
    return x[..., top:top + height, left:left + width]


def cover_resize_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(C, T, h, w)`` -> ``(C, T, height, width)``: :func:`~datasets.transforms.short_side_scale` to
    :func:`cover_short_side`, then :func:`center_crop`. ``uint8`` stays ``uint8``."""
    h, w = x.shape[-2:]
    return center_crop(short_side_scale(x, cover_short_side(h, w, height, width)), height, width)


def prepare_frames(frames: np.ndarray | torch.Tensor, spec: MediaSpec) -> torch.Tensor:
    """``uint8 (T, h, w, 3)`` frames -> one normalised ``float32`` model input of ``spec.shape``
    (an image is a single frame: ``(1, h, w, 3)`` -> ``(3, H, W)``)."""
    x = cover_resize_crop(frames_to_cthw(frames), *spec.size)  # (3, T, H, W) uint8
    x = normalize(x, spec.mean, spec.std)  # (3, T, H, W) float32
    return x if spec.is_video else x[:, 0]


def whole_video_clip(video_num_frames: int, num_frames: int) -> ClipInfo:
    """The one clip of ``num_frames`` frames spread over a whole video: stride ``max(1, n // T)``, the
    clip centred by :class:`~datasets.clip_sampling.UniformClipSampler` (``num_clips=1``); a video shorter
    than ``T`` frames repeats its last frame, as the loaders do.

    >>> whole_video_clip(12, 4).indices.tolist()   # stride 3, span 10, start (12 - 10) // 2
    [1, 4, 7, 10]
    >>> whole_video_clip(3, 4).indices.tolist()
    [0, 1, 2, 2]
    """
    stride = max(1, int(video_num_frames) // int(num_frames))
    return UniformClipSampler(num_frames, stride, num_clips=1)(video_num_frames)[0]


def to_display(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo :func:`~datasets.transforms.normalize` for drawing: ``(B, C, H, W)`` or ``(B, C, T, H, W)``
    -> ``uint8`` channels-last ``(B, H, W, C)`` or ``(B, T, H, W, C)``: ``round(clamp(x * std + mean, 0, 1) * 255)``."""
    x = x.detach().float().cpu()
    shape = (1, -1) + (1,) * (x.ndim - 2)  # channels at dim 1
    x = x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1) if x.ndim == 5 else x.permute(0, 2, 3, 1)  # channels last


# ----------------------------------------------------------------------------- files and synthetic samples


def _suffix(path: Path) -> str:
    return path.suffix.lower().lstrip(".")


def _check_file(path: Path, video: bool) -> None:
    ext = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"input {path}: no such file")
    if ext not in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
        raise ValueError(f"input {path}: unknown type {ext!r} (images: {', '.join(IMAGE_EXTENSIONS)}; "
                         f"videos: {', '.join(VIDEO_EXTENSIONS)})")
    if video != (ext in VIDEO_EXTENSIONS):
        need = "video files (a video model)" if video else "image files (an image model)"
        raise ValueError(f"input {path}: the model takes {need}")


def _read_frames(path: Path, spec: MediaSpec) -> np.ndarray:
    """``uint8 (T, h, w, 3)``: the :func:`whole_video_clip` of a video, or an image as one frame."""
    data = path.read_bytes()
    if not spec.is_video:
        try:
            return np.asarray(decode_image(data))[None]  # (1, h, w, 3)
        except BadSample as exc:
            raise ValueError(f"input {path}: {exc}") from None
    from datasets.video import VideoDecodeError, open_video  # local: the decoders load FFmpeg's libraries

    try:
        with open_video(data) as video:
            return video.get(whole_video_clip(video.num_frames, spec.num_frames).indices)  # (T, h, w, 3)
    except VideoDecodeError as exc:
        raise ValueError(f"input {path}: {exc}") from None


def load_media_files(paths: Sequence[str | Path], spec: MediaSpec) -> torch.Tensor:
    """Image or video files -> a ``float32 (N, *spec.shape)`` batch (module docstring). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` for a file of the wrong kind."""
    files = [Path(p) for p in paths]
    for path in files:
        _check_file(path, spec.is_video)
    return torch.stack([prepare_frames(_read_frames(path, spec), spec) for path in files])


def synthetic_media(count: int, spec: MediaSpec, seed: int = 0) -> torch.Tensor:
    """``count`` samples of the synthetic datasets' validation split (:mod:`datasets.synthetic`: digits,
    or moving digits for clips, classes in turn), rendered square at ``max(H, W)`` and prepared as files are."""
    from datasets.synthetic import VIDEO_PRESETS, render_digit_image, render_moving_digit, sample_rng

    side = max(spec.size)
    out = []
    for i in range(count):
        if spec.is_video:
            rng = sample_rng(seed, "video", "val", i)
            frames, _, _ = render_moving_digit(i % 8, rng, side, spec.num_frames,
                                               VIDEO_PRESETS["demo"].distractor_speed)  # (T, S, S, 3)
        else:
            frames = render_digit_image(i % 10, sample_rng(seed, "image", "val", i), side)[None]  # (1, S, S, 3)
        out.append(prepare_frames(frames, spec))
    return torch.stack(out)
