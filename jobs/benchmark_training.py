"""Ray Train overhead: samples/s of the Ray Train loop vs the same training step in a plain PyTorch loop.

Same model, data, batch, step and threads; both measured in this one invocation, alternating rounds.

    python jobs/benchmark_training.py                    # demo preset: a few minutes
    python jobs/benchmark_training.py --preset smoke     # under two minutes
    ray job submit --working-dir . -- python jobs/benchmark_training.py --preset demo --json
"""

import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # our `datasets`, not Hugging Face's

from pipeline.cli import override_parser  # noqa: E402
from pipeline.config import resolve_config  # noqa: E402
from pipeline.presets import KINETICS_PRESETS  # noqa: E402
from pipeline.train.benchmark import compare  # noqa: E402

# Two epochs or more, so that the measured window holds an epoch-end checkpoint and a data restart.
PRESETS = {
    "smoke": {"preset": "smoke", "rounds": 1, "overrides": ["train.epochs=2", "data.samples_per_epoch=96"]},
    "demo": {"preset": "demo", "rounds": 3, "overrides": ["train.epochs=2", "data.samples_per_epoch=480"]},
    "full": {"preset": "demo", "rounds": 3, "overrides": ["train.epochs=3"]},
}


def main() -> int:
    from pipeline.console import configure_logging

    parser = override_parser(__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo", choices=list(PRESETS))
    parser.add_argument("--rounds", type=int, default=0, help="alternating rounds (default per preset)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    configure_logging()
    p = PRESETS[args.preset]
    with tempfile.TemporaryDirectory(prefix="glimpse-bench-") as tmp:
        overrides = [*p["overrides"], "cluster.num_workers=1", "cluster.cpus_per_worker=1", "eval.at_end=false",
                     "train.val_every=0", "train.log_every=2", "data.loader_workers=0", "tracking.register=",
                     f"cluster.storage_path={tmp}", *args.overrides]
        cfg = resolve_config(KINETICS_PRESETS, p["preset"], overrides)
        result = compare(cfg, args.rounds or p["rounds"], run_prefix="bench")
    if args.json:
        print(json.dumps(result), flush=True)
    else:
        print(json.dumps(result, indent=2), flush=True)
        print(f"Ray Train / plain loop: {result['ratio_ray_over_plain']:.3f} "
              f"({result['ray_samples_per_s']:.1f} vs {result['plain_samples_per_s']:.1f} samples/s; "
              f"overhead {100 * result['overhead']:.1f}%, aim <= 5%)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
