"""Typed building of the config dataclasses from plain mappings: coercion and range checks whose
errors name the key (``train.epochs: must be > 0, got 0``)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, Literal

from pipeline.config.schema import ConfigError, DataConfig, EvalConfig, ModelConfig, TrainConfig

_POSITIVE = {"epochs", "batch_size", "accum_steps", "log_every", "eval_short_side", "train_short_side_min",
             "train_short_side_max"}
# 0 is a value here: off, "all", or (geometry) "the model's pretrained_cfg".
_NON_NEGATIVE = {"lr", "weight_decay", "warmup_epochs", "min_lr", "label_smoothing", "mixup", "cutmix",
                 "clip_grad", "ema_decay", "checkpoint_every", "val_every", "stop_at_step", "fail_at_step",
                 "max_failures", "samples_per_epoch", "loader_workers", "num_workers", "shuffle_buffer",
                 "drop_path_rate", "cpus_per_worker", "hflip", "num_frames", "stride", "crop_size", "image_size"}


def _check_scalar(key: str, tp: Any, value: Any) -> Any:
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


def check_value(key: str, tp: Any, value: Any) -> Any:
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
                return check_value(key, arg, value)
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
        return tuple(check_value(f"{key}[{i}]", item_tp, v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return _check_scalar(key, tp, value)


def build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    """``cls`` (a config dataclass) from ``data``, every value checked; unknown keys name the valid ones."""
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
            kwargs[f.name] = build(tp, sub, prefix=f"{key}.")
        else:
            kwargs[f.name] = check_value(key, tp, data[f.name])
    obj = cls(**kwargs)
    validate(obj, prefix)
    return obj


def validate(obj: Any, prefix: str) -> None:
    """Range checks that types cannot express."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name in _POSITIVE and value <= 0:
            raise ConfigError(f"{prefix}{f.name}: must be > 0, got {value!r}")
        if f.name in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{prefix}{f.name}: must be >= 0, got {value!r}")
    if isinstance(obj, TrainConfig) and (obj.label_smoothing >= 1 or obj.ema_decay >= 1):
        raise ConfigError(f"{prefix}label_smoothing and {prefix}ema_decay must be < 1")
    if isinstance(obj, TrainConfig) and 0 < obj.lr < obj.min_lr:  # the cosine would climb, not decay
        raise ConfigError(f"{prefix}min_lr ({obj.min_lr:g}) is above {prefix}lr ({obj.lr:g}): set {prefix}min_lr "
                          f"<= {prefix}lr")
    if isinstance(obj, DataConfig):
        if obj.train_short_side_min > obj.train_short_side_max:
            raise ConfigError(f"{prefix}train_short_side_min ({obj.train_short_side_min}) > "
                              f"{prefix}train_short_side_max ({obj.train_short_side_max})")
        for name in ("mean", "std"):
            values = getattr(obj, name)
            if values and (len(values) != 3 or (name == "std" and min(values) <= 0)):
                raise ConfigError(f"{prefix}{name}: give 3 values (std > 0) or none for the model's, got {values!r}")
    if isinstance(obj, EvalConfig) and obj.views:
        parse_views(obj.views, key=f"{prefix}views")
    if isinstance(obj, ModelConfig):
        from pipeline.knobs import check_knobs

        check_knobs(obj, prefix)


def parse_views(text: str, key: str = "eval.views") -> tuple[int, int]:
    """``"4x3"`` -> (4 temporal clips, 3 spatial crops)."""
    try:
        k, s = (int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not of the form KxS (e.g. 4x3)") from None
    if k < 1 or s not in (1, 3):
        raise ConfigError(f"{key}: {text!r}: need K >= 1 clips and S = 1 or 3 crops")
    return k, s
