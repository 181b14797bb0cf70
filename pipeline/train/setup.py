"""A Ray Train worker's start: seeding, the epoch's length, its loader, resuming, the rank-0 tracker.

``WorkerRun`` is what one worker knows of its run (config, context, rank, device, data statistics and,
on rank 0, the MLflow tracker); the loop's hooks and its end read it, nothing mutates it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import ExperimentConfig
from pipeline.context import RunContext
from pipeline.data import build_dataset
from pipeline.train import checkpointing
from pipeline.train.state import TrainState
from pipeline.train.step import StepRecipe

logger = logging.getLogger("glimpse.train")


@dataclass(frozen=True)
class WorkerRun:
    cfg: ExperimentConfig
    run: RunContext
    rank: int
    world_size: int
    device: torch.device
    tracker: Any | None = None  # pipeline.tracking.Tracker on rank 0
    stats: Any = field(default=None)  # datasets.loader.DataStats: skipped samples over the run

    def checkpoint_meta(self) -> dict[str, Any]:
        """``config.json`` of every checkpoint: the config that ran and the class list."""
        return {"experiment": self.cfg.to_dict(), "num_classes": self.run.num_classes, "classes": list(self.run.classes)}


def seed_worker(cfg: ExperimentConfig, threads: int) -> None:
    """Same initial weights on every rank (DDP broadcasts them anyway), determinism, the CPU thread count."""
    torch.manual_seed(cfg.train.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(max(1, threads))


def epoch_length(cfg: ExperimentConfig, run: RunContext, rank: int, world_size: int) -> int:
    """Batches per epoch that training uses (whole accumulation groups), identical on every rank."""
    probe = build_dataset(cfg.data, run.train_source, train=True, batch_size=cfg.train.batch_size, rank=rank,
                          world_size=world_size, seed=cfg.train.seed, samples_per_epoch=run.train_samples)
    batches = probe.steps_per_epoch
    if batches < cfg.train.accum_steps:
        raise ValueError(f"data gives {batches} batches per epoch per worker, fewer than "
                         f"train.accum_steps={cfg.train.accum_steps}: lower train.batch_size or add data")
    return batches // cfg.train.accum_steps * cfg.train.accum_steps


def build_training(cfg: ExperimentConfig, run: RunContext, rank: int, world_size: int, device: torch.device,
                   prepare: Callable[[nn.Module], nn.Module] | None = None) -> tuple[TrainState, StepRecipe, int, dict]:
    """Seed, then the model (``prepare``: Ray's ``prepare_model``, else moved to ``device``), its cost on
    rank 0, the step recipe and a fresh :class:`TrainState`; also the batches per epoch. The Ray worker and
    the benchmark's plain loop both start here, in this order, so they draw the same random numbers."""
    from pipeline.modeling import build_model, count_model_cost

    seed_worker(cfg, run.threads_per_worker)
    end_batch = epoch_length(cfg, run, rank, world_size)
    model = build_model(cfg.model, run.num_classes)
    cost = count_model_cost(model, cfg) if rank == 0 else {}
    model = prepare(model) if prepare is not None else model.to(device)
    recipe = StepRecipe.create(cfg, run.num_classes, device)
    state = TrainState.create(model, cfg.train, end_batch // cfg.train.accum_steps, recipe.amp)
    return state, recipe, end_batch, cost


def train_loader(worker: WorkerRun, state: TrainState):
    """This rank's batches of ``state.epoch``, from the batch the state is at (a resumed epoch skips the rest)."""
    from datasets.loader import make_loader

    cfg = worker.cfg
    dataset = build_dataset(cfg.data, worker.run.train_source, train=True, batch_size=cfg.train.batch_size,
                            rank=worker.rank, world_size=worker.world_size, seed=cfg.train.seed, epoch=state.epoch,
                            samples_per_epoch=worker.run.train_samples, start_batch=state.batch_in_epoch,
                            stats=worker.stats)
    return make_loader(dataset, num_workers=cfg.data.loader_workers, pin_memory=worker.device.type == "cuda")


def restore(state: TrainState, checkpoint, run_dir: str, end_batch: int, rank: int) -> bool:
    """Resume ``state`` from Ray's checkpoint or a newer one in the run folder; True when resumed.

    Ray's controller learns of a report when it next polls the workers: a worker that dies right after
    a checkpoint can leave it on storage but unregistered. The newer of the two is taken.
    """
    saved = None
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            saved = checkpointing.load_state(ckpt_dir)
    newest = checkpointing.newest_local_state(run_dir)
    if newest is not None and (saved is None or newest["step"] > saved["step"]):
        saved = newest
    if saved is None:
        return False
    state.resume(saved, end_batch)
    logger.info("rank %d resumed from checkpoint at step %d (epoch %d, batch %d)", rank, state.step, state.epoch,
                state.batch_in_epoch)
    return True


def open_tracker(worker: WorkerRun, cost: dict[str, float], fresh: bool):
    """Rank 0's MLflow run; a fresh run logs the config and context as they ran, its tags and cost."""
    from pipeline.tracking import Tracker, environment_info

    cfg, run = worker.cfg, worker.run
    tracker = Tracker(run.tracking_uri, cfg.tracking.experiment, run.run_name, artifact_root=run.artifact_root or None)
    if not fresh:  # a resumed run logged these already
        return tracker
    tracker.log_params({**cfg.flat(), **run.params()})
    tracker.set_tags({**environment_info(worker.world_size, str(worker.device)), "glimpse.model": cfg.model.name})
    if run.parent_run_id:  # a sweep trial: one nested MLflow run per trial (pipeline.sweep)
        tracker.set_tags({"mlflow.parentRunId": run.parent_run_id})
    tracker.set_tags(dict(run.tags))
    tracker.log_metrics({f"model/{k}": v for k, v in cost.items()}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(cfg.to_yaml())
        tracker.log_artifact(path)
        tracker.flush()
    return tracker
