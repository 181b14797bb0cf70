"""A sweep's search space and spec: dotted ``ExperimentConfig`` keys, checked against the base config.

    spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke", ["train.epochs=3"])
    dims, knobs = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}, "model.ats_ratio": [0.5, 1.0]}, base)

Every key of a space is a real config field. A key in :data:`pipeline.knobs.KNOBS` (``model.ats_k``,
``model.ats_ratio``: ATS's K, ATS section 3.2) is the inference-time axis: every trained model is
evaluated at each of its values without retraining. Any other key is a training dimension. Overrides
and values go through the one parser of :mod:`pipeline.config.overrides`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import (
    ConfigError,
    ExperimentConfig,
    apply_params,
    as_assignments,
    load_yaml,
    resolve_config,
)
from pipeline.knobs import KNOBS, KnobSetting

DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform")
METRIC, MODE = "val/top1", "max"
SWEEP_KEYS = {"base", "overrides", "space", "num_samples", "max_concurrent", "asha", "needs_model", "model",
              "gflops_samples", "metric"}
# The inference-time keys of Glimpse before they were config fields; a space using them gets told the new ones.
OLD_KNOB_KEYS = {"ats.k": "model.ats_k", "ats.ratio": "model.ats_ratio"}


@dataclass(frozen=True)
class Dimension:
    """One searched config key: ``grid``/``choice`` over values, ``uniform``/``loguniform`` over [lo, hi]."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def to_tune(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        return tune.loguniform(*self.values)


def _check_value(base: ExperimentConfig, params: Mapping[str, Any], key: str, value: Any) -> None:
    try:
        apply_params(base, params)
    except ConfigError as exc:
        raise ConfigError(f"search space key {key!r}, value {value!r}: {exc}") from None


def _split(key: Any, spec: Any) -> tuple[str, list[Any]]:
    """(kind, values) of one space entry: ``{kind: values}`` or a bare list (a grid)."""
    if not isinstance(key, str) or not key or not all(key.split(".")):
        raise ConfigError(f"search space key {key!r} is not a dotted config key")
    if isinstance(spec, (list, tuple)):
        kind, values = "grid", list(spec)
    elif isinstance(spec, Mapping) and len(spec) == 1 and next(iter(spec)) in DIMENSION_KINDS:
        kind, values = next(iter(spec.items()))
    else:
        raise ConfigError(f"search space key {key!r}: expected one of {{{', '.join(DIMENSION_KINDS)}: ...}} "
                          f"or a list, got {spec!r}")
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"search space key {key!r}: {kind} needs a list, got {values!r}")
    if kind in ("grid", "choice") and not values:
        raise ConfigError(f"search space key {key!r}: empty {kind} (give at least one value)")
    return kind, list(values)


def _knob_settings(key: str, kind: str, values: list[Any], base: ExperimentConfig) -> list[KnobSetting]:
    """The inference axis of one knob key: one :class:`KnobSetting` per grid value, each checked on ``base``."""
    if kind != "grid":
        raise ConfigError(f"search space key {key!r}: the inference-time axis is evaluated exhaustively; use grid, "
                          f"not {kind}")
    knob = KNOBS[key]
    out = []
    for v in values:
        value = tuple(v) if isinstance(v, (list, tuple)) else v
        if not knob.valid(value):
            raise ConfigError(f"search space key {key!r}: {v!r} is not {knob.expects}")
        setting = KnobSetting(key, value)
        _check_value(base, setting.overrides(), key, v)
        out.append(setting)
    return out


def _range(key: str, kind: str, values: list[Any]) -> list[float]:
    if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"search space key {key!r}: {kind} needs [low, high] numbers, got {values!r}")
    lo, hi = float(values[0]), float(values[1])
    if not lo < hi:
        raise ConfigError(f"search space key {key!r}: {kind} needs low < high, got {values!r}")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"search space key {key!r}: loguniform needs low > 0, got {lo!r}")
    return [lo, hi]


def _refuse_old_keys(key: str) -> None:
    if key in OLD_KNOB_KEYS:
        raise ConfigError(f"search space key {key!r} is now the config field {OLD_KNOB_KEYS[key]!r}: rename it")
    if key.split(".")[0] == "ats":
        raise ConfigError(f"search space key {key!r}: unknown; the inference-time keys are config fields: "
                          f"{', '.join(KNOBS)}")


def parse_space(space: Mapping[str, Any], base: ExperimentConfig) -> tuple[tuple[Dimension, ...],
                                                                          tuple[KnobSetting, ...]]:
    """Parse and validate a search space against ``base``: (training dimensions, inference-axis settings).

    ``space`` maps a dotted config key to ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or a bare list (a grid). Keys of :data:`pipeline.knobs.KNOBS` (grid only)
    give the inference-time settings. Every candidate value is applied to ``base`` and the config rebuilt,
    so an unknown key, a wrong type or an out-of-range value raises ConfigError naming the key.
    """
    if not isinstance(space, Mapping):
        raise ConfigError(f"search space must be a mapping of dotted keys, got {type(space).__name__}")
    dims: list[Dimension] = []
    settings: list[KnobSetting] = []
    for key, spec in space.items():
        kind, values = _split(key, spec)
        _refuse_old_keys(key)
        if key in KNOBS:
            settings.extend(_knob_settings(key, kind, values, base))
            continue
        if kind in ("uniform", "loguniform"):
            values = _range(key, kind, values)
        for v in values:
            _check_value(base, {key: v}, key, v)
        dims.append(Dimension(key, kind, tuple(values)))
    if len({s.label for s in settings}) != len(settings):
        raise ConfigError(f"search space: repeated knob settings {[s.label for s in settings]}")
    return tuple(dims), tuple(settings)


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs; ``base`` is the resolved (not yet finalized) experiment config."""

    base: ExperimentConfig
    dimensions: tuple[Dimension, ...] = ()
    knob_settings: tuple[KnobSetting, ...] = ()
    model: str = ""  # evaluation only: this model (models:/..., runs:/..., a folder) at every knob setting
    num_samples: int = 1
    max_concurrent: int = 0  # 0 = as many trials as the cluster's CPUs/GPUs hold
    grace_period: int = 1
    reduction_factor: int = 2
    gflops_samples: int = 64
    metric: str = METRIC
    source: str = ""  # preset name or YAML path, for the record

    @property
    def eval_only(self) -> bool:
        return bool(self.model)

    def expected_trials(self) -> int:
        """Trials the space asks for: the grid's points times ``num_samples``, or one per knob setting."""
        if self.eval_only:
            return len(self.knob_settings)
        n = self.num_samples
        for d in self.dimensions:
            n *= len(d.values) if d.kind == "grid" else 1
        return n

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "num_samples": self.num_samples,
                "max_concurrent": self.max_concurrent, "grace_period": self.grace_period,
                "reduction_factor": self.reduction_factor, "metric": self.metric,
                "space": {d.key: {d.kind: list(d.values)} for d in self.dimensions},
                "knob_settings": [s.label for s in self.knob_settings]}


def _read_sweep_file(space_file: str | Path) -> dict[str, Any]:
    path = Path(space_file)
    if not path.is_file():
        raise ConfigError(f"search space file {path} does not exist")
    loaded = load_yaml(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ConfigError(f"{path}: expected a mapping at top level")
    unknown = sorted(set(loaded) - SWEEP_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(SWEEP_KEYS))})")
    return dict(loaded)


def _check_eval_only(source: str, model: str, needs_model: bool, dims: tuple[Dimension, ...],
                     settings: tuple[KnobSetting, ...]) -> None:
    if needs_model and not model:
        raise ConfigError(f"sweep {source!r} evaluates an existing model at several knob settings: give --model "
                          "(models:/NAME@ALIAS, runs:/ID/model or a checkpoint folder)")
    if model and dims:
        raise ConfigError(f"an evaluation-only sweep over --model {model} does not train: remove the training keys "
                          f"{[d.key for d in dims]} or drop --model")
    if model and not settings:
        raise ConfigError(f"an evaluation-only sweep needs a grid over {' or '.join(KNOBS)} in its space")
    if not dims and not settings:
        raise ConfigError(f"sweep {source!r}: the search space is empty")


def load_sweep(sweeps: Mapping[str, Mapping[str, Any]], train_presets: Mapping[str, Any], preset: str = "",
               space_file: str | Path | None = None, overrides: Sequence[str] = (), *, model: str = "",
               num_samples: int | None = None, max_concurrent: int | None = None,
               grace_period: int | None = None) -> SweepSpec:
    """A SweepSpec from a named preset or a YAML file (the file wins where both give a key), the
    command-line overrides applied last to every trial's base config."""
    data: dict[str, Any] = {}
    source = preset
    if preset:
        if preset not in sweeps:
            raise ConfigError(f"unknown sweep preset {preset!r}; presets: {', '.join(sweeps)}")
        data.update(sweeps[preset])
    if space_file:
        data.update(_read_sweep_file(space_file))
        source = str(space_file)
    if not data:
        raise ConfigError("give a sweep preset or a search space file")
    base_name = data.get("base") or next(iter(train_presets))
    base = resolve_config(train_presets, base_name, {**as_assignments(data.get("overrides"), source),
                                                     **as_assignments(list(overrides), "command line")})
    dims, settings = parse_space(data.get("space") or {}, base)
    model = model or data.get("model") or ""
    _check_eval_only(source, model, bool(data.get("needs_model")), dims, settings)
    asha = data.get("asha") or {}
    spec = SweepSpec(base=base, dimensions=dims, knob_settings=settings, model=model,
                     num_samples=int(num_samples or data.get("num_samples") or 1),
                     max_concurrent=int(max_concurrent if max_concurrent is not None else data.get("max_concurrent", 0)),
                     grace_period=int(grace_period or asha.get("grace_period", 1)),
                     reduction_factor=int(asha.get("reduction_factor", 2)),
                     gflops_samples=int(data.get("gflops_samples", 64)), metric=str(data.get("metric", METRIC)),
                     source=source)
    if spec.num_samples < 1 or spec.max_concurrent < 0 or spec.grace_period < 1 or spec.reduction_factor < 2:
        raise ConfigError(f"sweep {source!r}: need num_samples >= 1, max_concurrent >= 0, grace_period >= 1, "
                          f"reduction_factor >= 2 (got {spec.describe()})")
    return spec
