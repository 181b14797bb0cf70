"""The Ray Train worker loop: plain PyTorch, Ray Train's touch points numbered ``# RAY n``.

1. the worker's rank, world size and device (``get_context``, ``get_device``);
2. DDP and device placement (``prepare_model``);
3. the checkpoint to resume from (``get_checkpoint``);
4. ``report(metrics, checkpoint)`` on every rank, after checkpoints (:mod:`pipeline.train.hooks`);
5. the last ``report`` with the final evaluation.

The step itself is :func:`pipeline.train.step.train_one_epoch`, the same one the benchmark's plain loop
runs. A checkpoint holds the whole :class:`~pipeline.train.state.TrainState` (model, optimiser, schedule,
scaler, EMA, RNG, data position), so a restarted run continues at the next update. MLflow calls run on
rank 0 only (``WorkerRun.tracker``). Launch it with :func:`pipeline.train.launch.run_training`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.context import RunContext
from pipeline.train.finish import final_evaluation, final_metrics, finish_run
from pipeline.train.hooks import TrainHooks
from pipeline.train.setup import WorkerRun, build_training, open_tracker, restore, train_loader
from pipeline.train.step import train_one_epoch

logger = logging.getLogger("glimpse.train")


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker entry point; ``config`` = ``{"cfg": ExperimentConfig.to_dict(), "run": RunContext.to_dict()}``."""
    import ray.train
    import ray.train.torch

    from datasets.loader import DataStats
    from pipeline.console import quiet_worker_logging

    cfg, run = ExperimentConfig.from_dict(config["cfg"]), RunContext.from_dict(config["run"])
    quiet_worker_logging(cfg.cluster.log_level)
    ctx = ray.train.get_context()  # RAY 1
    rank, world_size, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()  # RAY 1
    state, recipe, end_batch, cost = build_training(cfg, run, rank, world_size, device,
                                                    prepare=ray.train.torch.prepare_model)  # RAY 2: DDP, device
    resumed = restore(state, ray.train.get_checkpoint(), run.run_dir, end_batch, rank)  # RAY 3

    worker = WorkerRun(cfg, run, rank, world_size, device, stats=DataStats())
    if rank == 0:
        worker = dataclasses.replace(worker, tracker=open_tracker(worker, cost, fresh=not resumed))
    hooks = TrainHooks(worker, end_batch)  # RAY 4: checkpoints are reported from the hooks
    stopped = False
    while state.epoch < cfg.train.epochs and not stopped:
        hooks.start_epoch(state)
        stopped = train_one_epoch(state, train_loader(worker, state), cfg, recipe=recipe, device=device,
                                  end_batch=end_batch, window=hooks.window, hooks=hooks)
        hooks.end_epoch()
        if not stopped:
            state.next_epoch()

    if stopped:
        logger.info("stopping at step %d as asked (train.stop_at_step); resume with the same run name", state.step)
        if worker.tracker is not None:
            worker.tracker.flush()
        return
    summary = final_evaluation(worker, state)
    if rank == 0:
        finish_run(worker, state, summary)
    ray.train.report(final_metrics(summary, state))  # RAY 5: on every rank
