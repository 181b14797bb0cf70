"""The sweep driver: a parent MLflow run, the Tune experiment (new or restored), the frontier, the selection.

    result = run_sweep(spec, name="my-sweep", select="best", register="glimpse-ats", aliases=("best",))
    result = run_sweep(spec, name="my-sweep", resume=True)      # after Ctrl-C: finished trials are kept

Only Ray Tune's public API is used: ``Tuner`` / ``Tuner.restore`` / ``Tuner.can_restore`` and the
``ResultGrid`` (``num_terminated``, ``num_errors`` and each ``Result``'s config and metrics).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.context import finalize, is_local, tracking_location
from pipeline.sweep.register import close_unfinished_children, register_selected
from pipeline.sweep.report import plot_frontier, rows_from_results, write_frontier_csv
from pipeline.sweep.select import Selection, most_accurate, select_rows
from pipeline.sweep.space import MODE, SweepSpec
from pipeline.sweep.trial import KNOB_PARAM, TIME_ATTR, TrialPlan, run_trial

logger = logging.getLogger("glimpse.sweep")

TRIAL_CPU = 0.01  # the trial function only waits on its TorchTrainer, whose workers hold the real CPUs


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


def _open_parent(spec: SweepSpec, base: ExperimentConfig, name: str, select: Selection,
                 gflops_budget: float | None):
    """The sweep's parent MLflow run (params and tags logged); a sweep cannot nest its trials without it."""
    from pipeline.tracking import Tracker

    uri, root = tracking_location(base)
    parent = Tracker(uri, base.tracking.experiment, name, artifact_root=root or None)
    described = spec.describe()
    parent.log_params({"sweep.source": spec.source, "sweep.space": json.dumps(described["space"]),
                       "sweep.knob_settings": ",".join(described["knob_settings"]), "sweep.model": spec.model,
                       "sweep.num_samples": spec.num_samples, "sweep.select": select,
                       "sweep.gflops_budget": gflops_budget, "sweep.metric": spec.metric})
    parent.set_tags({"glimpse.kind": "sweep", "glimpse.model": base.model.name})
    parent.ensure_run()
    if not parent.flush():
        raise RuntimeError(f"MLflow at {uri} is unreachable: a sweep needs it to nest its trial runs")
    return parent


def _plan(spec: SweepSpec, base: ExperimentConfig, name: str, parent) -> tuple[TrialPlan, dict[str, Any]]:
    """What every trial shares, and Tune's parameter space."""
    import ray.tune

    storage = base.cluster.storage_path
    # Trials finalise their own config; the base only gets this sweep's absolute storage path.
    trial_base = dataclasses.replace(spec.base, cluster=dataclasses.replace(spec.base.cluster, storage_path=storage))
    plan = TrialPlan(sweep=name, base=trial_base, parent_run_id=parent.ensure_run(), tracking_uri=parent.tracking_uri,
                     trial_storage=f"{storage.rstrip('/')}/{name}.trials", knob_settings=spec.knob_settings,
                     model=spec.model, gflops_samples=spec.gflops_samples)
    if not spec.eval_only:
        return plan, {d.key: d.to_tune() for d in spec.dimensions}
    from pipeline.tracking.model_store import load_model

    _, meta = load_model(spec.model, tracking_uri=parent.tracking_uri)
    # The model's data and views, this sweep's cluster and tracking.
    model_cfg = dataclasses.replace(ExperimentConfig.from_dict(meta["experiment"]), cluster=base.cluster,
                                    tracking=base.tracking)
    return dataclasses.replace(plan, model_cfg=model_cfg), \
        {KNOB_PARAM: ray.tune.grid_search([s.to_dict() for s in spec.knob_settings])}


def _tuner(spec: SweepSpec, base: ExperimentConfig, plan: TrialPlan, param_space: dict[str, Any], name: str,
           experiment_path: str, resume: bool):
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler

    # The trial function only waits on its TorchTrainer, whose workers reserve the CPUs/GPUs; Tune
    # refuses an empty resource request, so the trial itself takes a token share of one CPU.
    trainable = ray.tune.with_resources(ray.tune.with_parameters(run_trial, plan=plan), {"cpu": TRIAL_CPU})
    if resume:
        return ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=True, param_space=param_space)
    scheduler = None
    if not spec.eval_only:
        scheduler = ASHAScheduler(time_attr=TIME_ATTR, max_t=max(base.train.epochs, spec.grace_period),
                                  grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)
    return ray.tune.Tuner(
        trainable, param_space=param_space,
        tune_config=ray.tune.TuneConfig(metric=spec.metric, mode=MODE, scheduler=scheduler,
                                        num_samples=spec.num_samples, max_concurrent_trials=_max_concurrent(spec)),
        run_config=ray.tune.RunConfig(name=name, storage_path=base.cluster.storage_path, verbose=1,
                                      failure_config=ray.tune.FailureConfig(max_failures=0)))


def _check_complete(results, spec: SweepSpec, name: str, parent) -> None:
    """Raise SweepInterrupted unless every trial the space asks for ended (terminated or errored).

    On Ctrl-C Tune saves the experiment and returns: the grid's later trials may not exist yet and the
    running one looks like a result. Nothing is selected from a partial sweep."""
    ended = results.num_terminated + results.num_errors
    expected = spec.expected_trials()
    if ended < len(results) or len(results) < expected:
        parent.close(status="KILLED")
        raise SweepInterrupted(f"sweep {name} interrupted with {ended} of {expected} trials finished; "
                               f"continue it with --resume --name {name}")


def _selection(rows: list[dict[str, Any]], select: Selection, gflops_budget: float | None
               ) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return [dict(r) for r in select_rows(rows, select, gflops_budget)], None
    except ValueError as exc:
        logger.error("selection: %s", exc)
        return [], str(exc)


def _log_frontier(parent, rows: list[dict[str, Any]], selected: list[dict[str, Any]], workdir: Path, name: str,
                  stopped: int, wall_s: float) -> tuple[Path, Path]:
    """``frontier.csv`` and ``frontier.png`` to the parent run, with the sweep's summary metrics."""
    csv_path = write_frontier_csv(rows, workdir / "frontier.csv")
    png_path = plot_frontier(rows, selected, workdir / "frontier.png", title=f"{name}: accuracy vs. GFLOPs")
    parent.log_artifact(csv_path)
    parent.log_artifact(png_path)
    complete = [r for r in rows if r["status"] == "complete"]
    if complete:
        best = most_accurate(complete)
        parent.log_metrics({"best/top1": best["top1"], "best/gflops": best["gflops"]}, step=0)
    parent.log_metrics({"sweep/trials": len({r["trial_id"] for r in rows}), "sweep/stopped_early": stopped,
                        "sweep/points": len(rows), "sweep/wall_s": wall_s}, step=0)
    if selected:
        parent.set_tags({"glimpse.selected": json.dumps([{k: r[k] for k in ("trial_id", "setting", "top1", "gflops")}
                                                         for r in selected])})
    parent.flush()
    return csv_path, png_path


def _workdir(base: ExperimentConfig, experiment_path: str) -> Path:
    if not is_local(base.cluster.storage_path):
        return Path(tempfile.mkdtemp(prefix="glimpse-sweep-"))
    workdir = Path(experiment_path) / "frontier"
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def run_sweep(spec: SweepSpec, *, name: str = "", resume: bool = False, select: Selection = "best",
              gflops_budget: float | None = None, register: str = "", aliases: tuple[str, ...] | list[str] = ("best",),
              address: str = "") -> SweepResult:
    """Run (or resume) the sweep on Ray Tune, then write the frontier and register the selection."""
    import ray.tune

    from pipeline.train.launch import init_ray

    # Training reports carry val/top1 only at validation epochs: Tune must accept the other reports.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    base = finalize(spec.base)
    name = name or base.cluster.name.replace(base.model.name, f"sweep-{base.model.name}", 1)
    init_ray(address or base.cluster.address)
    experiment_path = f"{base.cluster.storage_path.rstrip('/')}/{name}"
    if resume and not ray.tune.Tuner.can_restore(experiment_path):
        raise ValueError(f"--resume: no restorable sweep at {experiment_path} (run it once without --resume, "
                         "with the same --name)")
    parent = _open_parent(spec, base, name, select, gflops_budget)
    plan, param_space = _plan(spec, base, name, parent)
    started = time.time()
    results = _tuner(spec, base, plan, param_space, name, experiment_path, resume).fit()
    _check_complete(results, spec, name, parent)
    rows, stopped = rows_from_results(results, spec, name)
    close_unfinished_children(parent.tracking_uri, base.tracking.experiment, plan.parent_run_id)

    workdir = _workdir(base, experiment_path)
    selected, error = _selection(rows, select, gflops_budget)
    csv_path, png_path = _log_frontier(parent, rows, selected, workdir, name, stopped, time.time() - started)
    registered = register_selected(selected, spec, parent, register, aliases, select, workdir) \
        if selected and register else []
    parent.close(status="FINISHED" if error is None else "FAILED")
    return SweepResult(name=name, experiment_path=experiment_path, tracking_uri=parent.tracking_uri,
                       parent_run_id=plan.parent_run_id, rows=rows, selected=selected, registered=registered,
                       csv_path=str(csv_path), png_path=str(png_path), num_stopped=stopped)
