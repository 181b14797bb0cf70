"""Ray Train overhead: samples/s of the real Ray Train loop against a plain single-process loop.

Both run the same model, data pipeline, batch size, optimiser and thread count, in one process
invocation, alternating over rounds (these machines are noisy). The Ray figure is taken from the
timestamps of the run's own step metrics (first to last logged step), so it includes every
``report`` barrier and data-loader restart that training pays; the plain figure is timed over the
same steps.
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
    dataset = build_dataset(cfg.data, src.train, train=True, batch_size=cfg.train.batch_size, rank=0, world_size=1,
                            seed=cfg.train.seed, samples_per_epoch=src.train_samples)
    scheduler = build_scheduler(optimizer, cfg.train, dataset.steps_per_epoch)
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


def compare(cfg: ExperimentConfig, rounds: int, run_prefix: str) -> dict[str, Any]:
    """Alternate Ray and plain measurements over ``rounds``; medians and their ratio."""
    torch.set_num_threads(max(1, int(cfg.cluster.cpus_per_worker)))
    ray_rates, plain_rates = [], []
    for r in range(rounds):
        rate, steps = ray_loop(cfg, f"{run_prefix}-{r}")
        ray_rates.append(rate)
        warmup = cfg.train.log_every  # the Ray figure starts at the first logged step
        plain_rates.append(plain_loop(cfg, steps - warmup, warmup))
        print(f"round {r}: ray {ray_rates[-1]:.1f} samples/s, plain {plain_rates[-1]:.1f} samples/s", flush=True)
    ray_med, plain_med = statistics.median(ray_rates), statistics.median(plain_rates)
    return {"model": cfg.model.name, "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(),
            "rounds": rounds, "ray_samples_per_s": ray_med, "plain_samples_per_s": plain_med,
            "ratio_ray_over_plain": ray_med / plain_med, "overhead": 1 - ray_med / plain_med,
            "ray_all": ray_rates, "plain_all": plain_rates}
