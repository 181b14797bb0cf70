"""From a DataConfig to per-rank datasets and model inputs.

* :func:`resolve_sources`: absolute shard sources and the class list (synthetic data made if absent);
* :func:`build_dataset`: the rank's training or evaluation dataset, geometry and normalisation from the
  (finalised) config;
* :func:`model_inputs`: the ONE conversion of a loader batch into what the model and loss take, used by
  training, evaluation, the figures and the benchmark: device transfer, and normalisation on the device
  for ``uint8`` batches (:func:`datasets.transforms.normalize_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import DataConfig


@dataclass(frozen=True)
class Sources:
    train: str
    val: str
    num_classes: int
    classes: tuple[str, ...]
    train_samples: int


def resolve_sources(cfg: DataConfig) -> Sources:
    """Absolute shard sources and the class list. Builds the synthetic dataset when none is given.

    Called once on the driver: workers run in another working directory, so paths must be absolute.
    """
    from datasets.manifest import resolve_source

    train, val = cfg.train, cfg.val
    if not train:
        if not cfg.synthetic:
            raise ValueError("data.train is empty and data.synthetic is off: give data.train=<shards>")
        from datasets.synthetic import ensure_synthetic

        # One folder per preset: a root holds one synthetic preset, and smoke and demo runs share a cache.
        root = ensure_synthetic(Path(cfg.synthetic_root).expanduser() / cfg.synthetic, kind=cfg.kind,
                                preset=cfg.synthetic)
        train, val = str(root / "train"), str(root / "val")

    def absolute(src: str) -> str:
        return src if "://" in src or src.startswith("pipe:") or not src else str(Path(src).expanduser().resolve())

    train, val = absolute(train), absolute(val)
    manifest = resolve_source(train).manifest
    if manifest is None:
        raise ValueError(f"data.train={train!r} has no manifest.json: class names and counts are unknown; "
                         "build shards with jobs/make_shards.py or point at their folder")
    total = cfg.samples_per_epoch or manifest.total_samples
    return Sources(train=train, val=val or train, num_classes=len(manifest.classes),
                   classes=tuple(manifest.classes), train_samples=total)


def _normalization(cfg: DataConfig) -> dict:
    if not (cfg.mean and cfg.std):
        raise ValueError("data.mean / data.std are not set: finalize the config first (pipeline.context.finalize)")
    return {"mean": tuple(cfg.mean), "std": tuple(cfg.std)}


def video_spec(cfg: DataConfig, views: tuple[int, int] = (1, 1)):
    from datasets.loader import VideoSpec

    return VideoSpec(num_frames=cfg.num_frames, stride=cfg.stride, crop_size=cfg.crop_size,
                     train_short_side=(cfg.train_short_side_min, cfg.train_short_side_max),
                     eval_short_side=cfg.eval_short_side, num_clips=views[0], num_crops=views[1], hflip=cfg.hflip,
                     decoder=cfg.decoder, **_normalization(cfg))


def image_spec(cfg: DataConfig):
    from datasets.loader import ImageSpec

    return ImageSpec(size=cfg.image_size, crop_pct=cfg.crop_pct, auto_augment=cfg.auto_augment or None,
                     **_normalization(cfg))


def build_dataset(cfg: DataConfig, source: str, *, train: bool, batch_size: int, rank: int, world_size: int,
                  seed: int, epoch: int = 0, samples_per_epoch: int | None = None, start_batch: int = 0,
                  views: tuple[int, int] = (1, 1), stats=None):
    from datasets.loader import build_image_dataset, build_video_dataset

    common = dict(train=train, batch_size=batch_size, rank=rank, world_size=world_size, seed=seed, epoch=epoch,
                  samples_per_epoch=samples_per_epoch, shuffle_buffer=cfg.shuffle_buffer, start_batch=start_batch,
                  stats=stats)
    if cfg.kind == "video":
        return build_video_dataset(source, spec=video_spec(cfg, views), **common)
    return build_image_dataset(source, spec=image_spec(cfg), **common)


def model_inputs(batch: dict, cfg: DataConfig, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, labels)`` of a loader batch on ``device``: ``x`` float ``(B, C, [T,] H, W)``, normalised.

    A ``uint8`` batch (a loader with ``output="uint8"``) is moved first and normalised on the device,
    bit-equal to the float loader's arithmetic (``datasets.transforms.normalize_batch``).
    """
    x = batch["video" if cfg.kind == "video" else "image"].to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        from datasets.transforms import normalize_batch

        x = normalize_batch(x, cfg.mean, cfg.std)
    return x, batch["label"].to(device, non_blocking=True)


def validation_inputs(cfg: DataConfig, source: str, max_samples: int, *, batch_size: int, seed: int = 0,
                      device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The first ``max_samples`` validation inputs (one centre view each) as a list of batches
    ``(B, C, [T,] H, W)``: for GFLOPs averaging and the figures logged at the end of a run."""
    from datasets.loader import make_loader

    dataset = build_dataset(cfg, source, train=False, batch_size=batch_size, rank=0, world_size=1, seed=seed)
    batches, seen = [], 0
    for batch in make_loader(dataset, num_workers=0):
        x = model_inputs(batch, cfg, device)[0][: max_samples - seen]
        batches.append(x)
        seen += x.shape[0]
        if seen >= max_samples:
            break
    if not batches:
        raise ValueError(f"validation source {source} gave no samples")
    return batches
