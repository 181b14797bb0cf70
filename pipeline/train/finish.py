"""The end of a training run on the workers: the final multi-view evaluation (every rank), then on rank 0
the ``eval/*`` metrics, the final model (logged and registered, ``pipeline.tracking.model_store``) and the
run's figures (``pipeline.visualize``), and the MLflow run closed.

The evaluated and logged model is the EMA copy when there is one (:attr:`TrainState.eval_model`), at the
views of ``cfg.eval.views`` (filled from the model's ``pretrained_cfg`` by ``pipeline.context.finalize``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch.nn as nn

from pipeline.data import validation_inputs
from pipeline.evaluation.distributed import evaluate_model
from pipeline.modeling import autocast_dtype
from pipeline.train.setup import WorkerRun
from pipeline.train.state import TrainState

logger = logging.getLogger("glimpse.train")

EVAL_KEYS = ("top1", "top5", "loss", "mean_class_accuracy", "skipped_samples")


def final_evaluation(worker: WorkerRun, state: TrainState) -> dict[str, Any] | None:
    """``cfg.eval.views`` evaluation of the final model when ``eval.at_end``; the summary on rank 0."""
    if not worker.cfg.eval.at_end:
        return None
    return evaluate_model(state.eval_model, worker.cfg, worker.run.val_source, rank=worker.rank,
                          world_size=worker.world_size, device=worker.device, classes=worker.run.classes,
                          amp=autocast_dtype(worker.cfg.train, worker.device), progress=worker.run.progress)


def finish_run(worker: WorkerRun, state: TrainState, summary: dict[str, Any] | None) -> None:
    """Rank 0: log ``eval/*``, the final model (unless the run context says a sweep logs it) and the figures."""
    from pipeline.tracking.model_store import log_final_model

    tracker, run, cfg = worker.tracker, worker.run, worker.cfg
    if summary is not None:
        tracker.log_metrics({f"eval/{k}": summary[k] for k in EVAL_KEYS}, step=state.step)
    tracker.flush()
    model = state.eval_model.to("cpu").eval()
    if run.log_final_model:
        log_final_model(tracker, model, cfg, run.classes, summary, run.run_dir)
    elif summary is not None and "://" not in run.run_dir:
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.run_dir) / "eval_results.json").write_text(json.dumps(summary, indent=2))
    log_run_figures(worker, model, summary)
    tracker.close()


def final_metrics(summary: dict[str, Any] | None, state: TrainState) -> dict[str, Any]:
    """The last ``ray.train.report`` of a run: the summary's numbers, the step and epoch, ``done``."""
    numbers = {k: v for k, v in (summary or {}).items() if isinstance(v, (int, float))}
    return {**numbers, "step": state.step, "epoch": state.epoch, "done": 1}


def log_run_figures(worker: WorkerRun, model: nn.Module, summary: dict[str, Any] | None, max_samples: int = 4,
                    count_samples: int = 32) -> None:
    """Training curves, per-class accuracy and (for models that sample) the sampling geometry on
    ``max_samples`` validation inputs, with ATS's K' histogram over ``count_samples`` (ATS Fig. 6), as
    PNGs under the run's ``figures/`` artifacts. The model is already logged: a figure that cannot be
    drawn costs a warning, never the run."""
    from models.ats import ats_stages
    from pipeline.visualize import collect_kept_counts, log_figures, run_figures

    cfg, run = worker.cfg, worker.run
    local = "://" not in run.run_dir
    out = Path(run.run_dir) / "figures" if local else Path(tempfile.mkdtemp(prefix="glimpse-figures-"))
    try:
        has_ats = bool(ats_stages(model))
        batches = validation_inputs(cfg.data, run.val_source, count_samples if has_ats else max_samples,
                                    batch_size=max_samples, seed=cfg.train.seed)
        kept = collect_kept_counts(model, batches) if has_ats else None
        paths = run_figures(worker.tracker, None, summary, model=model, samples=batches[0], out_dir=out,
                            max_samples=max_samples, kept_counts=kept, mean=cfg.data.mean, std=cfg.data.std)
        log_figures(worker.tracker, None, paths, root=out)
        logger.info("logged %d figures (%s)", len(paths), out)
    except Exception:
        logger.warning("could not draw the run's figures", exc_info=True)
