"""The MLflow side of a sweep's end: the selected point(s) logged and registered, trial runs tidied.

A selected row names a trial's final checkpoint (or, evaluation only, the model it evaluated) and a knob
setting. Its model is loaded (:func:`pipeline.sweep.knob_eval.load_for_eval`), the setting written into its
config as the real fields (``model.ats_ratio=0.5``), logged to the parent run and registered, so that
``models:/NAME@ALIAS`` loads at that setting (``pipeline.tracking.model_store.load_model``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, apply_params
from pipeline.knobs import KnobSetting, apply_knobs
from pipeline.sweep.knob_eval import load_for_eval
from pipeline.sweep.select import Selection, most_accurate
from pipeline.sweep.space import SweepSpec

SUMMARY_KEYS = ("top1", "top5", "gflops", "setting", "trial_id")


def _source(row: Mapping[str, Any]) -> Any:
    """A row's model: a local folder or model URI as it is, a remote checkpoint path as a Ray Checkpoint."""
    source = str(row["checkpoint"])
    if "://" in source and not source.startswith(("models:", "runs:")):
        from ray.train import Checkpoint

        return Checkpoint(path=source)
    return source


def _selected_config(meta: Mapping[str, Any], setting: KnobSetting, register: str,
                     aliases: Sequence[str]) -> ExperimentConfig:
    """The model's config at ``setting`` (the knob fields set), registered under ``register`` with ``aliases``."""
    cfg = apply_params(ExperimentConfig.from_dict(meta["experiment"]), setting.overrides())
    return dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, register=register,
                                                                 aliases=tuple(aliases)))


def _register_one(row: Mapping[str, Any], spec: SweepSpec, parent, register: str, aliases: Sequence[str],
                  run_dir: Path) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.model_store import log_final_model

    model, meta, _ = load_for_eval(_source(row), parent.tracking_uri, "cpu")
    setting = next((s for s in spec.knob_settings if s.label == row["setting"]), KnobSetting())
    cfg = _selected_config(meta, setting, register, aliases)
    apply_knobs(model, cfg.model)
    summary = {k: row[k] for k in SUMMARY_KEYS}
    logged = log_final_model(parent, model.cpu().eval(), cfg, meta.get("classes", []), summary, str(run_dir))
    if "registered_version" not in logged:
        raise RuntimeError(f"could not register the selected model of trial {row['trial_id']} as {register}")
    client = MlflowClient(parent.tracking_uri)
    for k, v in {"gflops": f"{row['gflops']:.6g}", "knob_setting": row["setting"], "trial_id": row["trial_id"],
                 "trial_run": row["run_name"], "sweep": parent.run_name}.items():
        client.set_model_version_tag(register, str(logged["registered_version"]), k, v)
    return {**logged, "trial_id": row["trial_id"], "setting": row["setting"]}


def register_selected(rows: Sequence[Mapping[str, Any]], spec: SweepSpec, parent, register: str,
                      aliases: Sequence[str], how: Selection, workdir: Path) -> list[dict[str, Any]]:
    """Log each selected point's model (its weights, its knob setting in the config) to the parent run and
    register it; ``aliases`` go to the most accurate, ``pareto-<i>`` to the points of a Pareto selection."""
    best = most_accurate(rows)
    out = []
    for i, row in enumerate(rows):
        names = list(aliases) if row is best else []
        if how == "pareto":
            names.append(f"pareto-{i}")
        out.append(_register_one(row, spec, parent, register, names, workdir / f"selected-{i}"))
    return out


def child_runs(tracking_uri: str, experiment: str, parent_run_id: str) -> list[Any]:
    """The sweep's trial runs in MLflow (for reports and tests)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def close_unfinished_children(tracking_uri: str, experiment: str, parent_run_id: str) -> None:
    """Trials that ASHA stopped never closed their MLflow run: mark them KILLED, tagged why."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    for run in child_runs(tracking_uri, experiment, parent_run_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "glimpse.tune.status", "stopped_early")
            client.set_terminated(run.info.run_id, status="KILLED")
