"""Ray Train overhead: samples/s of the real Ray Train run against the same step in a plain loop.

Both sides run :func:`pipeline.train.setup.build_training` and :func:`pipeline.train.step.train_one_epoch`
(the same model, data, optimiser, AMP, Mixup, accumulation, EMA and normalisation), so the ratio measures
Ray Train and nothing else. They alternate over rounds in one invocation (these machines are noisy). The Ray
figure comes from the timestamps of the run's own step metrics (first to last logged step): it includes
the checkpoints, ``report`` barriers, MLflow flushes and data-loader restarts that training pays. The plain
figure is timed over the same updates.

    python jobs/benchmark_training.py --preset demo
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pipeline.config import ExperimentConfig
from pipeline.context import build_run_context, finalize
from pipeline.train.setup import WorkerRun, build_training, train_loader
from pipeline.train.state import TrainState
from pipeline.train.step import MetricWindow, train_one_epoch


@dataclass
class PlainHooks:
    """Times updates ``warmup`` to ``warmup + steps`` and records the window loss at the worker's log steps
    (every ``log_every`` updates and at each epoch's end), as the Ray worker logs ``train/loss``."""

    warmup: int
    steps: int
    log_every: int
    losses: dict[int, float] = field(default_factory=dict)
    started: float = 0.0
    elapsed: float = 0.0

    def after_update(self, state: TrainState, window: MetricWindow, end_of_epoch: bool) -> bool:
        if state.step % self.log_every == 0 or end_of_epoch:
            self.losses[state.step] = window.loss
            window.reset()
        if state.step == self.warmup:
            self.started = time.perf_counter()
        if state.step >= self.warmup + self.steps:
            self.elapsed = time.perf_counter() - self.started
            return True
        return False


def run_plain(cfg: ExperimentConfig, run, hooks: PlainHooks, saved: dict[str, Any] | None = None) -> TrainState:
    """The worker's training (the same state, loader and step) in one process without Ray, on the CPU,
    until ``hooks`` stops it or the epochs end; resumed from the state dict ``saved`` if given."""
    from datasets.loader import DataStats

    device = torch.device("cpu")
    state, recipe, end_batch, _ = build_training(cfg, run, 0, 1, device)
    if saved is not None:
        state.resume(saved, end_batch)
    worker = WorkerRun(cfg, run, rank=0, world_size=1, device=device, stats=DataStats())
    window = MetricWindow()
    while state.epoch < cfg.train.epochs:
        if train_one_epoch(state, train_loader(worker, state), cfg, recipe=recipe, device=device,
                           end_batch=end_batch, window=window, hooks=hooks):
            break
        state.next_epoch()
    return state


def plain_loop(cfg: ExperimentConfig, steps: int, warmup: int) -> tuple[float, dict[int, float]]:
    """Samples/s of the training step without Ray over ``steps`` updates after ``warmup`` updates; also the
    logged-step losses (step -> window loss)."""
    cfg = finalize(cfg)
    hooks = PlainHooks(warmup=warmup, steps=steps, log_every=cfg.train.log_every)
    state = run_plain(cfg, build_run_context(cfg), hooks)
    if not hooks.elapsed:
        raise ValueError(f"the plain loop ran {state.step} updates, fewer than warmup + steps = {warmup + steps}")
    samples = steps * cfg.train.batch_size * cfg.train.accum_steps
    return samples / hooks.elapsed, hooks.losses


def ray_loop(cfg: ExperimentConfig, name: str) -> tuple[float, int]:
    """Samples/s of the real Ray Train run, from its metric timestamps; also the steps it ran."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG
    from pipeline.train.launch import run_training

    cfg = finalize(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, name=name)))
    result = run_training(cfg)
    if result.error:
        raise RuntimeError(f"Ray run {name} failed: {result.error}")
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")[0]
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    samples = (last.step - first.step) * cfg.train.batch_size * cfg.train.accum_steps * cfg.cluster.num_workers
    return samples / ((last.timestamp - first.timestamp) / 1000.0), last.step


def updates_per_run(cfg: ExperimentConfig) -> int:
    """Optimiser updates of a whole run on one worker (the plain loop's and the Ray run's count)."""
    from pipeline.train.setup import epoch_length

    cfg = finalize(cfg)
    return cfg.train.epochs * epoch_length(cfg, build_run_context(cfg), 0, 1) // cfg.train.accum_steps


def _settle_ray(cfg: ExperimentConfig, seconds: float) -> None:
    """Start (or join) Ray and wait while its own processes finish starting (dashboard, agents): on a
    2-core machine they take CPU from the first measured steps, a one-off cost of starting Ray, not
    of training on it."""
    from pipeline.train.launch import init_ray

    init_ray(cfg.cluster.address)
    time.sleep(seconds)


def compare(cfg: ExperimentConfig, rounds: int, run_prefix: str, settle_s: float = 20.0) -> dict[str, Any]:
    """Alternate Ray and plain measurements over ``rounds`` (order swapped every round so drift in the
    machine's load falls on both); the median of the per-round ratios, and the medians of the rates."""
    if cfg.cluster.num_workers != 1:
        raise ValueError("the benchmark compares one Ray worker with one plain process: cluster.num_workers=1")
    _settle_ray(cfg, settle_s)
    ray_rates, plain_rates, ratios = [], [], []
    warmup = cfg.train.log_every  # the Ray figure starts at the first logged step
    steps = updates_per_run(cfg)
    for r in range(rounds):
        if r % 2 == 0:
            ray_rate, ray_steps = ray_loop(cfg, f"{run_prefix}-{r}")
            plain_rate = plain_loop(cfg, steps - warmup, warmup)[0]
        else:
            plain_rate = plain_loop(cfg, steps - warmup, warmup)[0]
            ray_rate, ray_steps = ray_loop(cfg, f"{run_prefix}-{r}")
        if ray_steps != steps:
            raise RuntimeError(f"Ray run did {ray_steps} updates, the plain loop {steps}")
        ray_rates.append(ray_rate)
        plain_rates.append(plain_rate)
        ratios.append(ray_rate / plain_rate)
        print(f"round {r}: ray {ray_rate:.1f} samples/s, plain {plain_rate:.1f} samples/s, "
              f"ratio {ratios[-1]:.3f}", flush=True)
    ratio = statistics.median(ratios)
    return {"model": cfg.model.name, "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(),
            "rounds": rounds, "steps": steps, "ray_samples_per_s": statistics.median(ray_rates),
            "plain_samples_per_s": statistics.median(plain_rates), "ratio_ray_over_plain": ratio,
            "overhead": 1 - ratio, "ratios": ratios, "ray_all": ray_rates, "plain_all": plain_rates}
