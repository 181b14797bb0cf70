"""Inference-time knobs: ModelConfig fields set on a built model without touching its weights.

Each knob is a typed ``ModelConfig`` field (``model.ats_k``, ``model.ats_ratio``, ``model.tome_r``,
``model.evit_keep_rate``) with one row in :data:`KNOBS`: how to check a value, how to set it on a model,
and its short label. The pipeline uses the table in three places, so a new knob is one field and one row:

* :func:`pipeline.modeling.build_model` applies every knob that is not None after building (and after
  ``model.pretrained=``), so a training run, an evaluation and a registered model all run at the
  configured value;
* :func:`pipeline.config.checks.build` validates the values (errors name the key);
* ``pipeline.sweep`` treats a space key in :data:`KNOBS` as the inference axis: every trained model (or,
  with ``--model``, one existing model) is evaluated at each of its values without retraining.

A setting of a knob clears the knobs it ``excludes`` (ATS's K is a count or a ratio, never both).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config.schema import ConfigError


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _fraction(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def _per_stage(ok: Callable[[Any], bool]) -> Callable[[Any], bool]:
    """One value, or a non-empty list of them (one per stage)."""
    def check(value: Any) -> bool:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return bool(items) and all(ok(v) for v in items)

    return check


def _non_negative_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _set_tome(model, cfg) -> None:
    from models.tome import set_tome_r

    set_tome_r(model, cfg.tome_r)


def _set_evit(model, cfg) -> None:
    from models.evit import set_evit_keep_rate

    set_evit_keep_rate(model, cfg.evit_keep_rate)


def _set_ats(model, cfg) -> None:
    from models.ats import set_ats_k

    set_ats_k(model, k=cfg.ats_k, ratio=cfg.ats_ratio)


@dataclass(frozen=True)
class Knob:
    """One inference-time knob: the ``ModelConfig`` field, its sweep label, check and setter.

    ``apply(model, model_cfg)`` sets the knob's group from the whole ``ModelConfig`` (ATS's K and ratio
    are set together); ``expects`` says what a valid value is, for error messages.
    """

    field: str
    label: str
    valid: Callable[[Any], bool]
    expects: str
    apply: Callable[[Any, Any], None]
    excludes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"model.{self.field}"


KNOBS: dict[str, Knob] = {k.key: k for k in (
    Knob("ats_k", "k", _per_stage(_positive_int), "a positive integer K (or a list of them, one per stage)",
         _set_ats, excludes=("ats_ratio",)),
    Knob("ats_ratio", "ratio", _per_stage(_fraction), "a ratio rho in (0, 1] (or a list of them, one per stage)",
         _set_ats, excludes=("ats_k",)),
    Knob("tome_r", "r", _per_stage(_non_negative_int),
         "a number of tokens r >= 0 merged per block (or a list of them, one per block)", _set_tome),
    Knob("evit_keep_rate", "keep", _per_stage(_fraction),
         "a keep rate in (0, 1] (or a list of them, one per EViT location)", _set_evit),
)}


def check_knobs(model_cfg, prefix: str = "model.") -> None:
    """Raise ConfigError naming the knob whose value is invalid, or two knobs that exclude each other."""
    for knob in KNOBS.values():
        value = getattr(model_cfg, knob.field)
        if value is None:
            continue
        if not knob.valid(value):
            raise ConfigError(f"{prefix}{knob.field}: {value!r} is not {knob.expects}")
        for other in knob.excludes:
            if getattr(model_cfg, other) is not None:
                raise ConfigError(f"{prefix}{knob.field} and {prefix}{other} exclude each other: set one")


def apply_knobs(model, model_cfg):
    """Set every knob of ``model_cfg`` that is not None on ``model`` (each group once); returns ``model``."""
    done: set[Callable] = set()
    for knob in KNOBS.values():
        if getattr(model_cfg, knob.field) is not None and knob.apply not in done:
            knob.apply(model, model_cfg)
            done.add(knob.apply)
    return model


def _fmt(value: Any) -> str:
    return "-".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}"


@dataclass(frozen=True)
class KnobSetting:
    """One evaluated point of the inference axis: ``key`` (a :data:`KNOBS` key) = ``value``; key "" = as built."""

    key: str = ""
    value: Any = None

    @property
    def label(self) -> str:
        """``ratio_0.5``, ``ratio_0.25-0.75``, ``k_16``; ``as_built`` for the empty setting."""
        return f"{KNOBS[self.key].label}_{_fmt(self.value)}" if self.key else "as_built"

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys to set for this point (the knobs it excludes cleared)."""
        if not self.key:
            return {}
        knob = KNOBS[self.key]
        return {self.key: self.value, **{f"model.{other}": None for other in knob.excludes}}

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "value": list(self.value) if isinstance(self.value, tuple) else self.value}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KnobSetting:
        value = data.get("value")
        return cls(key=data.get("key", ""), value=tuple(value) if isinstance(value, list) else value)
