"""The experiment configuration: flat typed frozen dataclasses, one per concern.

Geometry fields left at 0 (``data.num_frames``, ``data.stride``, ``data.crop_size``, ``data.image_size``),
``data.mean`` / ``data.std`` left empty and ``eval.views`` left empty mean "what the model's
``pretrained_cfg`` says"; :func:`pipeline.context.finalize` fills them in on the driver before anything
is logged, so the logged config holds the numbers that ran.

``ModelConfig``'s inference-time knobs (``ats_k``, ``ats_ratio``, ``tome_r``, ``evit_keep_rate``; the table is
:data:`pipeline.knobs.KNOBS`) are set on a built model without touching its weights: a sweep over them
evaluates one trained model at every value (``pipeline.sweep``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "frame_tcn_tiny"
    # Extra constructor arguments (img_size, num_frames, ...), e.g. model.kwargs.img_size=64.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Initialise from a local pretrained file (timm / official checkpoint); not the same as resuming.
    pretrained: str = ""
    drop_path_rate: float = 0.0
    # Inference-time knobs (pipeline.knobs), None = as built. ATS's K per stage, as a count or as the
    # ratio rho of the stage's input tokens (ATS section 3.2); one value applies to every stage.
    ats_k: int | tuple[int, ...] | None = None
    ats_ratio: float | tuple[float, ...] | None = None
    # ToMe's r (tokens merged per block, ToMe section 3) and EViT's keep rate (EViT section 3.2), on the
    # *_tome / *_evit models; one value for every block (location) or one per block (location).
    tome_r: int | tuple[int, ...] | None = None
    evit_keep_rate: float | tuple[float, ...] | None = None


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["video", "image"] = "video"
    # Shard sources: a folder with manifest.json, a brace pattern, or a URL webdataset understands.
    train: str = ""
    val: str = ""
    # When train/val are empty: build (if absent) and use the synthetic dataset of this preset.
    synthetic: Literal["", "smoke", "demo", "full"] = "demo"
    synthetic_root: str = "~/.cache/glimpse/synthetic"  # data of preset P goes to <root>/P/<kind>
    # Geometry; 0 / () = the model's pretrained_cfg (num_frames, sampling_rate, input_size, mean, std).
    num_frames: int = 0
    stride: int = 0
    crop_size: int = 0
    image_size: int = 0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    train_short_side_min: int = 64
    train_short_side_max: int = 80
    eval_short_side: int = 64
    # Horizontal flip probability in training; 0 for labels that depend on left/right or rotation
    # direction (Something-Something-style motion, Glimpse's synthetic clips).
    hflip: float = 0.5
    crop_pct: float = 0.875
    auto_augment: str = "rand-m9-mstd0.5-inc1"
    decoder: Literal["auto", "torchcodec", "pyav", "decord"] = "auto"  # video decoder backend (datasets.decoders)
    shuffle_buffer: int = 256
    # Samples per training epoch over all workers; 0 = the training manifest's total.
    samples_per_epoch: int = 0
    loader_workers: int = 2


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 16  # per worker
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3  # for the global batch; not rescaled
    weight_decay: float = 0.05
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    clip_grad: float = 1.0  # 0 = off
    ema_decay: float = 0.0  # 0 = off
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # autocast only on GPU
    accum_steps: int = 1
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = at epoch end only
    val_every: int = 1  # epochs; 0 = only the final evaluation
    seed: int = 0
    deterministic: bool = False
    # Stop (after checkpointing) at this global step, as if interrupted; 0 = off. For tests and drills.
    stop_at_step: int = 0
    # Fault drill: the highest rank kills its own process at this global step, once per run; 0 = off.
    fail_at_step: int = 0


@dataclass(frozen=True)
class EvalConfig:
    views: str = ""  # "KxS" temporal clips x spatial crops; "" = the model's pretrained_cfg test_views
    aggregate: Literal["prob", "logit"] = "prob"
    batch_size: int = 16
    at_end: bool = True


@dataclass(frozen=True)
class ClusterConfig:
    address: str = ""  # "" = RAY_ADDRESS if set (ray job submit sets it), else a local Ray
    num_workers: int = 1
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    storage_path: str = "./runs"  # local folder, shared mount, or s3:// style URI
    name: str = ""  # run name; the same name resumes
    max_failures: int = 0
    # Console level of Ray Train's and other libraries' logs (Glimpse's own are always INFO).
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


@dataclass(frozen=True)
class TrackingConfig:
    tracking_uri: str = ""  # "" = MLFLOW_TRACKING_URI, else SQLite under the storage path
    experiment: str = "glimpse"
    register: str = ""  # registered model name; "" = do not register
    aliases: tuple[str, ...] = ("candidate",)
    log_checkpoints: bool = True


@dataclass(frozen=True)
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        from pipeline.config.checks import build

        return build(cls, data, prefix="")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow parameters."""
        return flatten(self.to_dict())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": {}}`` -> ``{"a.b": 1, "c": {}}`` (an empty mapping is a value)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out
