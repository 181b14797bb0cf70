"""The figures of a run and MLflow: reading its metric history, making every figure that applies
(:func:`run_figures`) and attaching the PNGs to the run under ``figures/`` (:func:`log_figures`).

MLflow is imported only by the functions that talk to it. ``source`` / ``destination`` is a Glimpse
:class:`pipeline.tracking.Tracker` (recognised by its methods, so a test double or a subclass works), an
``MlflowClient`` or a tracking URI.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch import Tensor

from pipeline.visualize.curves import DEFAULT_CURVE_METRICS, plot_per_class_accuracy, plot_training_curves
from pipeline.visualize.drawing import save_figure
from pipeline.visualize.figures import geometry_figures
from pipeline.visualize.geometry import has_sampling_geometry, unwrap

logger = logging.getLogger(__name__)

__all__ = ["log_figures", "metric_history", "run_figures"]


def _mlflow_client(source: Any):
    """An ``MlflowClient`` from a client, a Glimpse ``Tracker`` (its tracking URI) or a tracking URI."""
    from mlflow.tracking import MlflowClient

    if isinstance(source, str):
        return MlflowClient(tracking_uri=source)
    if hasattr(source, "get_metric_history"):
        return source
    uri = getattr(source, "tracking_uri", None)
    if uri is None:
        raise TypeError(f"expected an MlflowClient, a pipeline.tracking.Tracker or a tracking URI, got "
                        f"{type(source).__name__}")
    return MlflowClient(tracking_uri=uri)


def _is_tracker(source: Any) -> bool:
    return hasattr(source, "log_artifact") and hasattr(source, "flush") and hasattr(source, "ensure_run")


def metric_history(source: Any, run_id: str | None = None, metrics: Sequence[str] | None = DEFAULT_CURVE_METRICS
                   ) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of an MLflow run, sorted by step (last value kept for a repeated step).

    ``source``: an ``MlflowClient``, a Glimpse ``Tracker`` (flushed first, its run by default) or a tracking
    URI. ``metrics``: keys to read (absent ones are skipped); None = every metric the run logged.
    """
    if _is_tracker(source):
        source.flush()
        run_id = run_id or source.ensure_run()
    if not run_id:
        raise ValueError("metric_history needs a run id")
    client = _mlflow_client(source)
    logged = client.get_run(run_id).data.metrics
    keys = sorted(logged) if metrics is None else [k for k in metrics if k in logged]
    out: dict[str, list[tuple[int, float]]] = {}
    for key in keys:
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, float(m.value))
        out[key] = [(s, v) for s, (_, v) in sorted(by_step.items())]
    return out


def _artifact_folder(path: Path, artifact_path: str, root: str | Path | None) -> str:
    """``figures`` or, below ``root``, ``figures/<the folders between root and path>``."""
    if root is None:
        return artifact_path
    rel = path.resolve().parent.relative_to(Path(root).resolve()).as_posix()
    return artifact_path if rel == "." else f"{artifact_path}/{rel}"


def log_figures(destination: Any, run_id: str | None, paths: Sequence[str | Path], artifact_path: str = "figures",
                root: str | Path | None = None) -> bool:
    """Attach PNGs to an MLflow run under ``artifact_path``. Returns True when they were sent.

    ``destination``: a Glimpse ``Tracker`` (buffered and flushed: an unreachable server costs a warning and
    the files wait in its buffer; ``run_id`` may be None), an ``MlflowClient`` or a tracking URI (``run_id``
    required). With ``root`` (e.g. the ``out_dir`` of :func:`run_figures`) the folders below it are kept:
    ``root/geometry/a.png`` goes to ``figures/geometry/a.png``; without, every file lands in ``figures/``.
    """
    files = [Path(p) for p in paths]
    if _is_tracker(destination):
        for p in files:
            destination.log_artifact(str(p), _artifact_folder(p, artifact_path, root))
        return bool(destination.flush())
    if not run_id:
        raise ValueError("log_figures needs a run id with an MlflowClient or tracking URI")
    client = _mlflow_client(destination)
    for p in files:
        client.log_artifact(run_id, str(p), _artifact_folder(p, artifact_path, root))
    return True


def _curves(source: Any, run_id: str | None, metrics: Sequence[str] | None, path: Path, dpi: int) -> list[Path]:
    """``training_curves.png``, or nothing (with a warning) when the metric history cannot be read."""
    try:
        history = metric_history(source, run_id, metrics)
    except Exception as exc:  # tracking server down: the other figures are still made (as Tracker does)
        logger.warning("no training curves: cannot read the metric history (%s: %s)", type(exc).__name__, exc)
        return []
    return [save_figure(plot_training_curves(history), path, dpi)]


def run_figures(tracker_or_client: Any, run_id: str | None, summary: Mapping[str, Any] | None,
                model: nn.Module | None = None, samples: Tensor | Mapping[str, Any] | None = None,
                out_dir: str | Path = "figures", *, metrics: Sequence[str] | None = DEFAULT_CURVE_METRICS,
                max_samples: int = 4, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                dpi: int = 100, kept_counts: Mapping[int, Sequence[int]] | None = None) -> list[Path]:
    """The figures of a finished run, written to ``out_dir``; returns the PNG paths.

    * ``training_curves.png`` from the run's metric history (``tracker_or_client``: a Glimpse ``Tracker``,
      flushed first, an ``MlflowClient`` or a tracking URI; None or a disabled Tracker skips the curves, and
      an unreachable server skips them with a warning instead of raising);
    * ``per_class_accuracy.png`` from ``summary`` (``pipeline.evaluation.summarize``'s dict; skipped when
      None or without ``per_class``);
    * the geometry figures of :func:`~pipeline.visualize.figures.geometry_figures` (prefix ``geometry/``)
      when ``model`` and ``samples`` are given AND the model has sampling geometry; other models are skipped
      silently (logged at INFO). ``kept_counts`` (``collect_kept_counts`` over more inputs) feeds the ATS K'
      histogram.

    Attach them to the run with ``log_figures(tracker_or_client, run_id, paths, root=out_dir)``.
    """
    out = Path(out_dir)
    paths: list[Path] = []
    if tracker_or_client is not None and getattr(tracker_or_client, "enabled", True):
        paths += _curves(tracker_or_client, run_id, metrics, out / "training_curves.png", dpi)
    if summary is not None and summary.get("per_class"):
        paths.append(save_figure(plot_per_class_accuracy(summary), out / "per_class_accuracy.png", dpi))
    if model is not None and samples is not None:
        if has_sampling_geometry(model):
            paths += geometry_figures(model, samples, out / "geometry", mean=mean, std=std, max_samples=max_samples,
                                      dpi=dpi, kept_counts=kept_counts)
        else:
            logger.info("no geometry figures: %s has no sampling geometry", type(unwrap(model)).__name__)
    return paths
