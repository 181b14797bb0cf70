"""Command line of the evaluation jobs."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from pipeline.config import ConfigError

EVAL_PRESETS = {
    # The model the matching training preset registers; views as the data is small.
    "kinetics": {"smoke": {"model": "models:/glimpse-kinetics-smoke@candidate", "views": "2x1"},
                 "demo": {"model": "models:/glimpse-kinetics-demo@candidate", "views": "2x3"},
                 "k400": {"model": "", "views": ""}},
    "imagenet": {"smoke": {"model": "models:/glimpse-imagenet-smoke@candidate", "views": "1x1"},
                 "demo": {"model": "models:/glimpse-imagenet-demo@candidate", "views": "1x1"},
                 "in1k": {"model": "", "views": "1x1"}},
}


def run_eval_job(argv: Sequence[str] | None, description: str, family: str) -> int:
    from pipeline.evaluate import EvalRequest, run_evaluation

    presets = EVAL_PRESETS[family]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=list(presets),
                        help="smoke/demo evaluate the model the matching training preset registered")
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a checkpoint folder")
    parser.add_argument("--data", default="", help="shard source (default: the model's validation data)")
    if family == "kinetics":
        parser.add_argument("--views", help="KxS temporal clips x spatial crops, e.g. 4x3 (default: per model)")
        parser.add_argument("--aggregate", choices=["prob", "logit"], help="average softmax scores or logits")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1, help="Ray workers")
    parser.add_argument("--tracking-uri", default="", help="MLflow (default MLFLOW_TRACKING_URI or ./runs/mlflow.db)")
    parser.add_argument("--output", default="eval_results.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    preset = presets[args.preset]
    model = args.model or preset["model"]
    if not model:
        print(f"error: --model is required with --preset {args.preset}", file=sys.stderr)
        return 2
    req = EvalRequest(model=model, data=args.data, views=getattr(args, "views", None) or preset["views"],
                      aggregate=getattr(args, "aggregate", None) or "", batch_size=args.batch_size,
                      num_workers=args.num_workers, tracking_uri=args.tracking_uri, output=args.output)
    try:
        summary = run_evaluation(req)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # e.g. an unknown registered model: say which
        if type(exc).__name__ in ("MlflowException", "RestException"):
            print(f"error: cannot load {model}: {exc}", file=sys.stderr)
            return 2
        raise
    print(json.dumps({k: v for k, v in summary.items() if k != "per_class"}, indent=2))
    print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  over {summary['num_videos']} "
          f"({summary['views_spec']} views) -> {args.output}")
    return 0
