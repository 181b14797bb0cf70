"""Command line of ``jobs/visualize.py``: load a model, prepare inputs, write the figures of
:mod:`pipeline.visualize`, print their paths.

Models: a registered Glimpse / MLflow model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``,
``runs:/ID/model``), a training checkpoint or ``final_model`` folder, a weights file with ``--model-name``,
or just ``--model-name`` (random weights; the presets build small random models of every family).
Inputs: image files, video files, or synthetic samples (the digits of :mod:`datasets.synthetic`, rendered
at the model's input size: the same generator as the synthetic shards' validation split). Every pixel
transform is :mod:`datasets.media_inputs`'s, with the size, frames and mean/std of the model's
``pretrained_cfg`` (:func:`pipeline.visualize.geometry.model_media_spec`); ``--model-kwargs`` go through
the one override parser, :func:`pipeline.config.parse_key_values`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.visualize.drawing import safe_label

logger = logging.getLogger("glimpse.visualize")

__all__ = ["PRESETS", "Preset", "UsageError", "build_parser", "load_cli_models", "perturb_zero_weights",
           "run_visualize_job"]

ModelPreset = tuple[str, dict[str, Any], float]  # (name, kwargs, perturb std)

# Small random models of every family with geometry. Random weights: the figures show the mechanics, not a
# trained model's attention. ``perturb`` (see perturb_zero_weights) makes the zero-initialised geometry
# layers move points by roughly a tenth of the image (measured per model).
_SMOKE_MODELS: tuple[ModelPreset, ...] = (
    ("sparseformer_tiny", dict(img_size=64, num_latent_tokens=16, dims=(32, 64), depths=(4, 1), num_points=9,
                               num_heads=4, num_classes=10), 0.5),
    ("psvit_ti_14", dict(img_size=64, embed_dim=32, depth=2, num_heads=2, num_points=8, num_iters=4,
                         stem_widths=(32, 32), num_classes=10), 0.3),
    ("deit_small_ats", dict(img_size=64, patch_size=8, embed_dim=64, depth=6, num_heads=4, ats_stages=(1, 3, 5),
                            ats_ratio=0.6, num_classes=10), 0.0),
    ("video_sparseformer_tiny", dict(img_size=32, num_frames=8, inflation=2, num_latent_tokens=9, dims=(32, 64),
                                     depths=(4, 1), num_points=9, num_heads=4, num_classes=8), 0.3),
    ("timesformer_base_ats", dict(img_size=32, patch_size=8, num_frames=8, embed_dim=64, depth=6, num_heads=4,
                                  ats_ratio=0.6, num_classes=8), 0.0),
)
_DEMO_MODELS: tuple[ModelPreset, ...] = (
    ("sparseformer_tiny", dict(num_classes=10), 1.5),
    ("psvit_ti_14", dict(num_classes=10), 8.0),
    ("deit_small_ats", dict(ats_ratio=0.8, num_classes=10), 0.0),
    ("psvit_b_14_ats", dict(ats_ratio=0.8, num_classes=10), 2.5),
    ("video_sparseformer_tiny", dict(img_size=112, num_frames=8, inflation=4, num_classes=8), 1.0),
    ("timesformer_base_ats", dict(img_size=112, num_frames=8, embed_dim=192, depth=6, num_heads=3, ats_ratio=0.7,
                                  num_classes=8), 0.0),
    ("xvit_8_ats", dict(img_size=112, num_frames=8, embed_dim=192, depth=6, num_heads=3, ats_ratio=0.8,
                        num_classes=8), 0.0),
)


@dataclass(frozen=True)
class Preset:
    models: tuple[ModelPreset, ...]
    samples: int  # synthetic inputs per model
    figures: int  # inputs drawn one by one (the kept-token histogram uses all)


PRESETS = {
    "smoke": Preset(models=_SMOKE_MODELS, samples=2, figures=2),
    "demo": Preset(models=_DEMO_MODELS, samples=8, figures=3),
}


class UsageError(ValueError):
    """A user input the job refuses (exit status 2, one line on stderr)."""


# ----------------------------------------------------------------------------------------------- models

def parse_model_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``--model-kwargs`` items -> kwargs (:func:`pipeline.config.parse_key_values`)."""
    from pipeline.config import ConfigError, parse_key_values

    try:
        return parse_key_values(items)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def perturb_zero_weights(model: nn.Module, std: float, seed: int = 0) -> int:
    """Give every all-zero weight matrix (PS-ViT offset layers, SparseFormer RoI / offset layers, ...) values
    from N(0, (std / sqrt(fan_in))^2), so a random model moves its sampling points. Returns how many tensors
    changed. For pictures of random models only: it changes what the model computes."""
    if std <= 0:
        return 0
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * (std / p.shape[-1] ** 0.5))
                changed += 1
    return changed


def _tracking_uri(args: argparse.Namespace) -> str:
    from pipeline.tracking import default_tracking_uri

    return args.tracking_uri or default_tracking_uri("./runs")


def _load_given_model(args: argparse.Namespace, kwargs: dict[str, Any]) -> tuple[str, nn.Module]:
    """``--model``: a registry URI, a checkpoint / final_model folder (or its state file), or a weights file
    (with ``--model-name``)."""
    from models import create_model
    from pipeline.tracking.model_store import STATE_NAME, load_model
    from pipeline.train.checkpointing import STATE_FILE

    src = args.model
    path = Path(src).expanduser()
    registry = src.startswith(("models:/", "runs:/"))
    if registry or path.is_dir():
        if args.model_name or kwargs:
            raise UsageError(f"--model {src} names its own architecture: drop --model-name / --model-kwargs")
        model, _ = load_model(src, tracking_uri=_tracking_uri(args)) if registry else load_model(str(path))
    elif path.is_file() and path.name in (STATE_NAME, STATE_FILE):
        model, _ = load_model(str(path.parent))
    elif path.is_file():
        if not args.model_name:
            raise UsageError(f"--model {src} is a weights file: give --model-name (its architecture) too")
        model = create_model(args.model_name, checkpoint_path=str(path), **kwargs)
    else:
        raise UsageError(f"--model {src}: no such file or folder (give a checkpoint folder, a weights file "
                         "with --model-name, models:/NAME@ALIAS or models:/NAME/VERSION)")
    return safe_label(src if registry else path.name), model.eval()


def load_cli_models(args: argparse.Namespace, preset: Preset) -> list[tuple[str, nn.Module]]:
    """(label, model) pairs to draw, from ``--model`` / ``--model-name`` or the preset."""
    from models import create_model

    kwargs = parse_model_kwargs(args.model_kwargs)
    if args.model:
        return [_load_given_model(args, kwargs)]
    if args.model_name:
        model = create_model(args.model_name, **kwargs).eval()
        perturb_zero_weights(model, args.perturb_init or 0.0, args.seed)
        return [(args.model_name, model)]
    out = []
    for name, preset_kwargs, perturb in preset.models:
        torch.manual_seed(args.seed)
        model = create_model(name, **{**preset_kwargs, **kwargs}).eval()
        perturb_zero_weights(model, perturb if args.perturb_init is None else args.perturb_init, args.seed)
        out.append((name, model))
    return out


# ----------------------------------------------------------------------------------------------- figures

def draw_model(label: str, model: nn.Module, args: argparse.Namespace, preset: Preset, out: Path) -> list[Path]:
    """The geometry figures of one model on the files of ``args.inputs`` or synthetic samples."""
    from datasets.media_inputs import load_media_files, synthetic_media
    from models.ats import set_ats_k
    from models.trace import KeptTokens
    from pipeline.visualize.figures import geometry_figures
    from pipeline.visualize.geometry import (
        collect_kept_counts,
        geometry_family,
        model_media_spec,
        probe_trace,
    )

    trace = probe_trace(model)
    geometry_family(model, trace)  # refuse models without geometry before reading any input
    if args.ats_k is not None or args.ats_ratio is not None:
        try:
            set_ats_k(model, k=args.ats_k, ratio=args.ats_ratio)
        except ValueError as exc:
            raise UsageError(f"{label}: {exc}") from exc
    spec = model_media_spec(model)
    x = (load_media_files(args.inputs, spec) if args.inputs
         else synthetic_media(args.synthetic or preset.samples, spec, args.seed))
    figures = min(args.figures or preset.figures, x.shape[0])
    logger.info("%s: %d inputs of shape %s, %d drawn one by one", label, x.shape[0], tuple(x.shape[1:]), figures)
    counts = None
    if x.shape[0] > figures and any(isinstance(r, KeptTokens) for r in trace):
        counts = collect_kept_counts(model, x.split(8))  # the histogram over every input, the masks for a few
    return geometry_figures(model, x, out / label, mean=spec.mean, std=spec.std, max_samples=figures, dpi=args.dpi,
                            max_frames=args.max_frames, kept_counts=counts)


def safe_run_label(run_id: str) -> str:
    return f"run_{safe_label(run_id)}"


def draw_run(args: argparse.Namespace, out: Path) -> list[Path]:
    """Training curves and the per-class accuracy of an MLflow run (its ``eval_results.json``)."""
    from mlflow.tracking import MlflowClient

    from pipeline.visualize.mlflow_io import run_figures

    client = MlflowClient(tracking_uri=_tracking_uri(args))
    summary = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            summary = json.loads(Path(client.download_artifacts(args.run_id, "eval_results.json", tmp)).read_text())
        except Exception as exc:  # no evaluation logged: curves only
            logger.info("run %s has no eval_results.json (%s): no per-class figure", args.run_id, type(exc).__name__)
    return run_figures(client, args.run_id, summary, out_dir=out / safe_run_label(args.run_id), dpi=args.dpi)


# ----------------------------------------------------------------------------------------------- main

def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, a checkpoint "
                                   "or final_model folder, or a weights file (with --model-name)")
    p.add_argument("--model-name", help="registered model name (models.list_models()); random weights unless "
                                        "--model gives a weights file")
    p.add_argument("--model-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                   help="constructor overrides with --model-name, e.g. img_size=64 num_frames=8 (takes every "
                        "following word: give input files before it or after another option)")
    p.add_argument("--ats-ratio", type=float, help="ATS K as a ratio of each stage's input tokens (inference knob)")
    p.add_argument("--ats-k", type=int, help="ATS K as a count for every stage")
    p.add_argument("--perturb-init", type=float, default=None, metavar="STD",
                   help="random weights only: give all-zero weight matrices N(0, STD) values so sampling points "
                        "move (default: the preset's for preset models, 0 with --model-name)")


def build_parser(description: str) -> argparse.ArgumentParser:
    """The job's options (``python jobs/visualize.py --help``)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="without --model / --model-name / --run-id the preset's small random "
                                       "models of every family are drawn")
    p.add_argument("inputs", nargs="*", help="image files (jpg, png, ...) or video files (mp4, ...); "
                                             "default: synthetic digits rendered at the model's input size")
    p.add_argument("--preset", default="demo", choices=list(PRESETS),
                   help="smoke: tiny random models, 2 inputs (< 2 min); demo (default): paper-size image models "
                        "and small video models, 8 inputs")
    _add_model_options(p)
    p.add_argument("--tracking-uri", default="", help="MLflow (default MLFLOW_TRACKING_URI or ./runs/mlflow.db)")
    p.add_argument("--run-id", help="also draw this MLflow run's training curves and per-class accuracy")
    p.add_argument("--log-to-run", action="store_true", help="attach the PNGs to --run-id under figures/")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="synthetic inputs (default: the preset's)")
    p.add_argument("--figures", type=int, default=0, metavar="N",
                   help="inputs drawn one by one (default: the preset's); the ATS histogram uses all inputs")
    p.add_argument("--max-frames", type=int, default=8, help="frames per clip shown (evenly spaced)")
    p.add_argument("--dpi", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--out", default="figures", help="output folder (one subfolder per model)")
    return p


def _draw_all(args: argparse.Namespace, preset: Preset, out: Path) -> list[Path]:
    if args.log_to_run and not args.run_id:
        raise UsageError("--log-to-run needs --run-id")
    paths: list[Path] = []
    if args.run_id:
        paths += draw_run(args, out)
    if args.model or args.model_name or not args.run_id:
        for label, model in load_cli_models(args, preset):
            paths += draw_model(label, model, args, preset, out)
    if args.log_to_run:
        from pipeline.visualize.mlflow_io import log_figures

        log_figures(_tracking_uri(args), args.run_id, paths, root=out)
    return paths


def run_visualize_job(argv: Sequence[str] | None, description: str) -> int:
    """Parse, draw, print each PNG path. Exit 0 on success, 2 on refused input (one ``error:`` line)."""
    from pipeline.console import configure_logging

    args = build_parser(description).parse_args(argv)
    configure_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paths = _draw_all(args, PRESETS[args.preset], Path(args.out).expanduser())
    except (ValueError, FileNotFoundError) as exc:  # UsageError, no geometry, unknown model, bad kwargs or file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # an unknown registered model or run: say which, no traceback
        if type(exc).__name__ in ("MlflowException", "RestException"):
            print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    for p in paths:
        print(os.fspath(p), flush=True)
    return 0
