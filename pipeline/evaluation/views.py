"""Running a model over every view of an evaluation loader into a :class:`ViewAggregator`.

The views themselves are configuration: ``cfg.eval.views``, which :func:`pipeline.context.finalize` fills
from the model's ``pretrained_cfg["test_views"]`` (the papers' multi-view testing) when it is left empty."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.config import DataConfig
from pipeline.data import model_inputs
from pipeline.evaluation.aggregation import ViewAggregator


@torch.no_grad()
def run_views(model: torch.nn.Module, loader: Iterable[dict], *, data: DataConfig, num_views: int,
              aggregate: Literal["prob", "logit"], device: torch.device, autocast_dtype: torch.dtype | None = None,
              progress: bool = False) -> tuple[ViewAggregator, float]:
    """Run ``model`` over every view of ``loader`` into a ViewAggregator; also returns the mean loss."""
    from pipeline.console import progress_bar

    model.eval()
    agg = ViewAggregator(num_views=num_views, aggregate=aggregate)
    loss_sum, count = 0.0, 0
    bar = progress_bar(desc="eval", unit="batch") if progress else None
    for batch in loader:
        x, y = model_inputs(batch, data, device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        count += y.numel()
        ids = batch.get("video_id") or batch.get("key")
        agg.add(logits, y, list(ids), batch.get("clip_index"), batch.get("spatial_index"))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return agg, loss_sum / max(count, 1)
