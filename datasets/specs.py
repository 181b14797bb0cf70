"""Typed geometry of the clips and images the loaders produce (flat dataclasses, no logic).

They live apart from :mod:`datasets.loader` so that :mod:`datasets.transforms` can use them
without importing the loader; ``datasets.loader`` re-exports both.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

__all__ = ["DEFAULT_DECODE_TIMEOUT_S", "OUTPUTS", "ImageSpec", "VideoSpec"]

Triple = tuple[float, float, float]
OUTPUTS = ("float", "uint8")
# Why 30 s: a clip decodes in 1 ms (32x32) to a few hundred ms (Kinetics 320p, 32 frames) on one core;
# 30 s is 100x the slowest of those, so a slow decode on an oversubscribed node is never abandoned,
# while a hung one costs its worker at most 30 s once.
DEFAULT_DECODE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class VideoSpec:
    """Clip geometry and augmentation of the video pipeline.

    Training: a ``num_frames`` clip at ``stride`` from a random start, short side scaled to a
    random size in ``train_short_side`` (inclusive), random ``crop_size`` crop, horizontal flip with
    probability ``hflip``. Evaluation: ``num_clips`` (K) uniformly spaced clips, short side scaled to
    ``eval_short_side``, ``num_crops`` (S) crops along the long side: K x S views per video.

    ``hflip`` must be 0 for data whose label depends on left/right motion or on the direction of
    rotation (a flip turns "moves left" into "moves right" and clockwise into counter-clockwise).
    ``decoder`` picks the video decoder backend (:mod:`datasets.decoders`): ``auto`` (torchcodec where
    FFmpeg's shared libraries load, else PyAV with one logged notice), ``torchcodec``, ``pyav`` or
    ``decord`` (the optional ``glimpse[decord]`` extra). ``decode_timeout_s``: the decode watchdog's
    limit per clip (:mod:`datasets.decoders.watchdog`; a clip not decoded by then is skipped and counted
    as ``decode_timeout``); ``0`` decodes in the loader worker itself, without a watchdog.

    ``output``: ``"float"`` batches are normalised ``float32`` (``(x / 255 - mean) / std``); ``"uint8"``
    batches hold the raw ``0..255`` pixels (a quarter of the bytes to move), to be normalised on the
    device with :func:`datasets.transforms.normalize_batch` ``(x, mean, std)``.
    """

    num_frames: int = 8
    stride: int = 4
    crop_size: int = 112
    train_short_side: tuple[int, int] = (128, 160)
    eval_short_side: int = 128
    num_clips: int = 1
    num_crops: int = 1
    mean: Triple = IMAGENET_DEFAULT_MEAN
    std: Triple = IMAGENET_DEFAULT_STD
    hflip: float = 0.5
    decoder: str = "auto"
    decode_timeout_s: float = DEFAULT_DECODE_TIMEOUT_S
    output: str = "float"

    def __post_init__(self) -> None:
        from datasets.decoders.registry import decoder_names  # names only: no decoder is imported

        # Lists from YAML / the command line become tuples (the spec is frozen and hashable).
        for name in ("train_short_side", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        lo, hi = self.train_short_side
        checks = [
            (self.num_frames >= 1, "num_frames must be >= 1"),
            (self.stride >= 1, "stride must be >= 1"),
            (self.crop_size >= 1, "crop_size must be >= 1"),
            (self.crop_size <= lo <= hi, "train_short_side must be (min, max) with crop_size <= min <= max"),
            (self.eval_short_side >= self.crop_size, "eval_short_side must be >= crop_size"),
            (self.num_clips >= 1 and self.num_crops >= 1, "num_clips and num_crops must be >= 1"),
            (0.0 <= self.hflip <= 1.0, "hflip is a probability in [0, 1]"),
            (len(self.mean) == 3 and len(self.std) == 3 and min(self.std) > 0, "mean/std need 3 values, std > 0"),
            (self.decoder in decoder_names(),
             f"decoder must be one of {'|'.join(decoder_names())}, got {self.decoder!r}"),
            (self.decode_timeout_s >= 0, f"decode_timeout_s must be >= 0 (0: no watchdog), got {self.decode_timeout_s}"),
            (self.output in OUTPUTS, f"output must be one of {'|'.join(OUTPUTS)}, got {self.output!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid VideoSpec: {msg} (got {self})")

    @property
    def num_views(self) -> int:
        """Evaluation views per video: K x S."""
        return self.num_clips * self.num_crops


@dataclass(frozen=True)
class ImageSpec:
    """Image pipeline geometry (timm ``create_transform`` arguments).

    Training: random resized crop to ``size``, horizontal flip with probability ``hflip``,
    ``auto_augment`` (RandAugment policy string, ``None`` to disable); evaluation: resize to
    ``size / crop_pct`` and centre crop ``size``. Both normalise with ``mean``/``std`` when ``output`` is
    ``"float"``; ``"uint8"`` keeps the pixels for :func:`datasets.transforms.normalize_batch` on the device.
    """

    size: int = 224
    crop_pct: float = 0.875
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    mean: Triple = IMAGENET_DEFAULT_MEAN
    std: Triple = IMAGENET_DEFAULT_STD
    interpolation: str = "bicubic"
    hflip: float = 0.5
    output: str = "float"

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.size < 1 or not 0.0 < self.crop_pct <= 1.0 or not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"invalid ImageSpec: size >= 1, 0 < crop_pct <= 1, 0 <= hflip <= 1 (got {self})")
        if self.output not in OUTPUTS:
            raise ValueError(f"invalid ImageSpec: output must be one of {'|'.join(OUTPUTS)}, got {self.output!r}")
