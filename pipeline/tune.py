"""Ray Tune sweeps over Glimpse experiments, tracked in MLflow, with the accuracy-versus-GFLOPs frontier.

The papers' central results are trade-off curves: accuracy against GFLOPs as ATS's K varies (ATS Figs.
3-5), accuracy against token inflation (SparseFormer Table 6), the gain from fine-tuning epochs (ATS
Fig. 5b). A sweep here produces those points and picks one:

    spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke")
    result = run_sweep(spec, select="best", register="glimpse-ats", aliases=("best",))

Structure (Ray 2.60, Train V2):

* A search space is parsed from a preset or YAML (``parse_space``): grid / choice / uniform /
  log-uniform over any dotted ``ExperimentConfig`` key, checked by building the config with every
  candidate value, plus the inference-time axis ``ats.ratio`` / ``ats.k`` (a grid of K settings).
* Each Tune trial (``run_trial``) is a function that builds and fits the training issue's
  ``TorchTrainer`` (``Tuner(trainer)`` is not supported under Train V2), with
  ``TuneReportCallback`` so that every worker report reaches Tune and ASHA can stop the trial on
  ``val/top1``. The trial then evaluates the final checkpoint at every K setting on the same number
  of Ray Train workers (``k_eval_func``) and reports accuracy and measured average GFLOPs (kept
  tokens per sample) with ``ray.tune.report`` at its own level.
* K is an inference-time knob: a sweep given ``--model`` (a registered model, a run's model or a
  checkpoint folder) and only the K axis runs one evaluation-only trial per K; no training step
  is taken. A sweep crossing K with other keys (fine-tune epochs, lr) trains once per trial and
  evaluates every K on it.
* MLflow: one parent run per sweep (tag ``glimpse.run_name`` = the sweep name) and exactly one
  nested child run per trial: the training loop's own ``Tracker`` run, tagged
  ``mlflow.parentRunId``. (Ray's ``MLflowLoggerCallback`` + ``setup_mlflow`` would make two.)
  The parent gets ``frontier.csv`` (every trial and evaluated K), ``frontier.png`` (accuracy
  against GFLOPs, Pareto front drawn, ATS Fig. 4 style) and the selected model, registered with
  its aliases.
* ``resume=True`` restores the interrupted experiment (``Tuner.restore``): finished trials are kept,
  unfinished ones continue from their last training checkpoint under the same MLflow child run.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.config import ConfigError, ExperimentConfig, resolve_config

logger = logging.getLogger("glimpse.tune")

DIMENSION_KINDS = ("grid", "choice", "uniform", "loguniform")
K_KEYS = ("ats.ratio", "ats.k")
METRIC, MODE = "val/top1", "max"
TIME_ATTR = "epochs_done"
TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer, whose workers hold the real CPUs
K_EVAL_FILE = "k_eval.json"  # reported by the training loop at every epoch end (1-based)
SWEEP_KEYS = {"base", "overrides", "space", "num_samples", "max_concurrent", "asha", "needs_model", "model",
              "gflops_samples", "metric"}
Selection = Literal["best", "budget", "pareto"]


# --------------------------------------------------------------------------- search space


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


@dataclass(frozen=True)
class KSetting:
    """One inference-time ATS setting: ``k`` (count, one or one per stage) or ``ratio`` (rho, likewise).

    Neither = the model as built. Applied with ``models.ats.set_ats_k``; stored in a registered
    model's config as ``model.kwargs.ats_k`` / ``ats_ratio`` so that it loads at that K.
    """

    k: int | tuple[int, ...] | None = None
    ratio: float | tuple[float, ...] | None = None

    @property
    def label(self) -> str:
        def fmt(v: Any) -> str:
            return "-".join(f"{x:g}" for x in v) if isinstance(v, tuple) else f"{v:g}"

        if self.k is not None:
            return f"k_{fmt(self.k)}"
        if self.ratio is not None:
            return f"ratio_{fmt(self.ratio)}"
        return "as_built"

    def to_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return list(v) if isinstance(v, tuple) else v

        return {"k": plain(self.k), "ratio": plain(self.ratio)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KSetting:
        def tup(v: Any) -> Any:
            return tuple(v) if isinstance(v, (list, tuple)) else v

        return cls(k=tup(d.get("k")), ratio=tup(d.get("ratio")))

    def apply(self, model) -> None:
        if self.k is None and self.ratio is None:
            return
        from models.ats import set_ats_k

        set_ats_k(model, k=self.k, ratio=self.ratio)

    def model_kwargs(self) -> dict[str, Any]:
        """What to put in ``model.kwargs`` so a rebuilt model samples at this K."""
        if self.k is not None:
            return {"ats_k": self.to_dict()["k"], "ats_ratio": None}
        if self.ratio is not None:
            return {"ats_k": None, "ats_ratio": self.to_dict()["ratio"]}
        return {}


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(data))
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"search space key {key!r}: {p} is not a section")
    node[parts[-1]] = value
    return out


def apply_params(base: ExperimentConfig | Mapping[str, Any], params: Mapping[str, Any]) -> ExperimentConfig:
    """The base config with each dotted ``key: value`` of ``params`` set, validated."""
    data = base.to_dict() if isinstance(base, ExperimentConfig) else dict(base)
    for key, value in params.items():
        data = _set_dotted(data, key, value)
    return ExperimentConfig.from_dict(data)


def _check_value(base: ExperimentConfig, key: str, value: Any) -> None:
    try:
        apply_params(base, {key: value})
    except ConfigError as exc:
        raise ConfigError(f"search space key {key!r}, value {value!r}: {exc}") from None


def _parse_k_setting(key: str, value: Any) -> KSetting:
    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 1

    def fraction(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1

    ok = positive_int if key == "ats.k" else fraction
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if not items or not all(ok(v) for v in items):
        need = "a positive integer K" if key == "ats.k" else "a ratio rho in (0, 1]"
        raise ConfigError(f"search space key {key!r}: {value!r} is not {need} (or a list of them, one per stage)")
    v = items if isinstance(value, (list, tuple)) else value
    return KSetting(k=v) if key == "ats.k" else KSetting(ratio=float(v) if not isinstance(v, tuple) else
                                                         tuple(float(x) for x in v))


def parse_space(space: Mapping[str, Any], base: ExperimentConfig) -> tuple[tuple[Dimension, ...], tuple[KSetting, ...]]:
    """Parse and validate a search space against ``base``.

    ``space`` maps a dotted config key to ``{grid: [...]}``, ``{choice: [...]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or a bare list (a grid). ``ats.ratio`` / ``ats.k`` (grid or list only)
    give the inference-time K settings. Every candidate value is applied to ``base`` and the config
    rebuilt, so an unknown key, a wrong type or an out-of-range value raises ConfigError naming the key.
    """
    if not isinstance(space, Mapping):
        raise ConfigError(f"search space must be a mapping of dotted keys, got {type(space).__name__}")
    dims: list[Dimension] = []
    k_settings: list[KSetting] = []
    for key, spec in space.items():
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
        if key in K_KEYS:
            if kind != "grid":
                raise ConfigError(f"search space key {key!r}: the K axis is evaluated exhaustively; use grid, "
                                  f"not {kind}")
            k_settings.extend(_parse_k_setting(key, v) for v in values)
            continue
        if key.split(".")[0] == "ats":
            raise ConfigError(f"search space key {key!r}: unknown inference-time key (known: {', '.join(K_KEYS)})")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ConfigError(f"search space key {key!r}: {kind} needs [low, high] numbers, got {values!r}")
            lo, hi = float(values[0]), float(values[1])
            if not lo < hi:
                raise ConfigError(f"search space key {key!r}: {kind} needs low < high, got {values!r}")
            if kind == "loguniform" and lo <= 0:
                raise ConfigError(f"search space key {key!r}: loguniform needs low > 0, got {lo!r}")
            values = [lo, hi]
        for v in values:
            _check_value(base, key, v)
        dims.append(Dimension(key, kind, tuple(values)))
    if len({s.label for s in k_settings}) != len(k_settings):
        raise ConfigError(f"search space: repeated K settings {[s.label for s in k_settings]}")
    return tuple(dims), tuple(k_settings)


# --------------------------------------------------------------------------- sweep spec


@dataclass(frozen=True)
class SweepSpec:
    """Everything a sweep needs; ``base`` is the resolved (not yet finalized) experiment config."""

    base: ExperimentConfig
    dimensions: tuple[Dimension, ...] = ()
    k_settings: tuple[KSetting, ...] = ()
    model: str = ""  # K-only: evaluate this model (models:/..., runs:/..., a folder) instead of training
    num_samples: int = 1
    max_concurrent: int = 0  # 0 = as many trials as the cluster's CPUs/GPUs hold
    grace_period: int = 1
    reduction_factor: int = 2
    gflops_samples: int = 64
    metric: str = METRIC
    source: str = ""  # preset name or YAML path, for the record

    @property
    def k_only(self) -> bool:
        return bool(self.model)

    def describe(self) -> dict[str, Any]:
        return {"source": self.source, "model": self.model, "num_samples": self.num_samples,
                "max_concurrent": self.max_concurrent, "grace_period": self.grace_period,
                "reduction_factor": self.reduction_factor, "metric": self.metric,
                "space": {d.key: {d.kind: list(d.values)} for d in self.dimensions},
                "k_settings": [s.label for s in self.k_settings]}


def _overrides_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value.items()]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(f"{where}: overrides must be a mapping or a list of key=value strings, got {value!r}")


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
        path = Path(space_file)
        if not path.is_file():
            raise ConfigError(f"search space file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path}: expected a mapping at top level")
        unknown = sorted(set(loaded) - SWEEP_KEYS)
        if unknown:
            raise ConfigError(f"{path}: unknown key {unknown[0]!r} (valid: {', '.join(sorted(SWEEP_KEYS))})")
        data.update(loaded)
        source = str(path)
    if not data:
        raise ConfigError("give a sweep preset or a search space file")
    base_name = data.get("base") or next(iter(train_presets))
    base = resolve_config(train_presets, base_name, [*_overrides_list(data.get("overrides"), source),
                                                     *overrides])
    dims, k_settings = parse_space(data.get("space") or {}, base)
    model = model or data.get("model") or ""
    if data.get("needs_model") and not model:
        raise ConfigError(f"sweep {source!r} evaluates an existing model at several K: give --model "
                          "(models:/NAME@ALIAS, runs:/ID/model or a checkpoint folder)")
    if model and dims:
        raise ConfigError(f"a K-only sweep over --model {model} evaluates, it does not train: remove the training "
                          f"keys {[d.key for d in dims]} or drop --model")
    if model and not k_settings:
        raise ConfigError("a K-only sweep needs an ats.ratio or ats.k grid in its space")
    if not dims and not k_settings:
        raise ConfigError(f"sweep {source!r}: the search space is empty")
    asha = data.get("asha") or {}
    spec = SweepSpec(base=base, dimensions=dims, k_settings=k_settings, model=model,
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


# --------------------------------------------------------------------------- selection


def pareto_front(rows: Sequence[Mapping[str, Any]], acc: str = "top1", cost: str = "gflops") -> list[Mapping[str, Any]]:
    """Rows no other row dominates (at most the cost and strictly more accurate, or cheaper and as
    accurate), sorted by cost. Rows without a number for either are ignored."""
    valid = [r for r in rows if _num(r.get(acc)) and _num(r.get(cost))]
    front, best = [], -math.inf
    for r in sorted(valid, key=lambda r: (r[cost], -r[acc])):
        if r[acc] > best:
            front.append(r)
            best = r[acc]
    return front


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def select_rows(rows: Sequence[Mapping[str, Any]], how: Selection = "best",
                gflops_budget: float | None = None) -> list[Mapping[str, Any]]:
    """The selected operating point(s) among complete rows: the most accurate (ties: fewer GFLOPs),
    the most accurate within ``gflops_budget``, or the whole Pareto front (cheapest first)."""
    complete = [r for r in rows if r.get("status") == "complete" and _num(r.get("top1"))]
    if not complete:
        raise ValueError("no trial finished with an evaluation: nothing to select")
    if how == "pareto":
        return pareto_front(complete)
    if how == "budget":
        if gflops_budget is None:
            raise ValueError("selection 'budget' needs --gflops-budget")
        complete = [r for r in complete if _num(r.get("gflops")) and r["gflops"] <= gflops_budget]
        if not complete:
            cheapest = min((r["gflops"] for r in rows if _num(r.get("gflops"))), default=float("nan"))
            raise ValueError(f"no evaluated point within {gflops_budget} GFLOPs (the cheapest costs {cheapest:.4g})")
    elif how != "best":
        raise ValueError(f"unknown selection {how!r} (best, budget, pareto)")
    return [max(complete, key=lambda r: (r["top1"], -(r.get("gflops") or 0.0)))]


# --------------------------------------------------------------------------- workers: evaluation at every K


def _load_for_eval(source: Any, tracking_uri: str, device: str):
    """(model with EMA weights if the checkpoint has them, meta, training step) from a Ray
    Checkpoint, a checkpoint folder or an MLflow model URI; nothing is unpickled."""
    from pipeline import checkpointing
    from pipeline.model_store import load_model

    if hasattr(source, "as_directory"):  # a ray.train.Checkpoint (local or remote storage)
        with source.as_directory() as directory:
            return _load_for_eval(str(directory), tracking_uri, device)
    if Path(str(source)).is_dir() and (Path(source) / checkpointing.STATE_FILE).is_file():
        model, meta = load_model(str(source), device=device)
        state = checkpointing.load_state(source)
        if "ema" in state:  # the training loop evaluates the EMA weights when there are some
            model.load_state_dict(state["ema"])
        return model, meta, int(state.get("step", 0))
    model, meta = load_model(str(source), tracking_uri=tracking_uri or None, device=device)
    return model, meta, 0


def k_eval_func(config: dict[str, Any]) -> None:
    """Ray Train worker: evaluate one model at every K setting (no training step).

    ``config``: experiment, runtime; ``runtime["k_eval"]`` holds source (a Checkpoint, a folder or a
    model URI), settings (KSetting dicts), gflops_samples and fresh_run. Rank 0 logs to the trial's MLflow run and reports, flattened,
    ``k{i}/top1``, ``k{i}/top5``, ``k{i}/loss``, ``k{i}/gflops``, ``k{i}/num_samples``.
    """
    import ray.train  # RAY
    import ray.train.torch  # RAY
    import torch

    from pipeline.tracking import Tracker, environment_info
    from pipeline.train_loop import evaluate_model, measure_average_gflops

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = ExperimentConfig.from_dict(config["experiment"])
    runtime = config["runtime"]
    job = runtime["k_eval"]
    torch.set_num_threads(max(1, int(runtime.get("threads_per_worker", 1))))
    ctx = ray.train.get_context()  # RAY
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # RAY
    model, meta, step = _load_for_eval(job["source"], runtime["tracking_uri"], str(device))
    classes = tuple(meta.get("classes") or runtime["classes"])
    tracker = None
    if rank == 0:
        tracker = Tracker(runtime["tracking_uri"], cfg.tracking.experiment, runtime["run_name"],
                          artifact_root=runtime.get("artifact_root"))
        tracker.set_tags({"glimpse.checkpoint": str(getattr(job["source"], "path", job["source"]))})
        if job["fresh_run"]:  # K-only trials: this is the trial's one MLflow run
            tracker.log_params({**cfg.flat(), "model.source": str(job["source"])})
            tracker.set_tags({**environment_info(world_size, str(device)), "glimpse.model": cfg.model.name,
                              "mlflow.parentRunId": runtime.get("parent_run_id", ""),
                              **(runtime.get("extra_tags") or {})})
    out: dict[str, float] = {}
    for i, setting_dict in enumerate(job["settings"]):
        setting = KSetting.from_dict(setting_dict)
        setting.apply(model)
        summary = evaluate_model(model, cfg, runtime["val"], views=tuple(runtime["views"]), rank=rank,
                                 world_size=world_size, device=device, classes=classes)
        if rank == 0 and summary is not None:
            gflops = measure_average_gflops(model, cfg, runtime["val"], int(job["gflops_samples"]))
            row = {"top1": summary["top1"], "top5": summary["top5"], "loss": summary["loss"], "gflops": gflops,
                   "num_samples": float(summary["num_videos"])}
            out.update({f"k{i}/{name}": float(v) for name, v in row.items()})
            tracker.log_metrics({f"eval/{name}/{setting.label}": v for name, v in row.items()}, step=step)
            logger.info("K setting %s: top-1 %.4f, %.4f GFLOPs per sample", setting.label, row["top1"], gflops)
    if tracker is not None:
        tracker.close()
    # Train V2 keeps a run's metrics with its checkpoints only: rank 0 hands its results over as one.
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            (Path(tmp) / K_EVAL_FILE).write_text(json.dumps(out))
            ckpt = ray.train.Checkpoint.from_directory(tmp)  # RAY
        ray.train.report({**out, "done": 1}, checkpoint=ckpt)  # RAY: every rank (a barrier)


# --------------------------------------------------------------------------- the Tune trial


def _trial_cfg(static: Mapping[str, Any], params: Mapping[str, Any], trial_id: str) -> ExperimentConfig:
    base = ExperimentConfig.from_dict(static["base"])
    cfg = apply_params(base, {k: v for k, v in params.items() if k != "ats"})
    cluster = dataclasses.replace(cfg.cluster, name=f"{static['sweep']}-{trial_id}",
                                  storage_path=static["train_storage"])
    # Trials never register: the sweep registers what it selects. Evaluation happens per K afterwards.
    tracking = dataclasses.replace(cfg.tracking, register="", tracking_uri=static["tracking_uri"])
    ev = dataclasses.replace(cfg.eval, at_end=False)
    return dataclasses.replace(cfg, cluster=cluster, tracking=tracking, eval=ev)


def _tune_report_callback():
    """Tune's ``TuneReportCallback`` without the training loop's final ``done`` flag: to Tune, ``done``
    ends the trial at once, before this trial's evaluation at every K has run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class _Callback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            renamed = [{("train/done" if k == "done" else k): v for k, v in m.items()} for m in metrics]
            super().after_report(run_context, renamed, checkpoint)

    return _Callback()


def _fit(trainer) -> Any:
    result = trainer.fit()
    if getattr(result, "error", None):
        raise RuntimeError(f"trial run failed: {result.error}")
    return result


def run_trial(config: dict[str, Any], static: dict[str, Any]) -> None:
    """The Tune trainable: train (unless K-only), evaluate every K, report accuracy and GFLOPs."""
    import ray.tune

    from pipeline.launcher import build_trainer, runtime_info

    trial_id = ray.tune.get_context().get_trial_id()
    if static["model"]:  # K-only: the model's own config says what data and views it was trained with
        cfg = _trial_cfg({**static, "base": static["model_experiment"]}, {}, trial_id)
        settings = [config["ats"]]
    else:
        cfg = _trial_cfg(static, config, trial_id)
        settings = static["k_settings"] or [KSetting().to_dict()]
    runtime = runtime_info(cfg)
    runtime.update(parent_run_id=static["parent_run_id"], gflops_samples=static["gflops_samples"],
                   extra_tags={"glimpse.sweep": static["sweep"], "glimpse.trial_id": trial_id},
                   log_final_model=False)  # the child run references its checkpoint; the sweep logs its pick
    epochs_done, checkpoint_path = 0, ""
    if static["model"]:
        source: Any = static["model"]
        checkpoint_path = source
    else:
        result = _fit(build_trainer(cfg, runtime, callbacks=[_tune_report_callback()]))
        if result.checkpoint is None:
            raise RuntimeError(f"trial {trial_id} finished without a checkpoint")
        source, checkpoint_path = result.checkpoint, result.checkpoint.path
        epochs_done = cfg.train.epochs
    # Evaluation at every K on the same number of Ray Train workers; Tune does not see these reports.
    ev_cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, name=f"{cfg.cluster.name}-eval",
                                                                  max_failures=0))
    ev_runtime = {**runtime, "run_dir": f"{runtime['run_dir']}-eval",
                  "k_eval": {"source": source, "settings": settings, "gflops_samples": static["gflops_samples"],
                             "fresh_run": bool(static["model"])}}
    ev_result = _fit(build_trainer(ev_cfg, ev_runtime, train_func=k_eval_func))
    if ev_result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: the evaluation at every K returned no results")
    with ev_result.checkpoint.as_directory() as directory:
        metrics = json.loads((Path(directory) / K_EVAL_FILE).read_text())
    rows = []
    for i, s in enumerate(settings):
        if f"k{i}/top1" not in metrics:
            raise RuntimeError(f"trial {trial_id}: no evaluation for K setting {KSetting.from_dict(s).label}")
        rows.append({"setting": KSetting.from_dict(s).label, **{n: metrics[f"k{i}/{n}"] for n in
                                                               ("top1", "top5", "loss", "gflops", "num_samples")}})
    head = max(rows, key=lambda r: (r["top1"], -r["gflops"]))
    report = {METRIC: head["top1"], "val/top5": head["top5"], "val/gflops": head["gflops"], "k_setting": head["setting"],
              TIME_ATTR: epochs_done, "sweep/complete": 1, "sweep/rows": json.dumps(rows),
              "sweep/checkpoint": checkpoint_path, "sweep/run_name": cfg.cluster.name}
    if "://" not in runtime["run_dir"]:
        run_dir = Path(runtime["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "sweep_result.json").write_text(json.dumps(report, indent=2))
    ray.tune.report(report)  # RAY Tune: at the trial's own level, not ray.train.report


# --------------------------------------------------------------------------- driver


class SweepInterrupted(RuntimeError):
    """The sweep stopped before all its trials finished (it can be resumed)."""


@dataclass
class SweepResult:
    name: str
    experiment_path: str
    tracking_uri: str
    parent_run_id: str
    rows: list[dict[str, Any]]
    selected: list[dict[str, Any]]
    registered: list[dict[str, Any]] = field(default_factory=list)
    csv_path: str = ""
    png_path: str = ""
    num_stopped: int = 0


def _max_concurrent(spec: SweepSpec) -> int:
    import ray

    if spec.max_concurrent:
        return spec.max_concurrent
    c = spec.base.cluster
    cpus = ray.cluster_resources().get("CPU", 1.0)
    # A trial holds its own token CPU share besides its workers' CPUs: counting it matters, as a trial
    # whose workers cannot be placed fails after Ray Train's 60 s worker-group startup timeout.
    return max(1, int(cpus // (c.num_workers * c.cpus_per_worker + TRIAL_CPU)))


def _rows_from_results(results, spec: SweepSpec, name: str) -> tuple[list[dict[str, Any]], int]:
    """One row per (trial, K setting) for complete trials; one per trial stopped early (its last
    validation, at the model's training K)."""
    rows, stopped = [], 0
    keys = [d.key for d in spec.dimensions]
    for r in results:
        cfg = r.config or {}
        params = {k: cfg.get(k) for k in keys}
        m = r.metrics or {}
        trial_id = str(m.get("trial_id", ""))
        common = {"trial_id": trial_id, "run_name": m.get("sweep/run_name") or f"{name}-{trial_id}", **params}
        if m.get("sweep/complete"):
            for row in json.loads(m["sweep/rows"]):
                setting = row.pop("setting")
                rows.append({**common, "status": "complete", "epochs_done": m.get(TIME_ATTR), "setting": setting,
                             **row, "checkpoint": m.get("sweep/checkpoint", "")})
            continue
        stopped += 1
        df = r.metrics_dataframe
        last = {}
        if df is not None and METRIC in df.columns:
            val = df[df[METRIC].notna()]
            if len(val):
                last = val.iloc[-1].to_dict()
        rows.append({**common, "status": "stopped" if r.error is None else "failed",
                     "epochs_done": last.get(TIME_ATTR, m.get(TIME_ATTR)), "setting": "as_trained",
                     "top1": last.get(METRIC), "top5": last.get("val/top5"), "loss": last.get("val/loss"),
                     "gflops": last.get("val/gflops"), "num_samples": None, "checkpoint": m.get("checkpoint_path", "")})
    return rows, stopped


def write_frontier_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    front = {id(r) for r in pareto_front([r for r in rows if r.get("status") == "complete"])}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*columns, "pareto"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "pareto": int(id(r) in front)})
    return path


def plot_frontier(rows: Sequence[Mapping[str, Any]], selected: Sequence[Mapping[str, Any]], path: Path,
                  title: str = "") -> Path:
    """Accuracy against GFLOPs, one marker per evaluated point, colour per trial, the Pareto front
    as a step line and the selected point(s) ringed (the layout of ATS Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    trials = sorted({r["trial_id"] for r in rows})
    cmap = plt.get_cmap("tab10")
    for i, t in enumerate(trials):
        pts = [r for r in rows if r["trial_id"] == t and _num(r.get("gflops")) and _num(r.get("top1"))]
        done = [r for r in pts if r["status"] == "complete"]
        early = [r for r in pts if r["status"] != "complete"]
        if done:
            ax.plot([r["gflops"] for r in done], [100 * r["top1"] for r in done], "o", color=cmap(i % 10),
                    label=f"trial {t}", alpha=0.85)
        if early:
            ax.plot([r["gflops"] for r in early], [100 * r["top1"] for r in early], "x", color=cmap(i % 10),
                    label=f"trial {t} (stopped)", alpha=0.85)
    front = pareto_front([r for r in rows if r["status"] == "complete"])
    if front:
        ax.step([r["gflops"] for r in front], [100 * r["top1"] for r in front], where="post", color="black",
                lw=1.5, marker="D", ms=4, label="Pareto front")
    for r in selected:
        ax.plot([r["gflops"]], [100 * r["top1"]], "o", ms=14, mfc="none", mec="red", mew=2)
    ax.set_xlabel("average GFLOPs per sample (kept tokens)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs. GFLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _register_selected(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, parent, register: str,
                       aliases: Sequence[str], how: Selection, workdir: Path) -> list[dict[str, Any]]:
    """Log each selected point's model (its weights, its K in the config) to the parent run and
    register it; the first alias list goes to the most accurate, ``pareto-<i>`` to front points."""
    from mlflow.tracking import MlflowClient

    from pipeline.model_store import log_final_model

    best = max(rows, key=lambda r: (r["top1"], -r["gflops"]))
    out = []
    for i, row in enumerate(rows):
        source: Any = row["checkpoint"]
        if "://" in str(source) and not str(source).startswith(("models:", "runs:")):
            from ray.train import Checkpoint

            source = Checkpoint(path=source)
        model, meta, _ = _load_for_eval(source, parent.tracking_uri, "cpu")
        setting = next((s for s in spec.k_settings if s.label == row["setting"]), KSetting())
        setting.apply(model)
        cfg = ExperimentConfig.from_dict(meta["experiment"])
        kwargs = {k: v for k, v in {**cfg.model.kwargs, **setting.model_kwargs()}.items() if v is not None}
        names = list(aliases) if row is best else []
        if how == "pareto":
            names.append(f"pareto-{i}")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kwargs=kwargs),
                                  tracking=dataclasses.replace(cfg.tracking, register=register,
                                                               aliases=tuple(names)))
        runtime = {"run_dir": str(workdir / f"selected-{i}"), "num_classes": meta["num_classes"],
                   "classes": meta.get("classes", [])}
        summary = {"top1": row["top1"], "top5": row["top5"], "gflops": row["gflops"], "setting": row["setting"],
                   "trial_id": row["trial_id"]}
        logged = log_final_model(parent, model.cpu().eval(), cfg, runtime, summary)
        if "registered_version" not in logged:
            raise RuntimeError(f"could not register the selected model of trial {row['trial_id']} as {register}")
        client = MlflowClient(parent.tracking_uri)
        for k, v in {"gflops": f"{row['gflops']:.6g}", "k_setting": row["setting"], "trial_id": row["trial_id"],
                     "trial_run": row["run_name"], "sweep": parent.run_name}.items():
            client.set_model_version_tag(register, str(logged["registered_version"]), k, v)
        out.append({**logged, "trial_id": row["trial_id"], "setting": row["setting"]})
    return out


def run_sweep(spec: SweepSpec, *, name: str = "", resume: bool = False, select: Selection = "best",
              gflops_budget: float | None = None, register: str = "", aliases: Sequence[str] = ("best",),
              address: str = "") -> SweepResult:
    """Run (or resume) the sweep on Ray Tune, then write the frontier and register the selection."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.launcher import finalize, init_ray, is_local
    from pipeline.tracking import Tracker, default_tracking_uri

    # Training reports carry val/top1 only at validation epochs: Tune must accept the other reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    base = finalize(spec.base)
    storage = base.cluster.storage_path
    name = name or base.cluster.name.replace(base.model.name, f"sweep-{base.model.name}", 1)
    tracking_uri = base.tracking.tracking_uri or default_tracking_uri(storage)
    artifact_root = (Path(storage) / "mlartifacts").as_uri() if tracking_uri.startswith("sqlite:") and \
        is_local(storage) else None
    init_ray(address or base.cluster.address)
    experiment_path = f"{storage.rstrip('/')}/{name}"
    if resume and not ray.tune.Tuner.can_restore(experiment_path):
        raise ValueError(f"--resume: no restorable sweep at {experiment_path} (run it once without --resume, "
                         "with the same --name)")

    parent = Tracker(tracking_uri, base.tracking.experiment, name, artifact_root=artifact_root)
    parent.log_params({"sweep.source": spec.source, "sweep.space": json.dumps(spec.describe()["space"]),
                       "sweep.k_settings": ",".join(spec.describe()["k_settings"]), "sweep.model": spec.model,
                       "sweep.num_samples": spec.num_samples, "sweep.select": select,
                       "sweep.gflops_budget": gflops_budget, "sweep.metric": spec.metric})
    parent.set_tags({"glimpse.kind": "sweep", "glimpse.model": base.model.name})
    parent_run_id = parent.ensure_run()
    if not parent.flush():
        raise RuntimeError(f"MLflow at {tracking_uri} is unreachable: a sweep needs it to nest its trial runs")

    static: dict[str, Any] = {"sweep": name, "base": base.to_dict(), "parent_run_id": parent_run_id,
                              "tracking_uri": tracking_uri, "train_storage": f"{storage.rstrip('/')}/{name}.trials",
                              "k_settings": [s.to_dict() for s in spec.k_settings], "model": spec.model,
                              "gflops_samples": spec.gflops_samples, "model_experiment": None}
    if spec.model:
        from pipeline.model_store import load_model

        _, meta = load_model(spec.model, tracking_uri=tracking_uri)
        model_cfg = ExperimentConfig.from_dict(meta["experiment"])
        # The model's data and views, this sweep's cluster and tracking.
        static["model_experiment"] = dataclasses.replace(model_cfg, cluster=base.cluster,
                                                         tracking=base.tracking).to_dict()
        param_space = {"ats": ray.tune.grid_search([s.to_dict() for s in spec.k_settings])}
    else:
        param_space = {d.key: d.to_tune() for d in spec.dimensions}

    # The trial function only waits on its TorchTrainer, whose workers reserve the CPUs/GPUs; Tune
    # refuses an empty resource request, so the trial itself takes a token share of one CPU.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, static=static), {"cpu": TRIAL_CPU})
    if resume:
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, param_space=param_space)
    else:
        scheduler = None
        if not spec.k_only:
            scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=max(base.train.epochs, spec.grace_period),
                                      grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
        tuner = ray.tune.Tuner(
            trainable, param_space=param_space,
            tune_config=ray.tune.TuneConfig(metric=spec.metric, mode=MODE, scheduler=scheduler,
                                            num_samples=spec.num_samples, max_concurrent_trials=_max_concurrent(spec)),
            run_config=ray.tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                          failure_config=ray.tune.FailureConfig(max_failures=0)))
    started = time.time()
    results = tuner.fit()
    # Ctrl-C / SIGINT: Tune saves the experiment and returns; the grid's later trials may not exist yet
    # and the running one looks like a result. Compare against the trials the space asks for.
    trials = results._experiment_analysis.trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    expected = spec.num_samples * math.prod(len(d.values) for d in spec.dimensions if d.kind == "grid") \
        if not spec.k_only else len(spec.k_settings)
    if unfinished or len(trials) < expected:  # select nothing from a partial sweep
        parent.close(status="KILLED")
        raise SweepInterrupted(f"sweep {name} interrupted with {len(trials) - len(unfinished)} of {expected} trials "
                               f"finished; continue it with --resume --name {name}")
    rows, stopped = _rows_from_results(results, spec, name)
    _close_unfinished_children(tracking_uri, base.tracking.experiment, parent_run_id)

    workdir = Path(tempfile.mkdtemp(prefix="glimpse-sweep-"))
    if is_local(storage):
        workdir = Path(experiment_path) / "frontier"
        workdir.mkdir(parents=True, exist_ok=True)
    selected: list[dict[str, Any]] = []
    registered: list[dict[str, Any]] = []
    error = None
    try:
        selected = [dict(r) for r in select_rows(rows, select, gflops_budget)]
    except ValueError as exc:
        error = str(exc)
        logger.error("selection: %s", exc)
    csv_path = write_frontier_csv(rows, workdir / "frontier.csv")
    png_path = plot_frontier(rows, selected, workdir / "frontier.png", title=f"{name}: accuracy vs. GFLOPs")
    parent.log_artifact(csv_path)
    parent.log_artifact(png_path)
    complete = [r for r in rows if r["status"] == "complete"]
    if complete:
        best = max(complete, key=lambda r: (r["top1"], -r["gflops"]))
        parent.log_metrics({"best/top1": best["top1"], "best/gflops": best["gflops"]}, step=0)
    parent.log_metrics({"sweep/trials": len({r["trial_id"] for r in rows}), "sweep/stopped_early": stopped,
                        "sweep/points": len(rows), "sweep/wall_s": time.time() - started}, step=0)
    if selected:
        parent.set_tags({"glimpse.selected": json.dumps([{k: r[k] for k in ("trial_id", "setting", "top1", "gflops")}
                                                         for r in selected])})
    parent.flush()
    if selected and register:
        registered = _register_selected(selected, spec, parent, register, aliases, select, workdir)
    parent.close(status="FINISHED" if error is None else "FAILED")
    return SweepResult(name=name, experiment_path=experiment_path, tracking_uri=tracking_uri,
                       parent_run_id=parent_run_id, rows=rows, selected=selected, registered=registered,
                       csv_path=str(csv_path), png_path=str(png_path), num_stopped=stopped)


def _close_unfinished_children(tracking_uri: str, experiment: str, parent_run_id: str) -> None:
    """Trials that ASHA stopped never closed their MLflow run: mark them KILLED, tagged why."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
                                                                      "and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, "glimpse.tune.status", "stopped_early")
        client.set_terminated(run.info.run_id, status="KILLED")


def child_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> list[Any]:
    """The sweep's trial runs in MLflow (for reports and tests)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


# --------------------------------------------------------------------------- command line


def tune_main(argv: Sequence[str] | None, description: str, sweeps: Mapping[str, Mapping[str, Any]],
              train_presets: Mapping[str, Any], default: str = "demo") -> int:
    """``jobs/tune_*.py``: parse, run the sweep, print the selection. Exit 0 ok, 1 failed, 2 bad input."""
    import argparse
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="overrides: dotted keys applied to every trial, e.g. train.epochs=3 "
                                       "cluster.num_workers=2 data.train=/shards/train")
    p.add_argument("overrides", nargs="*", help="key.sub=value settings for every trial")
    p.add_argument("--preset", default=None, choices=list(sweeps),
                   help=f"named sweep (default {default} unless --space is given)")
    p.add_argument("--space", help="YAML sweep file (base, overrides, space, num_samples, asha, model)")
    p.add_argument("--model", default="", help="K-only sweep: evaluate this model (models:/NAME@ALIAS, runs:/ID/model, "
                                               "a checkpoint folder) at every K; no training")
    p.add_argument("--num-samples", type=int, default=None, help="samples of the random dimensions (x grid)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster holds)")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--select", choices=["best", "budget", "pareto"], default=None,
                   help="best accuracy, best within --gflops-budget, or the whole Pareto front")
    p.add_argument("--gflops-budget", type=float, default=None, help="GFLOPs per sample allowed (implies budget)")
    p.add_argument("--register", default="", help="register the selected model under this MLflow name")
    p.add_argument("--alias", action="append", default=None, help="alias(es) of the selected model (default best)")
    p.add_argument("--name", default="", help="sweep name (the same name with --resume continues it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep, keeping finished trials")
    p.add_argument("--print-space", action="store_true", help="print the parsed sweep and exit")
    args = p.parse_args(argv)
    preset = args.preset if args.preset or args.space else default
    overrides = list(args.overrides) + ([f"cluster.name={args.name}"] if args.name else [])
    try:
        spec = load_sweep(sweeps, train_presets, preset or "", args.space, overrides, model=args.model,
                          num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                          grace_period=args.grace_period)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# sweep {spec.source}\n{yaml.safe_dump(spec.describe(), sort_keys=False)}", flush=True)
    if args.print_space:
        return 0
    select: Selection = args.select or ("budget" if args.gflops_budget is not None else "best")
    try:
        result = run_sweep(spec, name=args.name, resume=args.resume, select=select, gflops_budget=args.gflops_budget,
                           register=args.register or spec.base.tracking.register, aliases=args.alias or ["best"])
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    for r in result.rows:
        print(json.dumps({k: r[k] for k in ("trial_id", "status", "setting", "top1", "gflops") if k in r}))
    print(f"sweep {result.name}: {len(result.rows)} points, {result.num_stopped} trials stopped early; "
          f"frontier {result.csv_path}, {result.png_path}; MLflow {result.tracking_uri} parent run "
          f"{result.parent_run_id}", flush=True)
    for s in result.selected:
        print(f"selected: trial {s['trial_id']} at {s['setting']}: top-1 {s['top1']:.4f}, {s['gflops']:.4g} GFLOPs",
              flush=True)
    for r in result.registered:
        print(f"registered {r['registered_name']} version {r['registered_version']} aliases {r['aliases']}", flush=True)
    return 0 if result.selected else 1
