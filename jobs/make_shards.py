"""Write WebDataset shards (with a manifest.json) from images, Kinetics clips or built-in synthetic data.

Examples (local)::

    # ImageNet layout ROOT/<class>/<file>: image bytes kept as they are
    python jobs/make_shards.py images /data/imagenet/train /shards/imagenet/train --workers 8 --max-size 1GB
    python jobs/make_shards.py images /data/imagenet/val /shards/imagenet/val --classes classes.txt

    # Kinetics-400/600 CSV (label,youtube_id,time_start,time_end,split) + clips <id>_<start:06d>_<end:06d>.mp4
    python jobs/make_shards.py kinetics k400/train.csv k400/videos /shards/k400/train --split train \\
        --short-side 320 --workers 8

    # built-in synthetic datasets -> OUT/video/{train,val} and OUT/image/{train,val}
    python jobs/make_shards.py synthetic /shards/synthetic --kind both --preset smoke

On a Ray cluster (the job runs on the head node; point OUT at shared storage)::

    ray job submit --working-dir . -- python jobs/make_shards.py synthetic /mnt/shared/synthetic --preset demo
    ray job submit --working-dir . -- python jobs/make_shards.py kinetics /mnt/k400/train.csv \\
        /mnt/k400/videos /mnt/shared/k400/train --split train --workers 16

Re-running a command skips shards that are already complete (``--overwrite`` rebuilds them); a shard
file appears only once it is complete. Missing or unreadable Kinetics clips are listed in
``OUT/report.json``. Errors in the input (missing folder, empty CSV, unknown class) print one line
and exit with status 2.
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702,I001

import argparse  # noqa: E402
import logging  # noqa: E402

from datasets.build import BuildError, build_image_shards, build_kinetics_shards  # noqa: E402
from datasets.manifest import ManifestError  # noqa: E402
from datasets.synthetic import IMAGE_PRESETS, VIDEO_PRESETS, make_synthetic  # noqa: E402
from datasets.writer import parse_size  # noqa: E402


def _size(text: str) -> int | None:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _common(p: argparse.ArgumentParser, default_count: int | None) -> None:
    g = p.add_argument_group("sharding")
    g.add_argument("--max-count", type=_positive, default=default_count,
                   help="samples per shard (default: %(default)s)" if default_count else
                   "samples per shard (default: the preset's)")
    g.add_argument("--max-size", type=_size, default=None,
                   help="bytes of source data per shard, e.g. 1GB, 500MB, 64KiB (default: no limit)")
    g.add_argument("--workers", type=_positive, default=1, help="parallel shard writers (default: 1)")
    g.add_argument("--overwrite", action="store_true", help="rebuild all shards instead of skipping finished ones")
    g.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make_shards.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run '%(prog)s <command> --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{images,kinetics,synthetic}")

    p = sub.add_parser("images", help="ImageNet-style tree ROOT/<class>/<file> -> shards",
                       description="Shard an image tree ROOT/<class>/<file>; bytes are stored unchanged.")
    p.add_argument("root", help="folder with one subfolder per class")
    p.add_argument("out", help="output shard folder (created)")
    p.add_argument("--classes", help="file with one class name per line, fixing the class index order "
                   "(default: sorted folder names)")
    _common(p, 1000)

    p = sub.add_parser("kinetics", help="Kinetics-400/600 CSV + clip folder -> shards",
                       description="Shard Kinetics clips listed in an annotation CSV "
                       "(label,youtube_id,time_start,time_end,split). Missing/unreadable clips go to OUT/report.json.")
    p.add_argument("csv", help="annotation CSV with header label,youtube_id,time_start,time_end,split")
    p.add_argument("videos", help="folder of <youtube_id>_<start:06d>_<end:06d>.mp4 (or <label>/<same>.mp4)")
    p.add_argument("out", help="output shard folder (created)")
    p.add_argument("--split", help="keep only rows of this split (e.g. train, val, validate)")
    p.add_argument("--short-side", type=_positive, help="re-encode clips whose shorter side is larger to this size")
    p.add_argument("--classes", help="file with one class name per line (default: sorted labels of the CSV)")
    _common(p, 100)

    p = sub.add_parser("synthetic", help="built-in synthetic datasets -> OUT/<kind>/{train,val}",
                       description="Write the moving-digit videos and/or cluttered-digit images "
                       "(see datasets/synthetic.py) as shards.")
    p.add_argument("out", help="output root; shards go to OUT/<kind>/train and OUT/<kind>/val")
    p.add_argument("--kind", choices=["video", "image", "both"], default="video", help="default: %(default)s")
    p.add_argument("--preset", choices=sorted(set(VIDEO_PRESETS) | set(IMAGE_PRESETS)), default="demo",
                   help="dataset size: smoke (seconds), demo (default), full")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    _common(p, None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command == "images":
            m = build_image_shards(args.root, args.out, max_count=args.max_count, max_size=args.max_size,
                                   workers=args.workers, classes=args.classes, overwrite=args.overwrite)
            print(f"{args.out}: {m.total_samples} images, {m.num_classes} classes, {len(m.shards)} shards")
        elif args.command == "kinetics":
            m = build_kinetics_shards(args.csv, args.videos, args.out, split=args.split,
                                      short_side=args.short_side, classes=args.classes,
                                      max_count=args.max_count, max_size=args.max_size,
                                      workers=args.workers, overwrite=args.overwrite)
            print(f"{args.out}: {m.total_samples} clips, {m.num_classes} classes, {len(m.shards)} shards")
        else:
            if args.max_size is not None:
                print("note: --max-size is ignored for synthetic data (sizes are unknown until generated)",
                      file=sys.stderr)
            folders = make_synthetic(args.out, args.kind, args.preset, args.seed, workers=args.workers,
                                     overwrite=args.overwrite, max_count=args.max_count)
            for name, folder in folders.items():
                print(f"{name}: {folder}")
    except (BuildError, ManifestError) as e:
        print(f"make_shards.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
