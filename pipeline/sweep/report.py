"""A finished sweep as a table and a figure: one row per (trial, knob setting), ``frontier.csv`` and
``frontier.png`` (accuracy against measured GFLOPs, the Pareto front drawn, the layout of ATS Fig. 4).

Rows come from Tune's public results (``ResultGrid``: each ``Result``'s ``config``, ``metrics``, ``error``
and ``metrics_dataframe``).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.sweep.select import is_number, pareto_front
from pipeline.sweep.space import METRIC, SweepSpec
from pipeline.sweep.trial import TIME_ATTR


def _last_validation(result) -> dict[str, Any]:
    """The last reported row that carries ``val/top1`` (a trial stopped early: its last validation)."""
    df = result.metrics_dataframe
    if df is None or METRIC not in df.columns:
        return {}
    val = df[df[METRIC].notna()]
    return val.iloc[-1].to_dict() if len(val) else {}


def rows_from_results(results, spec: SweepSpec, name: str) -> tuple[list[dict[str, Any]], int]:
    """One row per (trial, knob setting) for complete trials; one per trial stopped early or failed (its last
    validation, at the model's training knobs). Returns (rows, number of trials not complete)."""
    rows, stopped = [], 0
    keys = [d.key for d in spec.dimensions]
    for r in results:
        cfg, m = r.config or {}, r.metrics or {}
        trial_id = str(m.get("trial_id", ""))
        common = {"trial_id": trial_id, "run_name": m.get("sweep/run_name") or f"{name}-{trial_id}",
                  **{k: cfg.get(k) for k in keys}}
        if m.get("sweep/complete"):
            for row in json.loads(m["sweep/rows"]):
                setting = row.pop("setting")
                rows.append({**common, "status": "complete", "epochs_done": m.get(TIME_ATTR), "setting": setting,
                             **row, "checkpoint": m.get("sweep/checkpoint", "")})
            continue
        stopped += 1
        last = _last_validation(r)
        rows.append({**common, "status": "stopped" if r.error is None else "failed",
                     "epochs_done": last.get(TIME_ATTR, m.get(TIME_ATTR)), "setting": "as_trained",
                     "top1": last.get(METRIC), "top5": last.get("val/top5"), "loss": last.get("val/loss"),
                     "gflops": last.get("val/gflops"), "num_samples": None, "checkpoint": m.get("checkpoint_path", "")})
    return rows, stopped


def write_frontier_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Every row, with a ``pareto`` column (1 on the front of the complete rows)."""
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    front = {id(r) for r in pareto_front([r for r in rows if r.get("status") == "complete"])}
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*columns, "pareto"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "pareto": int(id(r) in front)})
    return path


def _plot_trials(ax, rows: Sequence[Mapping[str, Any]], cmap) -> None:
    """One colour per trial: complete points as dots, stopped ones as crosses."""
    for i, t in enumerate(sorted({r["trial_id"] for r in rows})):
        pts = [r for r in rows if r["trial_id"] == t and is_number(r.get("gflops")) and is_number(r.get("top1"))]
        for done, marker, label in ((True, "o", f"trial {t}"), (False, "x", f"trial {t} (stopped)")):
            sel = [r for r in pts if (r["status"] == "complete") == done]
            if sel:
                ax.plot([r["gflops"] for r in sel], [100 * r["top1"] for r in sel], marker, color=cmap(i % 10),
                        label=label, alpha=0.85)


def plot_frontier(rows: Sequence[Mapping[str, Any]], selected: Sequence[Mapping[str, Any]], path: Path,
                  title: str = "") -> Path:
    """Accuracy against GFLOPs, one marker per evaluated point, colour per trial, the Pareto front
    as a step line and the selected point(s) ringed (the layout of ATS Fig. 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    _plot_trials(ax, rows, plt.get_cmap("tab10"))
    front = pareto_front([r for r in rows if r["status"] == "complete"])
    if front:
        ax.step([r["gflops"] for r in front], [100 * r["top1"] for r in front], where="post", color="black",
                lw=1.5, marker="D", ms=4, label="Pareto front")
    for r in selected:
        ax.plot([r["gflops"]], [100 * r["top1"]], "o", ms=14, mfc="none", mec="red", mew=2)
    ax.set_xlabel("average GFLOPs per sample (kept tokens)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs. GFLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
