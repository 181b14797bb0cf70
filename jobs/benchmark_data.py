"""Video data throughput and memory: the pipeline against raw decode, backend against backend, RSS over many decodes.

Three sections, each printed as a table with what it measured (``datasets/benchmark.py`` explains how):

1. pipeline / raw decode of the same clips, per decoder backend, per core (CPU-seconds, the decode
   process included) and wall clock, on synthetic shards (aim: >= 0.9);
2. backend against backend at Kinetics-like geometry: H.264 568x320 10 s clips made here (cached),
   16 and 32 frames at stride 4, short side 256-320 -> 224 crops: raw and pipeline clips/s;
3. RSS over N decodes per backend, of a good clip and of a truncated mp4 (flat = within 5 %).

    python jobs/benchmark_data.py --preset smoke         # < 2 min
    python jobs/benchmark_data.py                        # demo preset: a few minutes, 10,000 decodes per backend
    python jobs/benchmark_data.py --preset demo --json   # machine-readable result only
    python jobs/benchmark_data.py --memory --decodes 10000        # section 3 only
    python jobs/benchmark_data.py --decoders torchcodec,pyav --no-watchdog
    python jobs/benchmark_data.py --data /shards/k400/val --preset kinetics --clips 200
    ray job submit --working-dir . -- python jobs/benchmark_data.py --preset demo
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from datasets.specs import VideoSpec  # noqa: E402

# Section 1 geometry as the training presets use it (pipeline/presets.py): the demo trains on 32x32 clips
# at crop 32, short side 32-36. "kinetics" is TimeSformer-style 8x32 at 224 on user data.
PRESETS = {
    "smoke": {"synthetic": "smoke", "clips": 96, "rounds": 2, "batch_size": 8,
              "spec": VideoSpec(num_frames=8, stride=2, crop_size=32, train_short_side=(32, 40), eval_short_side=32),
              "kinetics_like": {"count": 3, "num_frames": 128, "clips": 3, "batch_size": 3},
              "memory_decodes": 300},
    "demo": {"synthetic": "demo", "clips": 400, "rounds": 3, "batch_size": 8,
             "spec": VideoSpec(num_frames=8, stride=2, crop_size=32, train_short_side=(32, 36), eval_short_side=32),
             "kinetics_like": {"count": 8, "num_frames": 250, "clips": 16, "batch_size": 4},
             "memory_decodes": 10_000},
    "full": {"synthetic": "full", "clips": 600, "rounds": 3, "batch_size": 8,
             "spec": VideoSpec(num_frames=8, stride=4, crop_size=112, train_short_side=(112, 140),
                               eval_short_side=112),
             "kinetics_like": {"count": 16, "num_frames": 250, "clips": 32, "batch_size": 4},
             "memory_decodes": 10_000},
    "kinetics": {"synthetic": None, "clips": 200, "rounds": 3, "batch_size": 8,
                 "spec": VideoSpec(num_frames=8, stride=32, crop_size=224, train_short_side=(256, 320),
                                   eval_short_side=224),
                 "kinetics_like": None, "memory_decodes": 0},
}
KINETICS_GEOMETRIES = ((16, 4), (32, 4))
DEFAULT_ROOT = Path("~/.cache/glimpse/synthetic").expanduser()
BENCH_ROOT = Path("~/.cache/glimpse/benchmark").expanduser()


def synthetic_train_folder(root: Path, preset: str) -> Path:
    """``root/<preset>/video/train``, built on first use (one folder per preset: ``ensure_synthetic`` keeps
    one preset per root, and training jobs may use ``root`` itself for theirs)."""
    from datasets.synthetic import ensure_synthetic

    return ensure_synthetic(root / preset, "video", preset) / "train"


def _parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:]))
    parser.add_argument("--preset", default="demo", choices=list(PRESETS))
    parser.add_argument("--data", type=Path, default=None,
                        help="video shard folder (with a manifest.json), or a root for the synthetic data "
                             f"(default: {DEFAULT_ROOT}/<preset>/video/train, built on first use)")
    parser.add_argument("--decoders", default="", help="comma-separated backends (default: every one that "
                        "loads here, of torchcodec,pyav,decord)")
    parser.add_argument("--clips", type=int, default=0, help="section 1: clips per round (default per preset)")
    parser.add_argument("--rounds", type=int, default=0, help="section 1: alternating rounds (default per preset)")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--no-watchdog", action="store_true", help="decode in the loader itself (decode_timeout_s=0)")
    parser.add_argument("--output", choices=["float", "uint8", "both"], default="both",
                        help="batch dtype: float (normalised in the loader), uint8 (normalised on the device by "
                             "datasets.transforms.normalize_batch), or both, one after the other (default)")
    parser.add_argument("--memory", action="store_true", help="section 3 only")
    parser.add_argument("--decodes", type=int, default=0, help="section 3: decodes per backend and kind")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: pipeline,backends,memory")
    g = parser.add_argument_group("section 1 clip geometry (default: the preset's)")
    g.add_argument("--num-frames", type=int)
    g.add_argument("--stride", type=int)
    g.add_argument("--crop-size", type=int, help="(default short-side range: crop to 1.25 x crop)")
    g.add_argument("--short-side", type=int, nargs=2, metavar=("MIN", "MAX"), help="training short-side range")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.memory:
        args.skip = "pipeline,backends"
    unknown = set(filter(None, args.skip.split(","))) - {"pipeline", "backends", "memory"}
    if unknown:
        parser.error(f"--skip: unknown section(s) {sorted(unknown)}; choose from pipeline,backends,memory")
    p = PRESETS[args.preset]
    if p["synthetic"] is None and args.data is None and "pipeline" not in args.skip:
        parser.error(f"--preset {args.preset} needs --data <video shard folder>")
    return args


def _decoders(args) -> list[str]:
    from datasets.decoders import available_decoders, resolve_decoder

    names = [n.strip() for n in args.decoders.split(",") if n.strip()] or available_decoders()
    for n in names:
        resolve_decoder(n)  # refuses a backend that cannot decode here, with its reason
    return names


def _outputs(args) -> list[str]:
    return ["float", "uint8"] if args.output == "both" else [args.output]


def _spec(args, p, output: str) -> VideoSpec:
    short = tuple(args.short_side) if args.short_side else None
    if args.crop_size and not short:  # scale jitter as in the synthetic presets: short side in [crop, 1.25 crop]
        short = (args.crop_size, args.crop_size * 5 // 4)
    overrides = {"num_frames": args.num_frames, "stride": args.stride, "crop_size": args.crop_size,
                 "train_short_side": short, "eval_short_side": args.crop_size, "output": output,
                 "decode_timeout_s": 0.0 if args.no_watchdog else None}
    return replace(p["spec"], **{k: v for k, v in overrides.items() if v is not None})


def _print_measured(measured: list[dict]) -> None:
    m = measured[0]
    h, w = m["video_size"]
    print(f"  data: {m['videos']} {m['codec']} videos of {h}x{w} (H x W), {m['frames_per_video']:.0f} frames, "
          f"from {m['source']}")
    seen = set()
    for m in measured:
        if m["num_frames"] in seen:
            continue
        seen.add(m["num_frames"])
        lo, hi = m["train_short_side"]
        print(f"  clips: {m['num_frames']} frames at stride {m['stride']} ({m['decoded_frames_per_clip']:.1f} decoded "
              f"per clip), short side {min(h, w)} -> {lo}-{hi} ({m['resize']}), crop {m['crop_size']}; batches "
              f"{tuple(m['batch_shape'])} (float32 or uint8: the batch column)")


def main(argv=None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from datasets.benchmark import (
        benchmark_backends,
        benchmark_memory,
        benchmark_pipeline_vs_raw,
        ensure_kinetics_like,
        to_json,
    )

    p = PRESETS[args.preset]
    decoders = _decoders(args)
    skip = set(filter(None, args.skip.split(",")))
    report: dict = {"preset": args.preset, "decoders": decoders, "command": " ".join(sys.argv)}

    if "pipeline" not in skip:
        if p["synthetic"] is None or (args.data is not None and (args.data / "manifest.json").is_file()):
            source = args.data
        else:
            source = synthetic_train_folder(args.data or DEFAULT_ROOT, p["synthetic"])
        runs, measured = [], []
        for output in _outputs(args):
            spec = _spec(args, p, output)
            m, r = benchmark_pipeline_vs_raw(
                str(source), spec, decoders, clips=args.clips or p["clips"], rounds=args.rounds or p["rounds"],
                batch_size=args.batch_size or p["batch_size"])
            measured.append(m)
            runs += r
        report["pipeline_vs_raw"] = {"measured": to_json(measured), "spec": to_json(spec), "runs": to_json(runs)}

    k = p["kinetics_like"]
    if "backends" not in skip and k:
        folder = ensure_kinetics_like(BENCH_ROOT, k["count"], num_frames=k["num_frames"])
        measured_k, runs_k = [], []
        for output in _outputs(args):
            m, r = benchmark_backends(folder, decoders, geometries=KINETICS_GEOMETRIES, clips=k["clips"],
                                      batch_size=k["batch_size"], output=output,
                                      decode_timeout_s=0.0 if args.no_watchdog else VideoSpec.decode_timeout_s)
            measured_k += m
            runs_k += r
        report["backends"] = {"measured": to_json(measured_k), "runs": to_json(runs_k)}

    decodes = args.decodes or p["memory_decodes"]
    if "memory" not in skip and decodes:
        from datasets.benchmark import MEMORY_CLIP

        report["memory"] = {"clip": MEMORY_CLIP, "runs": to_json(benchmark_memory(decoders, decodes=decodes))}

    if args.json:
        print(json.dumps(report))
        return 0
    print(json.dumps(report, indent=1))
    _print_tables(report)
    return 0


# A table: (header, width, format or None for text, the row's value).
Column = tuple[str, int, str | None, Callable[[dict], Any]]


def _print_table(columns: list[Column], rows: list[dict]) -> None:
    """One header line and one line per row; text left-aligned, numbers right-aligned."""
    print("  " + " ".join(f"{h:<{w}}" if f is None else f"{h:>{w}}" for h, w, f, _ in columns))
    for row in rows:
        print("  " + " ".join(f"{get(row)!s:<{w}}" if f is None else f"{get(row):>{w}{f}}" for _, w, f, get in columns))


def _columns(*specs: tuple[str, str, int, str | None]) -> list[Column]:
    """Columns from (row key, header, width, number format or None for text)."""
    return [(header, width, fmt, lambda row, key=key: row[key]) for key, header, width, fmt in specs]


_DECODER, _BATCH = ("decoder", "decoder", 11, None), ("output", "batch", 6, None)


def _rates(fmt: str) -> list[tuple[str, str, int, str | None]]:
    """The four rates both decode tables show: (pipeline, raw) x (clips/CPU-s, clips/s)."""
    return [(f"{side}_clips_per_{unit}", f"{side} clips/{label}", len(f"{side} clips/{label}") + 1, fmt)
            for unit, label in (("cpu_s", "CPU-s"), ("s", "s")) for side in ("pipeline", "raw")]


PIPELINE_COLUMNS = [*_columns(_DECODER, _BATCH), ("watchdog", 9, None, lambda r: "yes" if r["watchdog"] else "no"),
                    *_columns(*_rates(".1f"), ("ratio", "ratio/core", 11, ".3f"), ("ratio_wall", "ratio wall", 11, ".3f"))]
BACKEND_COLUMNS = [*_columns(_DECODER), ("clip", 7, None, lambda r: f"{r['num_frames']}x{r['stride']}"),
                   *_columns(_BATCH, *_rates(".2f"), ("ratio", "pipeline/raw", 13, ".3f"))]
MEMORY_COLUMNS = [*_columns(
    ("decoder", "decoder", 11, None), ("kind", "clip", 10, None), ("decodes", "decodes", 8, "d"), ("failures", "failed", 7, "d"),
    ("rss_after_warmup_mib", "RSS warm MiB", 13, ".1f"), ("rss_end_mib", "RSS end MiB", 12, ".1f"),
    ("growth_pct", "growth %", 9, ".2f"), ("kib_per_decode", "KiB/decode", 11, ".3f")),
    ("flat", 5, "", lambda r: "yes" if r["flat"] else "NO")]


# The report's sections in order: key, title, columns.
SECTIONS = (
    ("pipeline_vs_raw", "1. pipeline / raw decode of the same clips, one thread (aim >= 0.9 per core)",
     PIPELINE_COLUMNS),
    ("backends", "2. backend against backend, same clips, Kinetics-like geometry, one thread", BACKEND_COLUMNS),
    ("memory", "3. RSS over many decodes, a fresh process per backend ({clip}); flat = within 5 % after 10 % "
     "warm-up", MEMORY_COLUMNS),
)


def _print_tables(report: dict) -> None:
    print(f"\n$ {report['command']}")
    for key, title, columns in SECTIONS:
        if key not in report:
            continue
        section = report[key]
        print("\n" + title.format(clip=section.get("clip", "")))
        if "measured" in section:
            _print_measured(section["measured"])
        _print_table(columns, section["runs"])
        if key == "pipeline_vs_raw":
            print(f"  ({section['runs'][0]['clips']} clips x {section['runs'][0]['rounds']} rounds per decoder)")


if __name__ == "__main__":
    sys.exit(main())
