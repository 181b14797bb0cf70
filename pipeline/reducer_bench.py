"""One harness for every token reducer: ATS (single- and multi-stage), ToMe and EViT on DeiT-S at matched
GFLOPs, eager and compiled, timed side by side in one process (``jobs/benchmark_models.py harness``).

For each target (DeiT-S 4.6 GFLOPs cut to about 3.0 / 2.5 / 2.0) every reducer's knob is matched to the
target with the one FLOP counter (:func:`models.reducers.match_gflops`; ATS at its upper bound K' = K).
All models share one set of DeiT-S weights (random, or a local checkpoint) and are timed interleaved
(:func:`models.flops.measure_throughput`: every round runs each model once, from a rotating start; the
median is reported). The table gives, per row:

* ``speedup``: images/s relative to plain timm DeiT-S in the same mode (eager or compiled);
* ``gflops_cut``: DeiT-S GFLOPs / the row's GFLOPs on the timed batch (ATS: each sample's own K');
* ``efficiency`` = speedup / gflops_cut (aim >= 0.95: the GFLOPs cut turns into time).

The "nothing dropped" rows (ATS with every token kept) give ATS's own overhead (aim: >= 0.97 x timm).
Compiled rows use ``torch.compile`` (inductor) on every model; ATS compiles in its static-shape mode
where the model has one (``ats_mode="static"``), since the dynamic mode's data-dependent shapes break
the graph.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from models.ats import ats_stages, set_ats_k, set_ats_mode
from models.flops import average_flops, count_flops, measure_throughput
from models.reducers import REDUCERS, match_gflops

logger = logging.getLogger("glimpse.bench")
BASE = "deit_small_patch16_224"
EFFICIENCY_AIM, KEEP_ALL_AIM = 0.95, 0.97


@dataclass(frozen=True)
class HarnessPreset:
    targets: tuple[float, ...]
    batch_size: int
    rounds: int
    compiled_targets: tuple[float, ...] = ()  # targets also timed under torch.compile
    warmup: int = 1


PRESETS: dict[str, HarnessPreset] = {
    "smoke": HarnessPreset(targets=(2.5,), batch_size=4, rounds=2),
    "demo": HarnessPreset(targets=(3.0, 2.5, 2.0), batch_size=16, rounds=3, compiled_targets=(2.5,)),
    "full": HarnessPreset(targets=(3.0, 2.5, 2.0), batch_size=32, rounds=5, compiled_targets=(3.0, 2.5, 2.0)),
}


@dataclass
class Row:
    label: str
    reducer: str
    knob: str
    value: Any
    target: float | None
    gflops_upper: float
    gflops_batch: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _build_zoo(preset: HarnessPreset, state: dict[str, torch.Tensor]) -> tuple[dict[str, nn.Module], list[Row]]:
    """Every reducer at every target (knob matched), plus ATS with nothing dropped; one set of weights."""
    import models

    zoo: dict[str, nn.Module] = {}
    rows: list[Row] = []
    for name, red in REDUCERS.items():
        for target in preset.targets:
            model = red.build().eval()
            model.load_state_dict(state, strict=True)
            value, g = match_gflops(red, model, target)
            label = f"{name} {red.knob}={value}"
            zoo[label] = model
            rows.append(Row(label, name, red.knob, value, target, round(g, 3)))
            logger.info("%s: %s = %s gives %.3f GFLOPs (target %.1f)", name, red.knob, value, g, target)
    for label, kwargs in (("ats stage 3, nothing dropped", {"single_stage": True}),
                          ("ats stages 3-11, nothing dropped", {})):
        model = models.create_model("deit_small_ats", **kwargs).eval()
        model.load_state_dict(state, strict=True)
        set_ats_k(model, keep_all=True)
        zoo[label] = model
        rows.append(Row(label, "ats" if kwargs else "ats_multi", "keep_all", True, None, 4.6))
    return zoo, rows


def _compiled(model: nn.Module) -> nn.Module:
    if ats_stages(model):
        set_ats_mode(model, "static")  # dynamic K' trims shapes by data: static shapes compile whole
    return torch.compile(model)


def _time(zoo: dict[str, nn.Module], x: torch.Tensor, preset: HarnessPreset) -> dict[str, float]:
    times = measure_throughput(zoo, x, rounds=preset.rounds, warmup=preset.warmup, clock="cpu")
    return {label: x.shape[0] / statistics.median(t) for label, t in times.items()}


def run_harness(preset_name: str = "demo", checkpoint: str = "") -> dict[str, Any]:
    """The harness table (module docstring) as a dict: rows, the preset and the aims."""
    import models
    from models.checkpoint import load_checkpoint

    preset = PRESETS[preset_name]
    torch.set_num_threads(1)  # CPU time of one thread: ratios stay meaningful on a shared machine
    torch.manual_seed(0)
    base = models.create_model(BASE).eval()
    if checkpoint:
        load_checkpoint(base, checkpoint)
    zoo, rows = _build_zoo(preset, base.state_dict())
    x = torch.randn(preset.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    base_g = count_flops(base, x[:1]).gflops
    for row in rows:
        m = zoo[row.label]
        row.gflops_batch = round(average_flops(m, [x]) if ats_stages(m) else row.gflops_upper, 3)
    eager = _time({BASE: base, **zoo}, x, preset)
    out_rows = [_row_dict(row, eager, base_g, "eager") for row in rows]
    if preset.compiled_targets:
        chosen = {r.label: zoo[r.label] for r in rows if r.target in preset.compiled_targets or r.target is None}
        compiled = _time({BASE: _compiled(base), **{k: _compiled(m) for k, m in chosen.items()}}, x, preset)
        out_rows += [_row_dict(r, compiled, base_g, "compiled") for r in rows if r.label in chosen]
    return {"preset": preset_name, "batch_size": preset.batch_size, "rounds": preset.rounds, "clock": "cpu, 1 thread",
            "weights": checkpoint or "random init", "base": BASE, "base_gflops": round(base_g, 3),
            "base_images_per_cpu_s": {"eager": round(eager[BASE], 2)}, "rows": out_rows,
            "aims": {"efficiency": EFFICIENCY_AIM, "nothing_dropped": KEEP_ALL_AIM}}


def _row_dict(row: Row, ips: dict[str, float], base_g: float, mode: str) -> dict[str, Any]:
    speedup = ips[row.label] / ips[BASE]
    cut = base_g / row.gflops_batch
    if row.knob == "keep_all":
        aim = "ok" if speedup >= KEEP_ALL_AIM else "MISSED"
    else:
        aim = "ok" if speedup / cut >= EFFICIENCY_AIM else "MISSED"
    return {"mode": mode, "label": row.label, "reducer": row.reducer, "target": row.target,
            "gflops_upper": row.gflops_upper, "gflops_batch": row.gflops_batch,
            "images_per_cpu_s": round(ips[row.label], 2), "speedup": round(speedup, 3),
            "gflops_cut": round(cut, 3), "efficiency": round(speedup / cut, 3), "aim": aim}


def format_table(result: dict[str, Any]) -> str:
    cols = ["mode", "label", "target", "gflops_upper", "gflops_batch", "images_per_cpu_s", "speedup", "gflops_cut",
            "efficiency", "aim"]
    rows = [[str(r[c]) for c in cols] for r in result["rows"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append(f"{result['base']}: {result['base_gflops']} GFLOPs; batch {result['batch_size']}, "
                 f"{result['rounds']} interleaved rounds (median), {result['clock']}, weights: {result['weights']}; "
                 f"efficiency = speedup / GFLOPs cut (aim >= {EFFICIENCY_AIM}); nothing dropped: aim >= "
                 f"{KEEP_ALL_AIM} x timm")
    return "\n".join(lines)
