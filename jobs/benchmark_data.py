"""Video data pipeline throughput: clips/s of shards -> normalised clips vs decord alone on the same clips.

Both in one run, single-threaded (per core), alternating rounds; prints the ratio with the
absolute figures (aim: pipeline >= 0.85 x raw decord). Data: the synthetic video shards
(``datasets.synthetic``, built on first use) or ``--data`` pointing at any video shard folder.

    python jobs/benchmark_data.py                        # demo preset (64x64 synthetic clips)
    python jobs/benchmark_data.py --preset smoke         # seconds
    python jobs/benchmark_data.py --preset demo --json   # machine-readable result only
    python jobs/benchmark_data.py --data /shards/k400/val --preset kinetics --clips 200
    python jobs/benchmark_data.py --data /shards/my_videos --preset kinetics --num-frames 16 --stride 4
    ray job submit --working-dir . -- python jobs/benchmark_data.py --preset demo
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

from datasets.benchmark import benchmark_video_pipeline  # noqa: E402
from datasets.specs import VideoSpec  # noqa: E402

# Geometry as in pipeline/presets.py for the synthetic data; "kinetics" is TimeSformer-style 8x32 at 224.
PRESETS = {
    "smoke": {"synthetic": "smoke", "clips": 240, "rounds": 3, "batch_size": 8,
              "spec": VideoSpec(num_frames=8, stride=2, crop_size=32, train_short_side=(32, 40),
                                eval_short_side=32)},
    "demo": {"synthetic": "demo", "clips": 400, "rounds": 3, "batch_size": 8,
             "spec": VideoSpec(num_frames=8, stride=2, crop_size=56, train_short_side=(56, 72),
                               eval_short_side=56)},
    "full": {"synthetic": "full", "clips": 600, "rounds": 3, "batch_size": 8,
             "spec": VideoSpec(num_frames=8, stride=4, crop_size=112, train_short_side=(112, 140),
                               eval_short_side=112)},
    "kinetics": {"synthetic": None, "clips": 200, "rounds": 3, "batch_size": 8,
                 "spec": VideoSpec(num_frames=8, stride=32, crop_size=224, train_short_side=(256, 320),
                                   eval_short_side=224)},
}
DEFAULT_ROOT = Path("~/.cache/glimpse/synthetic").expanduser()


def synthetic_train_folder(root: Path, preset: str) -> Path:
    """``root/<preset>/video/train``, built on first use.

    One folder per preset: ``ensure_synthetic`` keeps one preset per root, and training jobs may use
    ``root`` itself for theirs.
    """
    from datasets.synthetic import ensure_synthetic

    return ensure_synthetic(root / preset, "video", preset) / "train"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=list(PRESETS))
    parser.add_argument("--data", type=Path, default=None,
                        help="video shard folder (with a manifest.json), or a root for the synthetic data "
                             f"(default: {DEFAULT_ROOT}/<preset>/video/train, built on first use)")
    parser.add_argument("--clips", type=int, default=0, help="clips per round (default per preset)")
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default per preset)")
    parser.add_argument("--batch-size", type=int, default=0)
    g = parser.add_argument_group("clip geometry (default: the preset's)")
    g.add_argument("--num-frames", type=int)
    g.add_argument("--stride", type=int)
    g.add_argument("--crop-size", type=int, help="(default short-side range: crop to 1.25 x crop)")
    g.add_argument("--short-side", type=int, nargs=2, metavar=("MIN", "MAX"), help="training short-side range")
    g.add_argument("--backend", choices=["auto", "decord", "pyav"])
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    p = PRESETS[args.preset]
    if p["synthetic"] is None:
        if args.data is None:
            parser.error(f"--preset {args.preset} needs --data <video shard folder>")
        source = args.data
    elif args.data is not None and (args.data / "manifest.json").is_file():
        source = args.data
    else:
        source = synthetic_train_folder(args.data or DEFAULT_ROOT, p["synthetic"])

    short = tuple(args.short_side) if args.short_side else None
    if args.crop_size and not short:  # scale jitter as in the synthetic presets: short side in [crop, 1.25 crop]
        short = (args.crop_size, args.crop_size * 5 // 4)
    overrides = {"num_frames": args.num_frames, "stride": args.stride, "crop_size": args.crop_size,
                 "train_short_side": short, "eval_short_side": args.crop_size, "backend": args.backend}
    spec = replace(p["spec"], **{k: v for k, v in overrides.items() if v is not None})
    result = benchmark_video_pipeline(
        str(source), spec, clips=args.clips or p["clips"], rounds=args.rounds or p["rounds"],
        batch_size=args.batch_size or p["batch_size"],
    ).to_json()
    result.update(preset=args.preset, source=str(source))
    if args.json:
        print(json.dumps(result))
        return 0
    print(json.dumps(result, indent=2))
    h, w = result["video_size"]
    print(f"pipeline / decord = {result['ratio']:.3f} per core (CPU time; wall clock {result['ratio_wall']:.3f})  "
          f"pipeline {result['pipeline_clips_per_cpu_s']:.1f} vs decord alone {result['decord_clips_per_cpu_s']:.1f} "
          f"clips per CPU-second (wall: {result['pipeline_clips_per_s']:.1f} vs {result['decord_clips_per_s']:.1f} "
          f"clips/s); {result['clips']} clips x {result['rounds']} rounds of {result['frames_per_clip']} frames "
          f"from {h}x{w} videos, 1 thread; aim >= 0.85")
    return 0


if __name__ == "__main__":
    sys.exit(main())
