"""Multi-view aggregation: K temporal clips x S spatial crops per video, scores averaged per video.

Three testable parts (STYLE.md #13): the view index splits into (temporal, spatial) in the data
pipeline; ``ViewAggregator`` keys scores by video id and checks every video got all its views;
``summarize`` averages by softmax probability (``prob``, PySlowFast's default) or by raw logits
(``logit``, as the official TimeSformer and XViT test code does) and computes top-1/top-5 and
per-class accuracy. Distributed evaluation gathers the per-rank aggregators on rank 0; each
video is visited by exactly one rank, and a video seen twice is an error, not a silent average.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch


class IncompleteViewsError(RuntimeError):
    """A video received fewer or more views than K x S."""


@dataclass
class ViewAggregator:
    """Sum of per-view scores per video id, with view bookkeeping.

    ``add`` takes a batch of per-view logits; views of one video may arrive in different batches.
    """

    num_views: int
    aggregate: Literal["prob", "logit"] = "prob"
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)
    views_seen: dict[str, set[tuple[int, int]]] = field(default_factory=dict)

    def add(self, logits: torch.Tensor, labels: torch.Tensor, video_ids: list[str],
            clip_index: torch.Tensor | None = None, spatial_index: torch.Tensor | None = None) -> None:
        logits = logits.detach().float().cpu()
        values = logits.softmax(-1) if self.aggregate == "prob" else logits  # (B, num_classes)
        for i, vid in enumerate(video_ids):
            view = (int(clip_index[i]) if clip_index is not None else 0,
                    int(spatial_index[i]) if spatial_index is not None else 0)
            seen = self.views_seen.setdefault(vid, set())
            if view in seen:
                raise IncompleteViewsError(f"video {vid!r}: view {view} seen twice (duplicated sample?)")
            seen.add(view)
            self.scores[vid] = self.scores[vid] + values[i] if vid in self.scores else values[i].clone()
            label = int(labels[i])
            if self.labels.setdefault(vid, label) != label:
                raise IncompleteViewsError(f"video {vid!r}: conflicting labels {self.labels[vid]} and {label}")

    def merge(self, other: ViewAggregator) -> None:
        for vid, score in other.scores.items():
            if vid in self.scores:
                raise IncompleteViewsError(f"video {vid!r} evaluated on two ranks")
            self.scores[vid] = score
            self.labels[vid] = other.labels[vid]
            self.views_seen[vid] = other.views_seen[vid]

    def check_complete(self) -> list[str]:
        """Video ids with a view count other than K x S (empty when every video is complete)."""
        return sorted(v for v, seen in self.views_seen.items() if len(seen) != self.num_views)

    def to_state(self) -> dict[str, Any]:
        return {"num_views": self.num_views, "aggregate": self.aggregate,
                "scores": {k: v.tolist() for k, v in self.scores.items()}, "labels": dict(self.labels),
                "views": {k: sorted(v) for k, v in self.views_seen.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> ViewAggregator:
        agg = cls(num_views=state["num_views"], aggregate=state["aggregate"])
        agg.scores = {k: torch.tensor(v) for k, v in state["scores"].items()}
        agg.labels = dict(state["labels"])
        agg.views_seen = {k: {tuple(x) for x in v} for k, v in state["views"].items()}
        return agg


def summarize(agg: ViewAggregator, class_names: Iterable[str] | None = None, strict: bool = True) -> dict[str, Any]:
    """Top-1, top-5 and per-class accuracy of the per-video averaged scores."""
    incomplete = agg.check_complete()
    if incomplete and strict:
        raise IncompleteViewsError(f"{len(incomplete)} videos lack views (of {agg.num_views}), e.g. {incomplete[:5]}")
    if not agg.scores:
        return {"num_videos": 0, "top1": 0.0, "top5": 0.0, "per_class": {}, "incomplete": incomplete}
    ids = sorted(agg.scores)
    scores = torch.stack([agg.scores[v] / len(agg.views_seen[v]) for v in ids])  # (V, num_classes)
    labels = torch.tensor([agg.labels[v] for v in ids])  # (V,)
    k5 = min(5, scores.shape[1])
    top = scores.topk(k5, dim=1).indices  # (V, k5)
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(dim=1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(scores.shape[1])]
    per_class = {}
    for c in labels.unique().tolist():
        sel = labels == c
        per_class[names[c] if c < len(names) else str(c)] = float(correct1[sel].float().mean())
    return {"num_videos": len(ids), "top1": float(correct1.float().mean()), "top5": float(correct5.float().mean()),
            "mean_class_accuracy": sum(per_class.values()) / len(per_class), "per_class": per_class,
            "views": agg.num_views, "aggregate": agg.aggregate, "incomplete": incomplete}


def gather_aggregators(agg: ViewAggregator) -> ViewAggregator | None:
    """All ranks' aggregators merged on rank 0 (None elsewhere); a no-op without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return agg
    states: list[Any] = [None] * dist.get_world_size()
    # Objects travel between our own workers only (trusted); they are plain dicts of lists.
    dist.all_gather_object(states, agg.to_state())
    if dist.get_rank() != 0:
        return None
    merged = ViewAggregator(num_views=agg.num_views, aggregate=agg.aggregate)
    for state in states:
        merged.merge(ViewAggregator.from_state(state))
    return merged
