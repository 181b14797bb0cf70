"""Typed experiment configuration: flat dataclasses per concern, named presets, dotted overrides.

A job resolves its configuration once (preset, then ``key.sub=value`` overrides from the command
line), prints it, and passes the plain dict to every Ray worker; the same dict is logged to MLflow
and stored in every checkpoint. Nothing mutates a resolved config (STYLE.md #16).

    cfg = resolve_config(PRESETS_KINETICS, "demo", ["train.epochs=3", "model.name=frame_tcn_small"])
"""

from __future__ import annotations

import ast
import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "frame_tcn_tiny"
    # Extra constructor arguments (img_size, num_frames, ats_ratio, ...), e.g. model.kwargs.img_size=64.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Initialise from a local pretrained file (timm / official checkpoint); not the same as resuming.
    pretrained: str = ""
    drop_path_rate: float = 0.0


@dataclass(frozen=True)
class DataConfig:
    kind: Literal["video", "image"] = "video"
    # Shard sources: a folder with manifest.json, a brace pattern, or a URL webdataset understands.
    train: str = ""
    val: str = ""
    # When train/val are empty: build (if absent) and use the synthetic dataset of this preset.
    synthetic: Literal["", "smoke", "demo", "full"] = "demo"
    synthetic_root: str = "~/.cache/glimpse/synthetic"  # data of preset P goes to <root>/P/<kind>
    num_frames: int = 8
    stride: int = 2
    crop_size: int = 64
    train_short_side_min: int = 64
    train_short_side_max: int = 80
    eval_short_side: int = 64
    # Horizontal flip probability in training; 0 for labels that depend on left/right or rotation
    # direction (Something-Something-style motion, Glimpse's synthetic clips).
    hflip: float = 0.5
    image_size: int = 224
    crop_pct: float = 0.875
    auto_augment: str = "rand-m9-mstd0.5-inc1"
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
    views: str = ""  # "KxS" temporal clips x spatial crops; "" = the model's default
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
        return _build(cls, data, prefix="")

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow parameters."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and (value or not prefix):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------- typed building


def _check_value(key: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_value(key, arg, value)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, Sequence):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_check_value(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(f"unknown key {prefix}{unknown[0]} (valid keys of {where}: {', '.join(sorted(known))})")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            sub = data[f.name]
            if not isinstance(sub, Mapping):
                raise ConfigError(f"{key}: expected a mapping, got {sub!r}")
            kwargs[f.name] = _build(tp, sub, prefix=f"{key}.")
        else:
            kwargs[f.name] = _check_value(key, tp, data[f.name])
    obj = cls(**kwargs)
    _validate(obj, prefix)
    return obj


def _validate(obj: Any, prefix: str) -> None:
    """Range checks that types cannot express."""
    positive = {"epochs", "batch_size", "accum_steps", "log_every", "num_frames", "stride", "crop_size",
                "image_size", "eval_short_side", "train_short_side_min", "train_short_side_max"}
    non_negative = {"lr", "weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "mixup", "cutmix",
                    "clip_grad", "ema_decay", "checkpoint_every", "val_every", "stop_at_step", "fail_at_step",
                    "max_failures", "samples_per_epoch", "loader_workers", "num_workers", "shuffle_buffer",
                    "drop_path_rate", "cpus_per_worker", "hflip"}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in positive and value <= 0:
            raise ConfigError(f"{prefix}{f.name}: must be > 0, got {value!r}")
        if f.name in non_negative and value < 0:
            raise ConfigError(f"{prefix}{f.name}: must be >= 0, got {value!r}")
    if isinstance(obj, TrainConfig):
        if obj.label_smoothing >= 1 or obj.ema_decay >= 1:
            raise ConfigError(f"{prefix}label_smoothing and {prefix}ema_decay must be < 1")
    if isinstance(obj, DataConfig) and obj.train_short_side_min > obj.train_short_side_max:
        raise ConfigError(f"{prefix}train_short_side_min ({obj.train_short_side_min}) > "
                          f"{prefix}train_short_side_max ({obj.train_short_side_max})")
    if isinstance(obj, EvalConfig) and obj.views:
        parse_views(obj.views, key=f"{prefix}views")


def parse_key_values(items: Sequence[str], option: str = "--model-kwargs") -> dict[str, Any]:
    """``["img_size=64", "dims=(32, 64)", "global_pool=avg"]`` -> kwargs: Python literals, else strings."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_views(text: str, key: str = "eval.views") -> tuple[int, int]:
    """``"4x3"`` -> (4 temporal clips, 3 spatial crops)."""
    try:
        k, s = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not of the form KxS (e.g. 4x3)") from None
    if k < 1 or s not in (1, 3):
        raise ConfigError(f"{key}: {text!r}: need K >= 1 clips and S = 1 or 3 crops")
    return k, s


# --------------------------------------------------------------------------- overrides and presets


def _merge(base: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.kwargs.img_size=64"]`` -> nested dict; values parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r}: empty key part")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = nested
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return nested


Preset = Mapping[str, Any]


def resolve_config(presets: Mapping[str, Preset], preset: str, overrides: Sequence[str] = (),
                   config_file: str | Path | None = None) -> ExperimentConfig:
    """Defaults <- preset <- YAML file <- dotted overrides, validated into an ExperimentConfig."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(presets)}")
    data = _merge(ExperimentConfig().to_dict(), presets[preset])
    if config_file:
        loaded = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{config_file}: expected a mapping at top level")
        data = _merge(data, loaded)
    data = _merge(data, parse_overrides(overrides))
    return ExperimentConfig.from_dict(data)
