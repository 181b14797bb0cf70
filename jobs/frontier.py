"""The accuracy-GFLOPs frontier of ATS, ToMe and EViT on real data (scikit-learn's digits), on a CPU.

Trains a small ViT on the digits that ship inside scikit-learn, applies every token reducer off the shelf,
sweeps each knob and writes ``frontier.csv`` and ``frontier.png`` (top-1 against measured average GFLOPs,
ATS Fig. 4's layout) under ``--out``, logged to MLflow (``--tracking-uri``; default: SQLite under ./runs).

    python jobs/frontier.py --preset smoke       # < 1 min
    python jobs/frontier.py                      # demo: a few minutes on 2 cores
    python jobs/frontier.py --preset full --out runs/frontier-full
    ray job submit --working-dir . -- python jobs/frontier.py --preset demo
"""

import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702,I001

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402

from pipeline.frontier import PRESETS, run_frontier  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="smoke, demo (default) or full")
    parser.add_argument("--out", default="", help="output folder (default: runs/frontier-<preset>)")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI (default: SQLite in ./runs)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the CSV and PNG only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    out = args.out or f"runs/frontier-{args.preset}"
    uri = ""
    if not args.no_mlflow:
        from pipeline.tracking import default_tracking_uri

        uri = args.tracking_uri or default_tracking_uri("runs")
    summary = run_frontier(PRESETS[args.preset], out, tracking_uri=uri)
    rows = summary.pop("rows")
    print(json.dumps(summary, indent=2, default=str))
    for r in rows:
        print(f"{r['method']:10s} {r['knob']}={r['value']!s:9s} top-1 {r['top1']:.4f}  GFLOPs {r['gflops']:.5f}")
    print(f"frontier: {summary['csv']} and {summary['png']}" + (f"; MLflow: mlflow ui --backend-store-uri {uri}"
                                                               if uri else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
