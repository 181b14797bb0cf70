"""The evaluation-only Ray Train worker: one model evaluated at every inference-knob setting, no training step.

A trial that trained hands over its final checkpoint; an evaluation-only sweep (``--model``) hands over a
registered model, a run's model or a checkpoint folder. Every rank evaluates its share of the validation
videos at each setting (``pipeline.evaluation.distributed``); rank 0 measures the average GFLOPs over the
kept tokens (ATS section 3.2), logs ``eval/<metric>/<setting label>`` to the trial's MLflow run and hands
the numbers back as a checkpoint (Ray Train V2 keeps a run's metrics with its checkpoints only).

    job = KnobJob(source=result.checkpoint, settings=(KnobSetting("model.ats_ratio", 0.5),), gflops_samples=64)
    build_trainer(cfg, run, train_loop=job.train_loop()).fit()
"""

from __future__ import annotations

import functools
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from pipeline.config import ExperimentConfig, apply_params
from pipeline.context import RunContext
from pipeline.knobs import KnobSetting, apply_knobs

logger = logging.getLogger("glimpse.sweep")

RESULTS_FILE = "knob_eval.json"
ROW_KEYS = ("top1", "top5", "loss", "gflops", "num_samples")


@dataclass(frozen=True)
class KnobJob:
    """What to evaluate: ``source`` (a ``ray.train.Checkpoint``, a checkpoint folder or a model URI), at each of
    ``settings``; ``fresh_run``: the trial has no training run, so this one logs the config (evaluation only)."""

    source: Any
    settings: tuple[KnobSetting, ...]
    gflops_samples: int = 64
    fresh_run: bool = False

    def train_loop(self):
        """The worker function for :func:`pipeline.train.launch.build_trainer` (``config`` = cfg and run)."""
        return functools.partial(knob_eval_func, job=self)


def load_for_eval(source: Any, tracking_uri: str, device: str) -> tuple[nn.Module, dict[str, Any], int]:
    """(model, meta, training step) from a Ray Checkpoint, a training checkpoint folder (its EMA weights
    when it has some: what the training loop evaluates) or an MLflow model URI; nothing is unpickled."""
    from models.checkpoint import load_checkpoint
    from pipeline.tracking.model_store import load_model
    from pipeline.train import checkpointing

    if hasattr(source, "as_directory"):  # a ray.train.Checkpoint (local or remote storage)
        with source.as_directory() as directory:
            return load_for_eval(str(directory), tracking_uri, device)
    folder = Path(str(source))
    if folder.is_dir() and (folder / checkpointing.STATE_FILE).is_file():
        model, meta = load_model(str(folder), device=device)
        state = checkpointing.load_state(folder)
        if "ema" in state:
            load_checkpoint(model, state["ema"])  # models' one loader: strict, same architecture
        return model, meta, int(state.get("step", 0))
    model, meta = load_model(str(source), tracking_uri=tracking_uri or None, device=device)
    return model, meta, 0


def _open_tracker(cfg: ExperimentConfig, run: RunContext, job: KnobJob, world_size: int, device: Any):
    """Rank 0's handle on the trial's MLflow run (the training run by name; a new one when evaluation only)."""
    from pipeline.tracking import Tracker, environment_info

    tracker = Tracker(run.tracking_uri, cfg.tracking.experiment, run.run_name, artifact_root=run.artifact_root or None)
    tracker.set_tags({"glimpse.checkpoint": str(getattr(job.source, "path", job.source))})
    if job.fresh_run:
        tracker.log_params({**cfg.flat(), **run.params(), "model.source": str(job.source)})
        tracker.set_tags({**environment_info(world_size, str(device)), "glimpse.model": cfg.model.name,
                          **({"mlflow.parentRunId": run.parent_run_id} if run.parent_run_id else {}), **dict(run.tags)})
    return tracker


def _evaluate_setting(model: nn.Module, cfg: ExperimentConfig, run: RunContext, setting: KnobSetting, *,
                      rank: int, world_size: int, device: Any, classes: tuple[str, ...],
                      gflops_samples: int) -> dict[str, float] | None:
    """Set the knob on ``model`` and evaluate at ``cfg.eval.views``; the row (with GFLOPs) on rank 0."""
    from pipeline.evaluation.distributed import evaluate_model, measure_average_gflops

    at = apply_params(cfg, setting.overrides())  # the config of this point: what the row reports
    apply_knobs(model, at.model)
    summary = evaluate_model(model, at, run.val_source, rank=rank, world_size=world_size, device=device,
                             classes=classes)
    if summary is None:  # ranks other than 0
        return None
    gflops = measure_average_gflops(model, at, run.val_source, gflops_samples)
    return {"top1": summary["top1"], "top5": summary["top5"], "loss": summary["loss"], "gflops": gflops,
            "num_samples": float(summary["num_videos"])}


def knob_eval_func(config: dict[str, Any], *, job: KnobJob) -> None:
    """Ray Train worker: evaluate ``job.source`` at every setting of ``job.settings`` (no training step).

    Rank 0 reports, flattened, ``k{i}/top1``, ``k{i}/top5``, ``k{i}/loss``, ``k{i}/gflops``,
    ``k{i}/num_samples`` for setting ``i``, in ``knob_eval.json`` of its one checkpoint.
    """
    import ray.train  # RAY
    import ray.train.torch  # RAY
    import torch

    from pipeline.console import quiet_worker_logging

    cfg, run = ExperimentConfig.from_dict(config["cfg"]), RunContext.from_dict(config["run"])
    quiet_worker_logging(cfg.cluster.log_level)
    torch.set_num_threads(run.threads_per_worker)
    ctx = ray.train.get_context()  # RAY 1: rank, world size, device
    rank, world_size, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    model, meta, step = load_for_eval(job.source, run.tracking_uri, str(device))
    classes = tuple(meta.get("classes") or run.classes)
    tracker = _open_tracker(cfg, run, job, world_size, device) if rank == 0 else None
    out: dict[str, float] = {}
    for i, setting in enumerate(job.settings):
        row = _evaluate_setting(model, cfg, run, setting, rank=rank, world_size=world_size, device=device,
                                classes=classes, gflops_samples=job.gflops_samples)
        if row is not None:
            out.update({f"k{i}/{name}": float(v) for name, v in row.items()})
            tracker.log_metrics({f"eval/{name}/{setting.label}": v for name, v in row.items()}, step=step)
            logger.info("%s: top-1 %.4f, %.4f GFLOPs per sample", setting.label, row["top1"], row["gflops"])
    if tracker is not None:
        tracker.close()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            (Path(tmp) / RESULTS_FILE).write_text(json.dumps(out))
            ckpt = ray.train.Checkpoint.from_directory(tmp)  # RAY 2
        ray.train.report({**out, "done": 1}, checkpoint=ckpt)  # RAY 2: every rank (a barrier)


def read_rows(checkpoint, settings: tuple[KnobSetting, ...], trial_id: str) -> list[dict[str, Any]]:
    """One row per setting (``setting`` label, top1, top5, loss, gflops, num_samples) from the worker's checkpoint."""
    with checkpoint.as_directory() as directory:
        metrics = json.loads((Path(directory) / RESULTS_FILE).read_text())
    rows = []
    for i, s in enumerate(settings):
        if f"k{i}/top1" not in metrics:
            raise RuntimeError(f"trial {trial_id}: no evaluation for knob setting {s.label}")
        rows.append({"setting": s.label, **{n: metrics[f"k{i}/{n}"] for n in ROW_KEYS}})
    return rows
