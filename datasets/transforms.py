"""Video and image transforms.

Video transforms come in three layers (PyTorchVideo style, ``pytorchvideo/transforms/``):

1. pure functions on ``(C, T, H, W)`` tensors (:func:`short_side_scale`, :func:`random_crop`,
   :func:`uniform_crop`, ...); random ones take an explicit ``numpy.random.Generator`` so that a
   loader can derive one per sample and stay deterministic;
2. thin ``nn.Module`` wrappers named after them, all called as ``module(x, rng)``;
3. one factory, :func:`video_transform`, building the train and eval pipelines from a
   :class:`~datasets.specs.VideoSpec`.

They act on the ``"video"`` value of a sample; the loader builds the sample dicts.

Pipelines start from the decoder's ``uint8 (T, H, W, 3)`` frames. To stay cheap next to decoding,
frames stay ``uint8`` in the decoder's memory layout through the resize (PyTorch's integer
fast path), crop (a view) and flip; :func:`normalize` converts only the cropped pixels to float,
folding the ``/ 255`` into the mean/std multiply-add, and the loader applies it once per batch.

Images use timm's ``create_transform`` (:func:`image_transform`): RandomResizedCrop, flip and
RandAugment for training; resize to ``size / crop_pct`` and centre crop for evaluation.
Mixup/CutMix act on batches and belong to the training step, not here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.specs import ImageSpec, VideoSpec

__all__ = [
    "FramesToCTHW",
    "HorizontalFlip",
    "Normalize",
    "RandomCrop",
    "RandomHorizontalFlip",
    "RandomShortSideScale",
    "ShortSideScale",
    "UniformCrop",
    "UniformCropViews",
    "VideoCompose",
    "frames_to_cthw",
    "horizontal_flip",
    "image_transform",
    "normalize",
    "normalize_batch",
    "random_crop",
    "random_short_side_scale",
    "short_side_scale",
    "uniform_crop",
    "uniform_crop_offsets",
    "video_transform",
]


# ----------------------------------------------------------------------------- pure functions


def frames_to_cthw(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Decoder frames ``uint8 (T, H, W, 3)`` -> ``uint8 (C, T, H, W)``, as a view (no copy).

    The memory stays frame-major and channels-last, which is what the ``uint8`` resize fast path of
    :func:`F.interpolate` wants (it sees the frames as a channels-last batch of ``T`` images).
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (T, H, W, 3), got {tuple(x.shape)}")
    return x.permute(3, 0, 1, 2)  # (C, T, H, W) view


def _check_cthw(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} expects a (C, T, H, W) tensor, got shape {tuple(x.shape)}")


def _short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    # The long side follows the aspect ratio, floored (PyTorchVideo's short_side_scale).
    if h <= w:
        return size, int(math.floor(w * size / h))
    return int(math.floor(h * size / w)), size


def short_side_scale(
    x: torch.Tensor, size: int, interpolation: str = "bilinear", antialias: bool = True
) -> torch.Tensor:
    """Resize ``(C, T, H, W)`` so that the shorter spatial side is ``size``, keeping the aspect ratio.

    ``(3, 8, 120, 160)`` with ``size=128`` -> ``(3, 8, 128, 170)`` (``floor(160 * 128 / 120) = 170``).
    Every frame gets the same resize. ``uint8`` input stays ``uint8`` (rounded; PyTorch's fast
    integer path, several times cheaper than resizing floats); float input stays float.

    ``antialias=True`` (torchvision's ``Resize`` default) low-pass filters when downscaling; when
    upscaling it is plain bilinear interpolation (``align_corners=False``), which is what
    PyTorchVideo's ``short_side_scale`` computes in both cases.
    """
    _check_cthw(x, "short_side_scale")
    if size < 1:
        raise ValueError(f"short side size must be >= 1, got {size}")
    h, w = x.shape[-2:]
    new_h, new_w = _short_side_size(h, w, size)
    if (new_h, new_w) == (h, w):
        return x
    align = False if interpolation in ("bilinear", "bicubic") else None
    aa = antialias and interpolation in ("bilinear", "bicubic")
    if x.dtype == torch.uint8:
        # (T, C, H, W) batch of frames; channels-last when x comes from frames_to_cthw.
        y = F.interpolate(x.transpose(0, 1), size=(new_h, new_w), mode=interpolation,
                          align_corners=align, antialias=aa)  # (T, C, h', w')
        return y.transpose(0, 1)  # (C, T, h', w') view
    if not x.is_floating_point():
        x = x.float()
    # F.interpolate treats (C, T, H, W) as C images with T channels: every frame gets the same resize.
    return F.interpolate(x, size=(new_h, new_w), mode=interpolation, align_corners=align,
                         antialias=aa)  # (C, T, h', w')


def random_short_side_scale(
    x: torch.Tensor, min_size: int, max_size: int, rng: np.random.Generator, interpolation: str = "bilinear"
) -> torch.Tensor:
    """:func:`short_side_scale` to a size drawn uniformly from ``[min_size, max_size]`` (inclusive)."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size <= max_size, got ({min_size}, {max_size})")
    size = int(rng.integers(min_size, max_size + 1))
    return short_side_scale(x, size, interpolation)


def _check_crop(x: torch.Tensor, size: int, name: str) -> tuple[int, int]:
    _check_cthw(x, name)
    h, w = x.shape[-2:]
    if size < 1 or size > h or size > w:
        raise ValueError(f"{name}: crop size {size} does not fit frames of {h}x{w}")
    return h, w


def random_crop(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A ``size x size`` crop at a uniformly random position (same for every frame): ``(C, T, size, size)``."""
    h, w = _check_crop(x, size, "random_crop")
    top = int(rng.integers(0, h - size + 1))
    left = int(rng.integers(0, w - size + 1))
    return x[..., top : top + size, left : left + size]


def uniform_crop_offsets(h: int, w: int, size: int, spatial_index: int, num_crops: int) -> tuple[int, int]:
    """(top, left) of crop ``spatial_index`` of ``num_crops`` for ``h x w`` frames.

    Crops move along the long side (the width when ``w >= h``, as in PySlowFast), centred on the
    short side; crop ``i`` of ``S > 1`` starts at ``floor((L - size) * i / (S - 1))``: for ``S = 3``,
    left/centre/right (or top/centre/bottom). ``S = 1`` is the centre crop,
    ``((h - size) // 2, (w - size) // 2)``. Centres are floored (PySlowFast rounds them up; the
    difference is at most one pixel and only for odd margins).

    Example: ``h, w, size = 128, 170, 112`` -> ``S = 3`` gives lefts ``0, 29, 58``, tops ``8``.
    """
    if not 0 <= spatial_index < num_crops:
        raise ValueError(f"spatial_index {spatial_index} out of range for num_crops={num_crops}")
    if size > h or size > w:
        raise ValueError(f"crop size {size} does not fit frames of {h}x{w}")
    top, left = (h - size) // 2, (w - size) // 2
    if num_crops > 1:
        if w >= h:
            left = (w - size) * spatial_index // (num_crops - 1)
        else:
            top = (h - size) * spatial_index // (num_crops - 1)
    return top, left


def uniform_crop(x: torch.Tensor, size: int, spatial_index: int, num_crops: int = 3) -> torch.Tensor:
    """Deterministic ``size x size`` crop number ``spatial_index`` of ``num_crops`` (see :func:`uniform_crop_offsets`)."""
    h, w = _check_crop(x, size, "uniform_crop")
    top, left = uniform_crop_offsets(h, w, size, spatial_index, num_crops)
    return x[..., top : top + size, left : left + size]


def horizontal_flip(x: torch.Tensor) -> torch.Tensor:
    """Mirror every frame left-right (last dimension)."""
    return x.flip(-1)


def normalize(
    x: torch.Tensor, mean: Sequence[float], std: Sequence[float], max_value: float | None = None
) -> torch.Tensor:
    """``float32 (x / max_value - mean) / std`` per channel; channels are dimension ``-4`` (``(..., C, T, H, W)``).

    ``max_value`` defaults to 255 for integer tensors and 1 for floating ones. One conversion copy,
    then an in-place multiply and add (the ``/ max_value`` is folded into the scale); the input is
    never modified. Applied to a whole ``uint8 (B, C, T, H, W)`` batch, this is several times cheaper
    than normalising clip by clip.
    """
    if x.ndim < 4 or x.shape[-4] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize expects (..., C, T, H, W) with C={len(mean)}, got {tuple(x.shape)}")
    if max_value is None:
        max_value = 1.0 if x.is_floating_point() else 255.0
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1)
    scale = 1.0 / (s * max_value)  # (C, 1, 1, 1): x * scale + shift == (x / max_value - mean) / std
    shift = -m / s
    return x.to(torch.float32, copy=True).mul_(scale).add_(shift)


# ----------------------------------------------------------------------------- module wrappers


class _VideoTransform(nn.Module):
    """Base: every video transform module is called as ``module(x, rng)``; ``rng`` may be unused."""

    def forward(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError


def _need_rng(rng: np.random.Generator | None, name: str) -> np.random.Generator:
    if rng is None:
        raise ValueError(f"{name} is random: pass a numpy Generator as rng")
    return rng


class FramesToCTHW(_VideoTransform):
    """``uint8 (T, H, W, 3)`` frames -> ``uint8 (C, T, H, W)`` view (:func:`frames_to_cthw`)."""

    def forward(self, x, rng=None):
        return frames_to_cthw(x)


class ShortSideScale(_VideoTransform):
    """:func:`short_side_scale` to a fixed size."""

    def __init__(self, size: int, interpolation: str = "bilinear") -> None:
        super().__init__()
        self.size, self.interpolation = size, interpolation

    def forward(self, x, rng=None):
        return short_side_scale(x, self.size, self.interpolation)


class RandomShortSideScale(_VideoTransform):
    """:func:`random_short_side_scale` over ``[min_size, max_size]``."""

    def __init__(self, min_size: int, max_size: int, interpolation: str = "bilinear") -> None:
        super().__init__()
        self.min_size, self.max_size, self.interpolation = min_size, max_size, interpolation

    def forward(self, x, rng=None):
        return random_short_side_scale(
            x, self.min_size, self.max_size, _need_rng(rng, "RandomShortSideScale"), self.interpolation
        )


class RandomCrop(_VideoTransform):
    """:func:`random_crop`."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x, rng=None):
        return random_crop(x, self.size, _need_rng(rng, "RandomCrop"))


class UniformCrop(_VideoTransform):
    """:func:`uniform_crop`: one fixed crop (``spatial_index`` of ``num_crops``)."""

    def __init__(self, size: int, spatial_index: int = 1, num_crops: int = 3) -> None:
        super().__init__()
        self.size, self.spatial_index, self.num_crops = size, spatial_index, num_crops

    def forward(self, x, rng=None):
        return uniform_crop(x, self.size, self.spatial_index, self.num_crops)


class UniformCropViews(_VideoTransform):
    """All ``num_crops`` uniform crops stacked: ``(C, T, H, W)`` -> ``(S, C, T, size, size)``."""

    def __init__(self, size: int, num_crops: int) -> None:
        super().__init__()
        self.size, self.num_crops = size, num_crops

    def forward(self, x, rng=None):
        return torch.stack([uniform_crop(x, self.size, i, self.num_crops) for i in range(self.num_crops)])


class HorizontalFlip(_VideoTransform):
    """:func:`horizontal_flip`, always."""

    def forward(self, x, rng=None):
        return horizontal_flip(x)


class RandomHorizontalFlip(_VideoTransform):
    """:func:`horizontal_flip` with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        self.p = p

    def forward(self, x, rng=None):
        if self.p <= 0.0:
            return x  # draw nothing: p = 0 must not change the random stream of later transforms
        return horizontal_flip(x) if _need_rng(rng, "RandomHorizontalFlip").random() < self.p else x


class Normalize(_VideoTransform):
    """:func:`normalize` with fixed mean/std (and ``max_value``, see there)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], max_value: float | None = None) -> None:
        super().__init__()
        self.mean, self.std, self.max_value = tuple(mean), tuple(std), max_value

    def forward(self, x, rng=None):
        return normalize(x, self.mean, self.std, self.max_value)


class VideoCompose(nn.Module):
    """Apply video transform modules in order, handing each the same per-sample ``rng``."""

    def __init__(self, transforms: Sequence[nn.Module]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, rng)
        return x


# ----------------------------------------------------------------------------- factories


def video_transform(train: bool, cfg: VideoSpec, *, normalize: bool = True) -> VideoCompose:
    """The video pipeline for ``uint8 (T, H, W, 3)`` decoded frames.

    - train: -> ``(C, T, crop, crop)``: random short-side scale in ``cfg.train_short_side``,
      random crop, horizontal flip with probability ``cfg.hflip``, normalisation;
    - eval: -> ``(S, C, T, crop, crop)``: short side to ``cfg.eval_short_side``, then the
      ``S = cfg.num_crops`` uniform crops along the long side, normalisation.

    Output is ``float32`` normalised with ``cfg.mean``/``cfg.std``; with ``normalize=False`` it stays
    ``uint8`` (the loader normalises whole batches, which is cheaper: see :func:`normalize`).
    Call as ``pipeline(frames, rng)`` with a per-sample ``numpy.random.Generator`` (training).
    """
    tail = [Normalize(cfg.mean, cfg.std, max_value=255.0)] if normalize else []
    if train:
        lo, hi = cfg.train_short_side
        return VideoCompose([FramesToCTHW(), RandomShortSideScale(lo, hi), RandomCrop(cfg.crop_size),
                             RandomHorizontalFlip(cfg.hflip), *tail])
    return VideoCompose(
        [FramesToCTHW(), ShortSideScale(cfg.eval_short_side), UniformCropViews(cfg.crop_size, cfg.num_crops), *tail]
    )


def image_transform(train: bool, cfg: ImageSpec):
    """timm's ImageNet transforms for PIL images -> ``float32 (3, size, size)`` normalised tensors.

    Train: ``RandomResizedCropAndInterpolation`` (scale 0.08-1), flip with probability ``cfg.hflip``,
    RandAugment ``cfg.auto_augment`` (timm turns colour jitter off when RandAugment is on), no random
    erasing. Eval: resize the short side to ``size / crop_pct``, centre crop ``size``.
    timm draws its randomness from Python's ``random``, NumPy's and torch's global generators: the
    loader seeds them per sample (and restores them) to keep batches deterministic.
    """
    from timm.data import create_transform  # local: timm's data module is only needed for images

    return create_transform(
        input_size=cfg.size, is_training=train, hflip=cfg.hflip, auto_augment=cfg.auto_augment if train else None,
        interpolation=cfg.interpolation, mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct, re_prob=0.0,
        normalize=cfg.output == "float",  # "uint8": MaybePILToTensor only, normalize_batch on the device
    )


# ----------------------------------------------------------------------------- batches on the device


def normalize_batch(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalise a ``uint8`` batch where it is, e.g. on the GPU: ``float32 (x / 255 - mean) / std``.

    For batches of a loader with ``output="uint8"`` (:class:`~datasets.specs.VideoSpec`,
    :class:`~datasets.specs.ImageSpec`): video ``uint8 (B, C, T, H, W)`` or images ``uint8 (B, C, H, W)``,
    channels in dimension 1. The arithmetic is the ``output="float"`` loader's (one ``addcmul`` with
    ``scale = 1 / (255 std)`` and ``shift = -mean / std`` in float32), so on the same device the result is
    bit-equal to what that loader returns. A floating-point input is refused: it is normalised already.
    """
    if x.dtype != torch.uint8:
        raise TypeError(f"normalize_batch expects a uint8 batch (output='uint8'), got {x.dtype}")
    if x.ndim < 3 or x.shape[1] != len(mean) or len(mean) != len(std):
        raise ValueError(f"normalize_batch expects (B, C, ...) with C={len(mean)}, got {tuple(x.shape)}")
    view = (-1,) + (1,) * (x.ndim - 2)  # (C, 1, ...): broadcasts over every dimension after C
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(view)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(view)
    scale, shift = 1.0 / (255.0 * s), -m / s
    return torch.addcmul(shift, x, scale)  # (B, C, ...) float32
