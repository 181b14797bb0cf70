"""Final models in MLflow: logging (``mlflow.pytorch`` with signature and input example), registering
with aliases, and loading back from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/...``.

The logged model carries, beside MLflow's own copy, Glimpse's safe pair under ``extra_files/``:
``glimpse_state.pt`` (tensors, loaded with ``weights_only=True``) and ``glimpse_config.json`` (the
experiment config and the class list). ``load_model`` rebuilds the architecture from the config (its
inference-time knobs included) and loads the tensors, so nothing is unpickled; ``mlflow.pytorch.load_model``
also works for users who trust the store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import ExperimentConfig
from pipeline.train import checkpointing

logger = logging.getLogger("glimpse.tracking")

STATE_NAME = "glimpse_state.pt"
CONFIG_NAME = "glimpse_config.json"
# The logged input example has two samples: torch.export then keeps the batch dimension dynamic (a
# batch of one would be specialised, with a warning), so MLflow's copy accepts any batch size.
EXAMPLE_BATCH = 2


def write_model_files(directory: Path, model: nn.Module, cfg: ExperimentConfig, classes: Sequence[str]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / STATE_NAME)
    meta = {"experiment": cfg.to_dict(), "num_classes": len(classes), "classes": list(classes)}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return [str(directory / STATE_NAME), str(directory / CONFIG_NAME)]


def _log_to_mlflow(tracker, model: nn.Module, cfg: ExperimentConfig, files: list[str] | None,
                   classes: Sequence[str], summary: dict[str, Any] | None) -> str:
    """Log the model to the tracker's run (a torch.export program, else a pickle); returns its URI."""
    import mlflow
    from mlflow.models import infer_signature

    from pipeline.modeling import example_input

    run_id = tracker.ensure_run()
    mlflow.set_tracking_uri(tracker.tracking_uri)
    # The fluent API refuses a run outside the process's active experiment (another job in this
    # process may have set one): make the run's own experiment the active one.
    mlflow.set_experiment(experiment_id=mlflow.tracking.MlflowClient(tracker.tracking_uri)
                          .get_run(run_id).info.experiment_id)
    x = example_input(cfg, EXAMPLE_BATCH)
    with torch.no_grad():
        y = model(x)
    signature = infer_signature(x.numpy(), y.numpy())
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
        files = files or write_model_files(Path(tmp), model, cfg, classes)
        if summary is not None:
            mlflow.log_dict(summary, "eval_results.json")
        common = dict(name="model", signature=signature, input_example=x.numpy(), extra_files=files,
                      pip_requirements=_requirements())
        try:
            # MLflow 3 saves a torch.export program by default: loading it unpickles nothing.
            info = mlflow.pytorch.log_model(model, serialization_format="pt2", **common)
        except Exception as exc:  # data-dependent shapes (e.g. ATS) may not export
            logger.warning("torch.export of %s failed (%s); MLflow's copy is pickled instead (Glimpse's "
                           "loader still reads the safe state dict)", cfg.model.name, type(exc).__name__)
            info = mlflow.pytorch.log_model(model, serialization_format="pickle", **common)
    return info.model_uri


def log_final_model(tracker, model: nn.Module, cfg: ExperimentConfig, classes: Sequence[str],
                    summary: dict[str, Any] | None, run_dir: str) -> dict[str, Any]:
    """Log the model to the tracker's run, register it when ``cfg.tracking.register`` says so, and write
    ``eval_results.json`` / ``final_model/`` / ``final_model.json`` into a local ``run_dir``.

    If MLflow is unreachable the model files stay in the run folder (``final_model/``) and the
    failure is logged; training results are never lost to a tracking outage.
    """
    local = "://" not in run_dir
    folder = Path(run_dir)
    out: dict[str, Any] = {"summary": summary}
    if summary is not None and local:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "eval_results.json").write_text(json.dumps(summary, indent=2))
    files = write_model_files(folder / "final_model", model, cfg, classes) if local else None
    try:
        out["model_uri"] = _log_to_mlflow(tracker, model, cfg, files, classes, summary)
        if cfg.tracking.register:
            out.update(register(out["model_uri"], cfg.tracking.register, cfg.tracking.aliases, tracker.tracking_uri,
                                tags={"eval_top1": f"{summary['top1']:.4f}"} if summary else None))
    except Exception as exc:
        logger.error("could not log the final model to MLflow (%s: %s); it is kept in %s", type(exc).__name__, exc,
                     folder / "final_model")
    if local:
        (folder / "final_model.json").write_text(json.dumps({k: v for k, v in out.items() if k != "summary"}))
    return out


def _requirements() -> list[str]:
    import timm

    return [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}"]


def register(model_uri: str, name: str, aliases: tuple[str, ...] | list[str], tracking_uri: str,
             tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Register ``model_uri`` under ``name`` and point each alias at the new version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    version = mlflow.register_model(model_uri, name, tags=tags)
    client = MlflowClient(tracking_uri=tracking_uri)
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s (aliases: %s)", name, version.version, ", ".join(aliases) or "none")
    return {"registered_name": name, "registered_version": int(version.version), "aliases": list(aliases)}


def load_model(uri: str, tracking_uri: str | None = None, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a logged model from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model``,
    a local ``final_model`` folder or a training checkpoint folder, without unpickling. Returns (model in
    eval mode, metadata: ``experiment``, ``num_classes``, ``classes``)."""
    import mlflow

    if Path(uri).is_dir() and (Path(uri) / checkpointing.STATE_FILE).is_file():
        # A training checkpoint folder (state.pt + config.json), e.g. from Ray Train's storage.
        meta = checkpointing.load_config(uri)
        state = checkpointing.load_state(uri)["model"]
        return _rebuild(meta, state, device), meta
    if Path(uri).is_dir():
        directory = Path(uri)
    else:
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        directory = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri)) / "extra_files"
    meta_path = directory / CONFIG_NAME
    if not meta_path.is_file():
        raise FileNotFoundError(f"{uri}: no {CONFIG_NAME}; was this model logged by Glimpse?")
    meta = json.loads(meta_path.read_text())
    state = torch.load(directory / STATE_NAME, map_location="cpu", weights_only=True)
    return _rebuild(meta, state, device), meta


def _rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor], device: str) -> nn.Module:
    from pipeline.modeling import build_model

    cfg = ExperimentConfig.from_dict(meta["experiment"])
    # The architecture only: weights come from ``state``, not from the original pretrained file.
    model = build_model(dataclasses.replace(cfg.model, pretrained=""), meta["num_classes"])
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
