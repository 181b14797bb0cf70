"""Model cost: parameters and GFLOPs of any registered model, CPU throughput of DeiT-S vs DeiT-S + ATS, and
the token-reducer harness (ATS, ToMe, EViT at matched GFLOPs: ``pipeline/reducer_bench.py``).

``flops``: fvcore counts (models/flops.py; 1 multiply-add = 1 FLOP, attention and fused SDPA
included) per view at the model's default input (``pretrained_cfg["input_size"]``), ATS at its upper
bound K' = K. Works for every name ``models.create_model`` knows (Glimpse's and timm's).
``throughput``: images/s on this machine, all models interleaved in one run (median of rounds),
printed next to their GFLOPs ratios. By default timed in CPU seconds of one thread (``--clock cpu``),
which other jobs sharing the machine barely disturb; ``--clock wall --threads N`` for elapsed time. Weights are random unless ``--checkpoint`` gives a local timm
DeiT-S file (ATS keeps fewer tokens, K' < K, on trained weights and real images).

    python jobs/benchmark_models.py flops deit_small_patch16_224 deit_small_ats_k108 deit_small_ats_k78
    python jobs/benchmark_models.py flops --json deit_small_ats_k48 timesformer_base
    python jobs/benchmark_models.py flops --model-kwargs img_size=384 deit_small_ats
    python jobs/benchmark_models.py flops --average 16 deit_small_ats   # + mean GFLOPs of 16 random images
    python jobs/benchmark_models.py flops --average 8 cvt_13_224 cvt_13_224_ats cvt_21_384 cvt_21_384_ats
    python jobs/benchmark_models.py harness --preset smoke              # ATS / ToMe / EViT at matched GFLOPs
    python jobs/benchmark_models.py harness --preset demo               # 3.0 / 2.5 / 2.0 GFLOPs, + compiled at 2.5
    python jobs/benchmark_models.py throughput --preset smoke           # < 2 min
    python jobs/benchmark_models.py throughput                          # demo preset: batch 32
    python jobs/benchmark_models.py throughput --preset full --json
    python jobs/benchmark_models.py throughput --clock wall --threads 2  # elapsed time, 2 threads
    ray job submit --working-dir . -- python jobs/benchmark_models.py throughput --preset demo
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402

import torch  # noqa: E402

import models  # noqa: E402
from models.ats import ats_stages, set_ats_k  # noqa: E402
from models.checkpoint import load_checkpoint  # noqa: E402
from models.flops import average_flops, count_flops, example_input, measure_throughput, model_input_shape  # noqa: E402
from pipeline.config import ConfigError, parse_key_values  # noqa: E402

# Figures from the papers (GFLOPs per view, fvcore convention), printed beside ours.
PAPER_GFLOPS = {
    "deit_tiny_patch16_224": 1.3, "deit_small_patch16_224": 4.6, "deit_base_patch16_224": 17.6,
    "deit_small_ats_k108": 3.0, "deit_small_ats_k78": 2.5, "deit_small_ats_k48": 2.0,
    "timesformer_base": 196, "timesformer_hr": 1703, "timesformer_large": 2380, "xvit_8": 142, "xvit_16": 283,
    "psvit_ti_14": 1.6, "psvit_b_10": 3.1, "psvit_b_14": 5.4, "psvit_b_18": 8.8,
    "sparseformer_tiny": 2.0, "sparseformer_small": 3.8, "sparseformer_base": 7.8,
    # ATS Table 1 (CvT Table 3 for the plain rows); the +ATS figures are ImageNet averages with trained
    # weights (compare avg_gflops with a trained checkpoint, not the upper bound).
    "cvt_13_224": 4.5, "cvt_13_224_ats": 3.2, "cvt_13_384": 16.3, "cvt_13_384_ats": 11.7,
    "cvt_21_224": 7.1, "cvt_21_224_ats": 5.1, "cvt_21_384": 24.9, "cvt_21_384_ats": 17.4,
}
# Parameters (millions) where a paper's table gives them beside its GFLOPs (ATS Table 1: the same for +ATS).
PAPER_PARAMS_M = {f"cvt_{d}_{s}{a}": p for d, p in ((13, 20.0), (21, 32.0)) for s in (224, 384) for a in ("", "_ats")}
DEFAULT_FLOPS_MODELS = [
    "deit_small_patch16_224", "deit_small_ats", "deit_small_ats_k108", "deit_small_ats_k78", "deit_small_ats_k48",
    "timesformer_base", "timesformer_hr", "timesformer_large", "xvit_8", "xvit_16",
]
PRESETS = {
    "smoke": {"batch_size": 4, "rounds": 3, "warmup": 1, "extra_models": False},
    "demo": {"batch_size": 32, "rounds": 5, "warmup": 1, "extra_models": True},
    "full": {"batch_size": 32, "rounds": 15, "warmup": 2, "extra_models": True},
}
# Throughput aims (issue 4): speed-up >= 0.85 x GFLOPs reduction; ATS with nothing dropped <= 10% over timm.
EFFICIENCY_AIM, OVERHEAD_AIM = 0.85, 0.10


def parse_model_kwargs(items: list[str]) -> dict:
    """``--model-kwargs`` items -> kwargs (Python literals, else strings)."""
    try:
        return parse_key_values(items)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def _shape_str(shape: tuple) -> str:
    return "x".join(str(s) for s in shape)


def flops_rows(names: list[str], model_kwargs: dict, average: int = 0) -> list[dict]:
    rows = []
    for name in names:
        model = models.create_model(name, **model_kwargs)
        shape = model_input_shape(model)
        report = count_flops(model, example_input(model))
        row = {"model": name, "input": _shape_str(shape), "params_m": round(report.params_m, 3),
               "gflops": round(report.gflops, 6), "paper_gflops": round(report.paper_gflops, 6)}
        if average:
            batches = [example_input(model, batch_size=average, seed=1)]
            row["avg_gflops"] = round(average_flops(model, batches), 4)
        if name in PAPER_GFLOPS and not model_kwargs:  # the papers' figures hold for the default config only
            row["paper_target"] = PAPER_GFLOPS[name]
        if name in PAPER_PARAMS_M and not model_kwargs:
            row["paper_params_m"] = PAPER_PARAMS_M[name]
        rows.append(row)
        del model
    return rows


def print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[str(r.get(c, "-")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def cmd_flops(args: argparse.Namespace) -> None:
    names = args.models or DEFAULT_FLOPS_MODELS
    known = set(models.list_models())
    if not args.models:  # default list: say which names are not registered (yet) instead of failing
        missing = [n for n in names if n not in known and n not in ("deit_small_patch16_224",)]
        for n in missing:
            print(f"note: {n} is not registered; skipped", file=sys.stderr)
        names = [n for n in names if n not in missing]
    try:
        rows = flops_rows(names, parse_model_kwargs(args.model_kwargs), args.average)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        cols = ["model", "input", "params_m", "paper_params_m", "gflops", "paper_gflops", "paper_target"]
        print_table(rows, cols + (["avg_gflops"] if args.average else []))


def _throughput_models(args: argparse.Namespace, extra: bool) -> tuple[dict, dict, list[str]]:
    """name -> model, name -> row info, notes. All DeiT-S variants share one set of weights."""
    base = models.create_model("deit_small_patch16_224")
    if args.checkpoint:
        load_checkpoint(base, args.checkpoint)
    state = base.state_dict()
    zoo = {"deit_small_patch16_224 (timm)": base}
    info = {"deit_small_patch16_224 (timm)": {"model": "deit_small_patch16_224", "k": "-"}}

    def ats(label: str, name: str, k_info: str, build: dict | None = None, **knob) -> None:
        m = models.create_model(name, **(build or {}))
        m.load_state_dict(state, strict=True)
        if knob:
            set_ats_k(m, **knob)
        zoo[label], info[label] = m, {"model": name, "k": k_info}

    single = {"single_stage": True}
    ats("ATS stage 3, nothing dropped", "deit_small_ats", "keep_all", single, keep_all=True)
    ats("ATS stage 3, K=196 (=N)", "deit_small_ats", "196", single, k=196)
    for k in (108, 78, 48):
        ats(f"ATS stage 3, K={k}", f"deit_small_ats_k{k}", str(k))
    ats("ATS stages 3-11, rho=1", "deit_small_ats", "rho=1")
    notes = []
    if extra:
        known = set(models.list_models())
        for name in ("sparseformer_tiny", "psvit_b_14"):
            if name in known:
                zoo[name], info[name] = models.create_model(name), {"model": name, "k": "-"}
            else:
                notes.append(f"{name} is not registered; its row is skipped")
    return zoo, info, notes


def cmd_throughput(args: argparse.Namespace) -> None:
    preset = dict(PRESETS[args.preset])
    batch = args.batch_size or preset["batch_size"]
    rounds = args.rounds or preset["rounds"]
    if args.clock == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: robust to other jobs on the machine
    elif args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    zoo, info, notes = _throughput_models(args, preset["extra_models"])
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    rows = []
    for label, m in zoo.items():
        upper = count_flops(m, example_input(m)).gflops
        actual = average_flops(m, [x]) if ats_stages(m) else upper  # this batch's own K' (ATS trace records)
        rows.append({"label": label, **info[label], "gflops_upper": round(upper, 3), "gflops_batch": round(actual, 3)})
    times = measure_throughput(zoo, x, rounds=rounds, warmup=preset["warmup"], clock=args.clock)

    base = rows[0]
    base_ips = batch / statistics.median(times[base["label"]])
    for row in rows:
        ips = batch / statistics.median(times[row["label"]])
        row["images_per_s"] = round(ips, 2)
        row["speedup"] = round(ips / base_ips, 3)
        row["gflops_ratio_upper"] = round(base["gflops_upper"] / row["gflops_upper"], 3)
        row["gflops_ratio_batch"] = round(base["gflops_batch"] / row["gflops_batch"], 3)
        row["efficiency"] = round(row["speedup"] / row["gflops_ratio_batch"], 3)
        row["aim"] = _aim(row)
    result = {"preset": args.preset, "batch_size": batch, "rounds": rounds, "clock": args.clock,
              "threads": torch.get_num_threads(),
              "weights": args.checkpoint or "random init", "rows": rows, "notes": notes}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    unit = "images per CPU-second, 1 thread" if args.clock == "cpu" else f"images/s, {torch.get_num_threads()} threads"
    print(f"throughput on this CPU ({unit}): batch {batch}, {rounds} interleaved rounds (median), "
          f"weights: {result['weights']}")
    print_table(rows, ["label", "k", "images_per_s", "speedup", "gflops_upper", "gflops_batch",
                       "gflops_ratio_upper", "gflops_ratio_batch", "efficiency", "aim"])
    print(f"efficiency = speedup / GFLOPs reduction on this batch (aim >= {EFFICIENCY_AIM}); "
          f"'nothing dropped' aim: at most {OVERHEAD_AIM:.0%} slower than timm")
    for n in notes:
        print(f"note: {n}")


def _aim(row: dict) -> str:
    if row["k"] == "-":
        return "-" if row["model"] == "deit_small_patch16_224" else "(other model)"
    if row["k"] == "keep_all":
        overhead = 1.0 / row["speedup"] - 1.0
        return f"overhead {overhead:+.1%} " + ("ok" if overhead <= OVERHEAD_AIM else "MISSED")
    return "ok" if row["efficiency"] >= EFFICIENCY_AIM else "MISSED"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("flops", help="parameters and GFLOPs per view of registered models")
    p.add_argument("models", nargs="*", help=f"model names (default: {' '.join(DEFAULT_FLOPS_MODELS)})")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra model kwargs for every model, e.g. img_size=384 num_frames=16")
    p.add_argument("--average", type=int, default=0, metavar="N",
                   help="also report mean GFLOPs over N random inputs, each sample's own kept tokens")
    p.set_defaults(func=cmd_flops)
    t = sub.add_parser("throughput", help="images/s of DeiT-S vs DeiT-S + ATS at several K")
    t.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    t.add_argument("--batch-size", type=int, default=0, help="override the preset's batch size")
    t.add_argument("--rounds", type=int, default=0, help="override the preset's number of rounds")
    t.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: this thread's CPU time, 1 thread (robust on a shared machine; default); "
                        "wall: elapsed time with --threads threads")
    t.add_argument("--threads", type=int, default=0, help="torch threads for --clock wall (default: torch's)")
    t.add_argument("--checkpoint", default="", help="local timm DeiT-S checkpoint for every DeiT-S variant")
    t.add_argument("--json", action="store_true", help="print the result as JSON")
    t.set_defaults(func=cmd_throughput)
    h = sub.add_parser("harness", help="ATS, ToMe and EViT on DeiT-S at matched GFLOPs, eager and compiled")
    h.add_argument("--preset", choices=("smoke", "demo", "full"), default="demo",
                   help="smoke: one target, eager (< 2 min); demo: 3.0/2.5/2.0, compiled at 2.5; full: all compiled")
    h.add_argument("--checkpoint", default="", help="local timm DeiT-S checkpoint shared by every reducer")
    h.add_argument("--json", action="store_true", help="print the result as JSON")
    h.set_defaults(func=cmd_harness)
    args = parser.parse_args(argv)
    args.func(args)


def cmd_harness(args: argparse.Namespace) -> None:
    import logging

    from pipeline.reducer_bench import format_table, run_harness

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    result = run_harness(args.preset, args.checkpoint)
    print(json.dumps(result, indent=2) if args.json else format_table(result))


if __name__ == "__main__":
    main()
