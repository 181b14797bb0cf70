"""The command line of ``jobs/tune_*.py``: parse, run the sweep, print the frontier and the selection.

What a sweep does: each trial is a full Ray Train run (TorchTrainer, N workers) stopped early by ASHA on
``val/top1``; every trained model is evaluated at each knob setting of the space (``model.ats_ratio`` /
``model.ats_k``: no retraining) and reports top-1 and measured average GFLOPs. The MLflow parent run gets
``frontier.csv`` and ``frontier.png``; the selection is registered. Locally a Ray is started, synthetic
data is built if absent and MLflow is SQLite under ``./runs``; on a cluster, storage and MLflow must be
reachable from every node. ``--resume --name NAME`` continues an interrupted sweep (finished trials kept);
``--model URI`` evaluates an existing model at every knob setting, without training.

Dotted overrides go anywhere on the line and apply to every trial (``pipeline.cli.override_parser``, the
one parser of :mod:`pipeline.config.overrides`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from pipeline.config import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def sweep_parser(description: str, sweeps: Mapping[str, Any], default: str) -> argparse.ArgumentParser:
    from pipeline.cli import override_parser

    p = override_parser(description)
    p.add_argument("--preset", default=None, choices=list(sweeps),
                   help=f"named sweep (default {default} unless --space is given)")
    p.add_argument("--space", help="YAML sweep file (base, overrides, space, num_samples, asha, model)")
    p.add_argument("--model", default="", help="evaluation only: this model (models:/NAME@ALIAS, runs:/ID/model, "
                                               "a checkpoint folder) at every knob setting; no training")
    p.add_argument("--num-samples", type=int, default=None, help="samples of the random dimensions (x grid)")
    p.add_argument("--max-concurrent", type=int, default=None, help="trials at once (default: what the cluster holds)")
    p.add_argument("--grace-period", type=int, default=None, help="ASHA: epochs before a trial can be stopped")
    p.add_argument("--select", choices=["best", "budget", "pareto"], default=None,
                   help="best accuracy, best within --gflops-budget, or the whole Pareto front")
    p.add_argument("--gflops-budget", type=float, default=None, help="GFLOPs per sample allowed (implies budget)")
    p.add_argument("--register", default="", help="register the selected model under this MLflow name")
    p.add_argument("--alias", action="append", default=None, help="alias(es) of the selected model (default best)")
    p.add_argument("--name", default="", help="sweep name (the same name with --resume continues it)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep, keeping finished trials")
    p.add_argument("--print-space", action="store_true", help="print the parsed sweep and exit")
    return p


def _print_result(result) -> None:
    for r in result.rows:
        print(json.dumps({k: r[k] for k in ("trial_id", "status", "setting", "top1", "gflops") if k in r}))
    print(f"sweep {result.name}: {len(result.rows)} points, {result.num_stopped} trials stopped early; "
          f"frontier {result.csv_path}, {result.png_path}", flush=True)
    for s in result.selected:
        print(f"selected: trial {s['trial_id']} at {s['setting']}: top-1 {s['top1']:.4f}, {s['gflops']:.4g} GFLOPs",
              flush=True)
    for r in result.registered:
        print(f"registered {r['registered_name']} version {r['registered_version']} aliases {r['aliases']}", flush=True)
    print(f"MLflow parent run: {result.parent_run_id}\nMLflow UI: mlflow ui --backend-store-uri {result.tracking_uri}",
          flush=True)


def tune_main(argv: Sequence[str] | None, description: str, sweeps: Mapping[str, Mapping[str, Any]],
              train_presets: Mapping[str, Any], default: str = "demo") -> int:
    """``jobs/tune_*.py``: parse, run the sweep, print the selection. Exit 0 ok, 1 failed, 2 bad input,
    130 interrupted (resume it with ``--resume --name``)."""
    from pipeline.console import configure_logging
    from pipeline.sweep.driver import SweepInterrupted, run_sweep
    from pipeline.sweep.space import load_sweep

    configure_logging()
    args = sweep_parser(description, sweeps, default).parse_args(argv)
    preset = args.preset if args.preset or args.space else default
    overrides = list(args.overrides) + ([f"cluster.name={args.name}"] if args.name else [])
    try:
        spec = load_sweep(sweeps, train_presets, preset or "", args.space, overrides, model=args.model,
                          num_samples=args.num_samples, max_concurrent=args.max_concurrent,
                          grace_period=args.grace_period)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"# sweep {spec.source}\n{yaml.safe_dump(spec.describe(), sort_keys=False)}", flush=True)
    if args.print_space:
        return EXIT_OK
    select = args.select or ("budget" if args.gflops_budget is not None else "best")
    try:
        result = run_sweep(spec, name=args.name, resume=args.resume, select=select, gflops_budget=args.gflops_budget,
                           register=args.register or spec.base.tracking.register, aliases=args.alias or ["best"])
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except SweepInterrupted as exc:
        print(f"interrupted: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    _print_result(result)
    return EXIT_OK if result.selected else EXIT_FAILED
