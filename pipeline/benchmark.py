"""Ray Train overhead: samples/s of the real Ray Train loop against a plain single-process loop.

Both run the same model, data pipeline, batch size, optimiser and thread count, in one process
invocation, alternating over rounds (these machines are noisy). The Ray figure is taken from the
timestamps of the run's own step metrics (first to last logged step), so it includes the
checkpoints, ``report`` barriers, MLflow flushes and data-loader restarts that training pays; the
plain figure is timed over the same steps.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any

import torch

from pipeline.config import ExperimentConfig
from pipeline.data import batch_inputs, build_dataset, resolve_sources
from pipeline.modeling import build_loss, build_model, build_optimizer, build_scheduler


def plain_loop(cfg: ExperimentConfig, steps: int, warmup: int) -> float:
    """Samples/s of a plain PyTorch loop (no Ray) over ``steps`` updates after ``warmup`` updates."""
    from datasets.loader import make_loader

    src = resolve_sources(cfg.data)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, src.num_classes)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, _steps_per_epoch(cfg))
    criterion = build_loss(cfg.train, None)
    model.train()
    done, samples, start = 0, 0, None
    epoch = 0
    while done < warmup + steps:
        dataset = build_dataset(cfg.data, src.train, train=True, batch_size=cfg.train.batch_size, rank=0,
                                world_size=1, seed=cfg.train.seed, epoch=epoch, samples_per_epoch=src.train_samples)
        for batch in make_loader(dataset, num_workers=cfg.data.loader_workers):
            x, y = batch_inputs(batch, cfg.data.kind), batch["label"]
            loss = criterion(model(x), y)
            loss.backward()
            if cfg.train.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            done += 1
            if done == warmup:
                start = time.perf_counter()
            elif done > warmup:
                samples += y.numel()
            if done >= warmup + steps:
                break
        epoch += 1
    return samples / (time.perf_counter() - start)


def ray_loop(cfg: ExperimentConfig, name: str) -> tuple[float, int]:
    """Samples/s of the real Ray Train run, from its metric timestamps; also the steps it ran."""
    from mlflow.tracking import MlflowClient

    from pipeline.launcher import finalize, run_training
    from pipeline.tracking import RUN_NAME_TAG

    cfg = finalize(dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, name=name)))
    result = run_training(cfg)
    if result.error:
        raise RuntimeError(f"Ray run {name} failed: {result.error}")
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    run = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")[0]
    history = sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)
    first, last = history[0], history[-1]
    samples = (last.step - first.step) * cfg.train.batch_size * cfg.cluster.num_workers
    return samples / ((last.timestamp - first.timestamp) / 1000.0), last.step


def _settle_ray(cfg: ExperimentConfig, seconds: float) -> None:
    """Start (or join) Ray and wait while its own processes finish starting (dashboard, agents): on a
    2-core machine they take CPU from the first measured steps, a one-off cost of starting Ray, not
    of training on it."""
    from pipeline.launcher import init_ray

    init_ray(cfg.cluster.address)
    time.sleep(seconds)


def compare(cfg: ExperimentConfig, rounds: int, run_prefix: str, settle_s: float = 20.0) -> dict[str, Any]:
    """Alternate Ray and plain measurements over ``rounds`` (order swapped every round so drift in the
    machine's load falls on both); the median of the per-round ratios, and the medians of the rates."""
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    _settle_ray(cfg, settle_s)
    ray_rates, plain_rates, ratios = [], [], []
    warmup = cfg.train.log_every  # the Ray figure starts at the first logged step
    steps = cfg.train.epochs * _steps_per_epoch(cfg)
    for r in range(rounds):
        if r % 2 == 0:
            ray_rate, ray_steps = ray_loop(cfg, f"{run_prefix}-{r}")
            plain_rate = plain_loop(cfg, steps - warmup, warmup)
        else:
            plain_rate = plain_loop(cfg, steps - warmup, warmup)
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


def _steps_per_epoch(cfg: ExperimentConfig) -> int:
    src = resolve_sources(cfg.data)
    dataset = build_dataset(cfg.data, src.train, train=True, batch_size=cfg.train.batch_size, rank=0, world_size=1,
                            seed=cfg.train.seed, samples_per_epoch=src.train_samples)
    return dataset.steps_per_epoch // cfg.train.accum_steps
