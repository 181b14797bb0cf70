"""One Tune trial: train with Ray Train (unless evaluation only), evaluate every knob setting, report.

A trial is a function trainable that builds and fits the training ``TorchTrainer``
(:func:`pipeline.train.launch.build_trainer`; ``Tuner(trainer)`` is not supported under Train V2), with
``TuneReportCallback`` so that every worker report reaches Tune and ASHA can stop the trial on
``val/top1``. Then it evaluates the final checkpoint at every knob setting on the same number of Ray
Train workers (:mod:`pipeline.sweep.knob_eval`) and reports accuracy and measured average GFLOPs with
``ray.tune.report`` at its own level.

Its run context (:class:`pipeline.context.RunContext`) says it is a sweep's child: the parent MLflow run,
the trial's tags, GFLOPs at every validation, no final model (the sweep logs the point it selects).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, apply_params
from pipeline.context import RunContext, build_run_context, finalize, is_local
from pipeline.knobs import KnobSetting
from pipeline.sweep.knob_eval import KnobJob, read_rows
from pipeline.sweep.select import most_accurate
from pipeline.sweep.space import METRIC

TIME_ATTR = "epochs_done"  # the training loop's 1-based epoch count: ASHA's clock
KNOB_PARAM = "knob"  # the Tune parameter of an evaluation-only sweep: one KnobSetting dict per trial
RESULT_FILE = "sweep_result.json"


@dataclass(frozen=True)
class TrialPlan:
    """What every trial of one sweep shares (handed to Tune with ``tune.with_parameters``).

    ``base``: the resolved config each trial applies its parameters to (finalised per trial, so that a
    swept model name or size gets its own geometry); ``model_cfg``: for an evaluation-only sweep, the
    config the model ran with, with this sweep's cluster and tracking.
    """

    sweep: str
    base: ExperimentConfig
    parent_run_id: str
    tracking_uri: str
    trial_storage: str
    knob_settings: tuple[KnobSetting, ...] = ()
    model: str = ""
    model_cfg: ExperimentConfig | None = None
    gflops_samples: int = 64


def trial_config(plan: TrialPlan, params: Mapping[str, Any], trial_id: str) -> ExperimentConfig:
    """The trial's finalised config: ``params`` applied, its own run name, no registration, no final evaluation
    (the sweep evaluates every knob setting afterwards)."""
    base = plan.model_cfg if plan.model else plan.base
    cfg = apply_params(base, params)
    cluster = dataclasses.replace(cfg.cluster, name=f"{plan.sweep}-{trial_id}", storage_path=plan.trial_storage)
    tracking = dataclasses.replace(cfg.tracking, register="", tracking_uri=plan.tracking_uri)
    return finalize(dataclasses.replace(cfg, cluster=cluster, tracking=tracking,
                                        eval=dataclasses.replace(cfg.eval, at_end=False)))


def trial_context(cfg: ExperimentConfig, plan: TrialPlan, trial_id: str) -> RunContext:
    """A sweep child's run context: nested under the parent, tagged, GFLOPs measured, no final model."""
    return dataclasses.replace(build_run_context(cfg), parent_run_id=plan.parent_run_id,
                               tags=(("glimpse.sweep", plan.sweep), ("glimpse.trial_id", trial_id)),
                               gflops_samples=plan.gflops_samples, log_final_model=False, progress=False)


def _tune_report_callback():
    """Tune's ``TuneReportCallback`` without the training loop's final ``done`` flag: to Tune, ``done``
    ends the trial at once, before this trial's evaluation at every knob setting has run."""
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


def _train(cfg: ExperimentConfig, run: RunContext, trial_id: str) -> Any:
    """Fit the trial's training run; its final checkpoint."""
    from pipeline.train.launch import build_trainer

    result = _fit(build_trainer(cfg, run, callbacks=[_tune_report_callback()]))
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id} finished without a checkpoint")
    return result.checkpoint


def evaluate_knobs(cfg: ExperimentConfig, run: RunContext, job: KnobJob, trial_id: str) -> list[dict[str, Any]]:
    """Evaluate ``job`` on the trial's number of Ray Train workers (a run of its own, ``<name>-eval``);
    Tune does not see its reports. One row per knob setting."""
    from pipeline.train.launch import build_trainer

    ev_cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, name=f"{cfg.cluster.name}-eval",
                                                                  max_failures=0))
    ev_run = dataclasses.replace(run, run_dir=f"{run.run_dir}-eval")  # same MLflow run (found by run name)
    result = _fit(build_trainer(ev_cfg, ev_run, train_loop=job.train_loop()))
    if result.checkpoint is None:
        raise RuntimeError(f"trial {trial_id}: the evaluation at every knob setting returned no results")
    return read_rows(result.checkpoint, job.settings, trial_id)


def trial_report(rows: list[dict[str, Any]], epochs_done: int, checkpoint: str, run_name: str) -> dict[str, Any]:
    """The trial's one Tune report: its most accurate setting as ``val/*``, every row as JSON."""
    head = most_accurate(rows)
    return {METRIC: head["top1"], "val/top5": head["top5"], "val/gflops": head["gflops"], "knob_setting": head["setting"],
            TIME_ATTR: epochs_done, "sweep/complete": 1, "sweep/rows": json.dumps(rows),
            "sweep/checkpoint": checkpoint, "sweep/run_name": run_name}


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune trainable: train (unless evaluation only), evaluate every knob setting, report accuracy and GFLOPs."""
    import ray.tune

    trial_id = ray.tune.get_context().get_trial_id()
    if plan.model:  # evaluation only: the model's own config says what data and views it ran with
        cfg = trial_config(plan, {}, trial_id)
        settings: tuple[KnobSetting, ...] = (KnobSetting.from_dict(config[KNOB_PARAM]),)
    else:
        cfg = trial_config(plan, config, trial_id)
        settings = plan.knob_settings or (KnobSetting(),)
    run = trial_context(cfg, plan, trial_id)
    if plan.model:
        source: Any = plan.model
        checkpoint_path, epochs_done = plan.model, 0
    else:
        source = _train(cfg, run, trial_id)
        checkpoint_path, epochs_done = source.path, cfg.train.epochs
    job = KnobJob(source=source, settings=settings, gflops_samples=plan.gflops_samples, fresh_run=bool(plan.model))
    report = trial_report(evaluate_knobs(cfg, run, job, trial_id), epochs_done, checkpoint_path, run.run_name)
    if is_local(run.run_dir):
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.run_dir) / RESULT_FILE).write_text(json.dumps(report, indent=2))
    ray.tune.report(report)  # RAY Tune: at the trial's own level, not ray.train.report
