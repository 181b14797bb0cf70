"""The accuracy-GFLOPs frontier of every token reducer on real data, reproducible on a CPU in minutes.

A small ViT is trained on scikit-learn's handwritten digits (1,797 real 8 x 8 scans of 10 classes that
ship inside the ``scikit-learn`` wheel: nothing is downloaded), upsampled to 32 x 32, patch 4 (64 tokens
+ the class token). The trained weights are then reduced off the shelf by every method, each knob swept:

* ATS single stage (block ``depth // 3``), K from every token down to a few; ATS multi-stage (blocks
  ``depth // 3`` ..), ratio rho; the first ATS point keeps every token (``keep_all``);
* ToMe, r merged tokens per block; EViT, keep rate kappa at three blocks spread over the depth.

Each point is evaluated on the held-out digits: top-1, and the measured average GFLOPs (each sample's own
cost: ATS's K' varies per image; :func:`models.flops.average_flops`). The curve goes to MLflow as a CSV and
a PNG in the style of ATS Fig. 4 (top-1 against GFLOPs, one line per method), with one metric step per
point. Invariants (tested): every method's full-token point equals the unreduced model's accuracy, and
GFLOPs fall monotonically along each knob.
"""

from __future__ import annotations

import copy
import csv
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

logger = logging.getLogger("glimpse.frontier")


@dataclass(frozen=True)
class FrontierConfig:
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    embed_dim: int = 96
    depth: int = 6
    num_heads: int = 3
    img_size: int = 32
    patch_size: int = 4
    test_fraction: float = 0.2
    flops_samples: int = 48  # held-out images whose own GFLOPs are averaged per point
    seed: int = 0
    ats_k: tuple[int, ...] = (64, 48, 32, 24, 16, 8)
    ats_ratio: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
    tome_r: tuple[int, ...] = (0, 2, 4, 6, 8, 10)
    evit_keep_rate: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)


PRESETS: dict[str, FrontierConfig] = {
    "smoke": FrontierConfig(epochs=3, embed_dim=48, depth=4, flops_samples=8, ats_k=(64, 32, 8),
                            ats_ratio=(1.0, 0.7), tome_r=(0, 4, 8), evit_keep_rate=(1.0, 0.7, 0.5)),
    "demo": FrontierConfig(),
    "full": FrontierConfig(epochs=100, embed_dim=192, depth=12, num_heads=3, flops_samples=360,
                           ats_k=(64, 56, 48, 40, 32, 24, 16, 8), ats_ratio=(1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5),
                           tome_r=(0, 1, 2, 3, 4, 5, 6), evit_keep_rate=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)),
}


# --------------------------------------------------------------------------------------------------
# Data and the model
# --------------------------------------------------------------------------------------------------

def load_digits_split(cfg: FrontierConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): digits as (N, 1, S, S) floats, standardised, split per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    x = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=cfg.test_fraction,
                                           random_state=cfg.seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def build_vit(cfg: FrontierConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(cfg.seed)
    return VisionTransformer(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=1, num_classes=10,
                             embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads)


def train_vit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: FrontierConfig) -> list[float]:
    """AdamW + cosine, label smoothing 0.1; returns the loss of each epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * ((len(y) + cfg.batch_size - 1) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    for epoch in range(cfg.epochs):
        order, total = torch.randperm(len(y), generator=g), 0.0
        for i in range(0, len(y), cfg.batch_size):
            b = order[i:i + cfg.batch_size]
            loss = F.cross_entropy(model(x[b]), y[b], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        losses.append(total / len(y))
        logger.info("epoch %d/%d: loss %.4f", epoch + 1, cfg.epochs, losses[-1])
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


# --------------------------------------------------------------------------------------------------
# The reducers, off the shelf
# --------------------------------------------------------------------------------------------------

def _ats_single(base: nn.Module, cfg: FrontierConfig, k: Any) -> nn.Module:
    from models.ats import set_ats_k
    from models.ats_vit import apply_ats

    model = apply_ats(copy.deepcopy(base), [cfg.depth // 3])
    if k == "keep_all":
        set_ats_k(model, keep_all=True)
    else:
        set_ats_k(model, k=int(k))
    return model


def _ats_multi(base: nn.Module, cfg: FrontierConfig, ratio: float) -> nn.Module:
    from models.ats import set_ats_k
    from models.ats_vit import apply_ats

    model = apply_ats(copy.deepcopy(base), list(range(cfg.depth // 3, cfg.depth)))
    set_ats_k(model, ratio=float(ratio))
    return model


def _tome(base: nn.Module, cfg: FrontierConfig, r: int) -> nn.Module:
    from models.tome import apply_tome

    return apply_tome(copy.deepcopy(base), int(r))


def evit_locations(depth: int) -> tuple[int, ...]:
    """EViT's 4th / 7th / 10th of 12 blocks, scaled to ``depth`` (at least block 1, increasing)."""
    return tuple(sorted({max(1, round(depth * f)) for f in (0.25, 0.5, 0.75)} - {depth}))


def _evit(base: nn.Module, cfg: FrontierConfig, rate: float) -> nn.Module:
    from models.evit import apply_evit

    return apply_evit(copy.deepcopy(base), float(rate), evit_locations(cfg.depth))


def sweeps(cfg: FrontierConfig) -> dict[str, tuple[str, Sequence[Any], Callable]]:
    """method -> (knob, values from no reduction to the most, builder(base, cfg, value))."""
    return {"ats": ("ats_k", ["keep_all", *cfg.ats_k], _ats_single),
            "ats_multi": ("ats_ratio", list(cfg.ats_ratio), _ats_multi),
            "tome": ("tome_r", list(cfg.tome_r), _tome),
            "evit": ("evit_keep_rate", list(cfg.evit_keep_rate), _evit)}


def frontier_points(base: nn.Module, x_test: torch.Tensor, y_test: torch.Tensor, cfg: FrontierConfig
                    ) -> list[dict[str, Any]]:
    """One row per (method, knob value): top-1 on the held-out digits and the measured average GFLOPs."""
    from models.ats import ats_stages
    from models.flops import average_flops, count_flops

    rows = []
    probe = x_test[: cfg.flops_samples]
    for method, (knob, values, make) in sweeps(cfg).items():
        for value in values:
            model = make(base, cfg, value).eval()
            # ATS's cost depends on the image (K' per sample); ToMe's and EViT's only on the input size
            gflops = average_flops(model, [probe]) if ats_stages(model) else count_flops(model, probe[:1]).gflops
            rows.append({"method": method, "knob": knob, "value": value, "top1": accuracy(model, x_test, y_test),
                         "gflops": gflops})
            logger.info("%s %s=%s: top-1 %.4f at %.5f GFLOPs", method, knob, value, rows[-1]["top1"],
                        rows[-1]["gflops"])
    return rows


# --------------------------------------------------------------------------------------------------
# Outputs: CSV, the figure, MLflow
# --------------------------------------------------------------------------------------------------

def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["method", "knob", "value", "top1", "gflops"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot_frontier(rows: Sequence[dict[str, Any]], base_top1: float, base_gflops: float, path: Path) -> Path:
    """Top-1 against GFLOPs, one line per method (ATS Fig. 4's layout), the unreduced model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["gflops"], r["top1"]) for r in rows if r["method"] == method)
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
    ax.scatter([base_gflops], [100 * base_top1], marker="*", s=160, color="black", zorder=5, label="ViT (no reduction)")
    ax.set_xlabel("average GFLOPs per image (measured)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Token reducers off the shelf: digits, ViT 32x32/4")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_mlflow(tracking_uri: str, experiment: str, run_name: str, cfg: FrontierConfig,
                  summary: dict[str, Any], files: Sequence[Path]) -> str:
    from pipeline.tracking import Tracker

    tracker = Tracker(tracking_uri, experiment, run_name)
    tracker.log_params({f"frontier.{k}": v for k, v in cfg.__dict__.items()})
    tracker.log_metrics({"base/top1": summary["base_top1"], "base/gflops": summary["base_gflops"]}, step=0)
    for step, row in enumerate(summary["rows"]):
        tracker.log_metrics({f"{row['method']}/top1": row["top1"], f"{row['method']}/gflops": row["gflops"]}, step=step)
    for f in files:
        tracker.log_artifact(f, "frontier")
    tracker.flush()
    run_id = tracker.ensure_run()
    tracker.close()
    return run_id


def run_frontier(cfg: FrontierConfig, out_dir: str | Path, tracking_uri: str = "",
                 experiment: str = "glimpse-frontier") -> dict[str, Any]:
    """Train, sweep every reducer, write ``frontier.csv`` / ``frontier.png`` under ``out_dir``, log to
    MLflow when ``tracking_uri`` is given. Returns the summary (rows, base accuracy and GFLOPs, paths)."""
    from models.flops import count_flops

    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_digits_split(cfg)
    base = build_vit(cfg)
    losses = train_vit(base, x_tr, y_tr, cfg)
    base.eval()
    summary: dict[str, Any] = {"base_top1": accuracy(base, x_te, y_te),
                               "base_gflops": count_flops(base, x_te[:1]).gflops, "train_loss": losses,
                               "train_samples": len(y_tr), "test_samples": len(y_te)}
    summary["rows"] = frontier_points(base, x_te, y_te, cfg)
    csv_path = write_csv(summary["rows"], out / "frontier.csv")
    png_path = plot_frontier(summary["rows"], summary["base_top1"], summary["base_gflops"], out / "frontier.png")
    summary.update(csv=str(csv_path), png=str(png_path), seconds=round(time.perf_counter() - started, 1))
    if tracking_uri:
        summary["run_id"] = log_to_mlflow(tracking_uri, experiment, out.name, cfg, summary, [csv_path, png_path])
    return summary
