"""Evaluation inside a Ray Train worker group: every rank evaluates its share of the videos, rank 0 merges
them (each video counted once), and the measured average GFLOPs of token-adaptive models."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from pipeline.config import ExperimentConfig, parse_views
from pipeline.data import build_dataset, validation_inputs
from pipeline.evaluation.aggregation import gather_aggregators, summarize
from pipeline.evaluation.views import run_views


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Each value averaged over the ranks of the process group (unchanged without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def evaluate_model(model: nn.Module, cfg: ExperimentConfig, source: str, *, rank: int, world_size: int,
                   device: torch.device, classes: tuple[str, ...], views: tuple[int, int] | None = None,
                   amp: torch.dtype | None = None, progress: bool = False) -> dict[str, Any] | None:
    """Distributed multi-view evaluation at ``views`` (default ``cfg.eval.views``); the summary on rank 0,
    None on the other ranks."""
    from datasets.loader import DataStats, make_loader

    views = views or parse_views(cfg.eval.views)
    stats = DataStats()
    dataset = build_dataset(cfg.data, source, train=False, batch_size=cfg.eval.batch_size, rank=rank,
                            world_size=world_size, seed=cfg.train.seed, views=views, stats=stats)
    loader = make_loader(dataset, num_workers=cfg.data.loader_workers)
    agg, loss = run_views(model, loader, data=cfg.data, num_views=views[0] * views[1], aggregate=cfg.eval.aggregate,
                          device=device, autocast_dtype=amp, progress=progress and rank == 0)
    skipped = mean_over_ranks({"skipped": float(stats.total())}, device)["skipped"] * world_size
    loss = mean_over_ranks({"loss": loss}, device)["loss"]
    merged = gather_aggregators(agg)
    if merged is None:
        return None
    summary = summarize(merged, classes)
    summary.update(loss=loss, skipped_samples=int(round(skipped)), views_spec=f"{views[0]}x{views[1]}")
    return summary


def measure_average_gflops(model: nn.Module, cfg: ExperimentConfig, source: str, max_samples: int) -> float:
    """Average per-sample GFLOPs over the first ``max_samples`` validation samples (one view each),
    counting each sample's kept tokens (``models.flops.average_flops``; ATS section 3.2). Models
    without adaptive tokens cost the same on every input: they are counted once."""
    from models.ats import ats_stages
    from models.flops import average_flops, count_flops

    model = unwrap(model)
    device = next(model.parameters()).device
    batches = validation_inputs(cfg.data, source, max_samples, batch_size=cfg.eval.batch_size, seed=cfg.train.seed,
                                device=device)
    was_training = model.training
    try:
        if not ats_stages(model):
            return float(count_flops(model, batches[0][:1]).gflops)
        return float(average_flops(model, batches))
    finally:
        model.train(was_training)
