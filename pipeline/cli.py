"""The command lines of the training, evaluation and benchmark jobs (``jobs/*.py`` are thin wrappers).

Dotted overrides (``train.epochs=3 model.name=frame_tcn_small``) go anywhere on the line, before or after
the options (``--name my-run train.lr=1e-3``); they are parsed by the one parser,
:mod:`pipeline.config.overrides`.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, resolve_config
from pipeline.presets import EVAL_PRESETS

logger = logging.getLogger("glimpse")

OVERRIDES_EPILOG = ("overrides: dotted keys anywhere on the line, e.g. train.epochs=3 model.name=frame_tcn_small "
                    "data.train=/shards/k400/train cluster.num_workers=4")


class OverrideParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose positional ``overrides`` may be interleaved with the options."""

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        return self.parse_intermixed_args(args, namespace)


def override_parser(description: str) -> OverrideParser:
    parser = OverrideParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog=OVERRIDES_EPILOG)
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the preset")
    return parser


def training_parser(description: str, presets: Mapping[str, Any], default: str) -> OverrideParser:
    parser = override_parser(description)
    parser.add_argument("--preset", default=default, choices=list(presets), help=f"named settings (default {default})")
    parser.add_argument("--config", help="YAML file applied after the preset, before the overrides")
    parser.add_argument("--register", default=None, help="register the final model in MLflow under this name")
    parser.add_argument("--name", default=None, help="run name (the same name resumes the run)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def resolve_from_args(args: argparse.Namespace, presets: Mapping[str, Any]) -> ExperimentConfig:
    overrides = list(args.overrides)
    if args.register is not None:
        overrides.append(f"tracking.register={args.register}")
    if args.name:
        overrides.append(f"cluster.name={args.name}")
    return resolve_config(presets, args.preset, overrides, args.config)


def _where(result) -> str:
    """The closing lines of a training job: where the run, its figures and the MLflow UI are."""
    lines = [f"run folder: {result.run_dir}", f"figures:    {result.figures_dir}",
             f"MLflow UI:  {result.mlflow_ui}"]
    return "\n".join(lines)


def run_training_job(argv: Sequence[str] | None, description: str, presets: Mapping[str, Any], default: str) -> int:
    """Parse, resolve, print, train, print the summary. Exit code 0 on success, 1 on a failed run, 2 on bad config."""
    from pipeline.console import configure_logging
    from pipeline.context import finalize
    from pipeline.train.launch import run_training

    configure_logging()
    args = training_parser(description, presets, default).parse_args(argv)
    try:
        cfg = finalize(resolve_from_args(args, presets))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"# resolved configuration (preset {args.preset})\n{cfg.to_yaml()}", flush=True)
    if args.print_config:
        return 0
    try:
        result = run_training(cfg)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if result.error:
        print(f"training failed: {result.error}\n{_where(result)}", file=sys.stderr, flush=True)
        return 1
    if result.eval:
        print(f"final evaluation: top-1 {result.eval['top1']:.3f}, top-5 {result.eval['top5']:.3f} over "
              f"{result.eval['num_videos']} samples ({result.eval.get('views_spec')} views); run {result.run_name}",
              flush=True)
    if result.model.get("registered_name"):
        print(f"registered: models:/{result.model['registered_name']}/{result.model['registered_version']}", flush=True)
    print(_where(result), flush=True)
    return 0


def evaluation_parser(description: str, family: str) -> argparse.ArgumentParser:
    presets = EVAL_PRESETS[family]
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", choices=list(presets),
                        help="smoke/demo evaluate the model the matching training preset registered")
    parser.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model or a checkpoint folder")
    parser.add_argument("--data", default="", help="shard source (default: the model's validation data)")
    if family == "kinetics":
        parser.add_argument("--views", help="KxS temporal clips x spatial crops, e.g. 4x3 (default: the model's)")
        parser.add_argument("--aggregate", choices=["prob", "logit"], help="average softmax scores or logits")
    parser.add_argument("--batch-size", type=int, default=0)
    parser.add_argument("--num-workers", type=int, default=1, help="Ray workers")
    parser.add_argument("--tracking-uri", default="", help="MLflow (default MLFLOW_TRACKING_URI or ./runs/mlflow.db)")
    parser.add_argument("--output", default="eval_results.json")
    return parser


def run_eval_job(argv: Sequence[str] | None, description: str, family: str) -> int:
    """Parse, evaluate on Ray, print the summary. Exit code 0 on success, 2 on a bad model or argument."""
    from pipeline.console import configure_logging
    from pipeline.evaluation.standalone import EvalRequest, run_evaluation

    args = evaluation_parser(description, family).parse_args(argv)
    configure_logging()
    preset = EVAL_PRESETS[family][args.preset]
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
