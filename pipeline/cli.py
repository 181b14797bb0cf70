"""Shared command line for the training jobs: ``--preset``, ``--config``, dotted overrides."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, resolve_config


def training_parser(description: str, presets: Mapping[str, Any], default: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="overrides: dotted keys, e.g. train.epochs=3 model.name=frame_tcn_small "
                                            "data.train=/shards/k400/train cluster.num_workers=4")
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings applied after the preset")
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


def run_training_job(argv: Sequence[str] | None, description: str, presets: Mapping[str, Any], default: str) -> int:
    """Parse, resolve, print, train, print the summary. Exit code 0 on success, 2 on bad config."""
    from pipeline.launcher import finalize, run_training

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
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
    print(json.dumps({"result": dataclasses.asdict(result)}, indent=2, default=str), flush=True)
    if result.error:
        return 1
    if result.eval:
        print(f"final evaluation: top-1 {result.eval['top1']:.3f}, top-5 {result.eval['top5']:.3f} over "
              f"{result.eval['num_videos']} samples ({result.eval.get('views_spec')} views); run {result.run_name}; "
              f"MLflow {result.tracking_uri}", flush=True)
    return 0
