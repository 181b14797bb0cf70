"""Charts of numbers rather than pictures: the kept-token histogram per ATS stage (ATS Fig. 6), training
curves by step and the per-class accuracy of a multi-view evaluation."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.visualize.drawing import figure

__all__ = ["DEFAULT_CURVE_METRICS", "plot_kept_count_histogram", "plot_per_class_accuracy", "plot_training_curves"]

# Metrics drawn by default (the training loop's names); keys a run did not log are skipped.
DEFAULT_CURVE_METRICS = ("train/loss", "val/loss", "train/top1", "val/top1", "eval/top1", "train/lr")


def _count_bins(values: np.ndarray) -> np.ndarray:
    lo, hi = int(values.min()), int(values.max())
    if hi - lo <= 60:
        return np.arange(lo, hi + 2) - 0.5  # one bar per count
    return np.linspace(lo - 0.5, hi + 0.5, 41)


def plot_kept_count_histogram(counts: Mapping[int, Sequence[int]], num_tokens: int | None = None,
                              unit: str = "images") -> Figure:
    """ATS Fig. 6: per ATS stage, how many inputs kept how many tokens (``counts``: {stage: K' per input},
    e.g. from :func:`~pipeline.visualize.geometry.collect_kept_counts`). ``num_tokens`` fixes the x-axis to
    [0, num_tokens]."""
    if not counts:
        raise ValueError("no ATS stage counts to draw")
    n = len(counts)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = figure(nrows, ncols, 3.0, 2.3)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_axis_off()
    for ax, (stage, vals) in zip(flat, counts.items()):
        vals = np.asarray(vals, dtype=np.int64)
        if vals.size == 0:
            raise ValueError(f"ATS stage {stage} has no counts")
        ax.hist(vals, bins=_count_bins(vals), color="tab:blue", edgecolor="white", linewidth=0.4)
        if num_tokens is not None:
            ax.set_xlim(0, num_tokens + 0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"block {stage}: mean K'={vals.mean():.1f}", fontsize=8)
        ax.set_xlabel("sampled tokens K'", fontsize=7)
        ax.set_ylabel(unit, fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"kept tokens per ATS stage over {len(next(iter(counts.values())))} {unit}", fontsize=9)
    return fig


def _metric_group(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def _plot_curve_panel(ax, group: str, keys: Sequence[str], history: Mapping[str, Sequence[tuple[int, float]]]
                      ) -> None:
    for key in keys:
        pts = sorted(history[key])
        steps = [int(s) for s, _ in pts]
        values = [float(v) for _, v in pts]
        marker = "o" if len(pts) <= 20 else None
        ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=key)
    ax.set_title(group, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if group == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))


def plot_training_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Curves by step, one panel per metric kind (``train/loss`` and ``val/loss`` share "loss"; "top1";
    "lr"; ...). ``history``: {metric: [(step, value), ...]}, e.g. from
    :func:`~pipeline.visualize.mlflow_io.metric_history`."""
    groups: dict[str, list[str]] = {}
    for key, values in history.items():
        if len(values):
            groups.setdefault(_metric_group(key), []).append(key)
    fig, axes = figure(1, max(1, len(groups)), 3.6, 2.8)
    if not groups:
        axes[0, 0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        axes[0, 0].set_axis_off()
        return fig
    for ax, (group, keys) in zip(axes[0], groups.items()):
        _plot_curve_panel(ax, group, keys, history)
    return fig


def plot_per_class_accuracy(summary: Mapping[str, Any]) -> Figure:
    """Per-class top-1 of a multi-view evaluation (``summary["per_class"]``, in class order, as
    :func:`pipeline.evaluation.summarize` returns it), with the mean class accuracy as a line and top-1 /
    top-5 in the title."""
    per_class = summary.get("per_class") or {}
    if not per_class:
        raise ValueError("the evaluation summary has no per_class accuracies")
    names, values = list(per_class), [float(v) for v in per_class.values()]
    n = len(names)
    fig, axes = figure(1, 1, min(max(6.0, 0.22 * n + 1.5), 30.0), 3.6)
    ax = axes[0, 0]
    ax.bar(np.arange(n), values, color="tab:blue", gid="per-class")
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(names if n <= 150 else [""] * n, rotation=90, fontsize=max(4, min(8, 400 // n)))
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("top-1 accuracy", fontsize=8)
    mca = summary.get("mean_class_accuracy", float(np.mean(values)))
    ax.axhline(mca, color="tab:red", linewidth=1, linestyle="--", label=f"mean class accuracy {mca:.3f}")
    ax.legend(fontsize=7, loc="lower right")
    title = f"per-class accuracy over {summary.get('num_videos', '?')} samples"
    if "top1" in summary:
        title += f": top-1 {summary['top1']:.3f}, top-5 {summary.get('top5', float('nan')):.3f}"
    if summary.get("views_spec"):
        title += f" ({summary['views_spec']} views)"
    ax.set_title(title, fontsize=9)
    return fig
