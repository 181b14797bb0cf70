"""Final models in MLflow: logging (``mlflow.pytorch`` with signature and input example), registering
with aliases, and loading back from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``runs:/...``.

The logged model carries, beside MLflow's own pickled copy, Glimpse's safe pair under
``extra_files/``: ``glimpse_state.pt`` (tensors, loaded with ``weights_only=True``) and
``glimpse_config.json`` (the experiment config). ``load_model`` rebuilds the architecture from the
config and loads the tensors, so nothing is unpickled; ``mlflow.pytorch.load_model`` also works
for users who trust the store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline import checkpointing
from pipeline.config import ExperimentConfig

logger = logging.getLogger(__name__)

STATE_NAME = "glimpse_state.pt"
CONFIG_NAME = "glimpse_config.json"


def example_input(cfg: ExperimentConfig) -> torch.Tensor:
    d = cfg.data
    if d.kind == "video":
        return torch.zeros(1, 3, d.num_frames, d.crop_size, d.crop_size)
    return torch.zeros(1, 3, d.image_size, d.image_size)


def write_model_files(directory: Path, model: nn.Module, cfg: ExperimentConfig, runtime: dict[str, Any]) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / STATE_NAME)
    meta = {"experiment": cfg.to_dict(), "num_classes": runtime["num_classes"], "classes": list(runtime["classes"])}
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
    return [str(directory / STATE_NAME), str(directory / CONFIG_NAME)]


def log_final_model(tracker, model: nn.Module, cfg: ExperimentConfig, runtime: dict[str, Any],
                    summary: dict[str, Any] | None) -> dict[str, Any]:
    """Log the model to the tracker's run, register it when asked, and write the evaluation JSON.

    If MLflow is unreachable the model files stay in the run folder (``final_model/``) and the
    failure is logged; training results are never lost to a tracking outage.
    """
    import mlflow
    from mlflow.models import infer_signature

    run_dir = Path(runtime["run_dir"])
    out: dict[str, Any] = {"summary": summary}
    if summary is not None and "://" not in str(run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "eval_results.json").write_text(json.dumps(summary, indent=2))
    local_files = write_model_files(run_dir / "final_model", model, cfg, runtime) if "://" not in str(run_dir) else None
    try:
        run_id = tracker.ensure_run()
        mlflow.set_tracking_uri(tracker.tracking_uri)
        # The fluent API refuses a run outside the process's active experiment (another job in this
        # process may have set one): make the run's own experiment the active one.
        mlflow.set_experiment(experiment_id=mlflow.tracking.MlflowClient(tracker.tracking_uri)
                              .get_run(run_id).info.experiment_id)
        x = example_input(cfg)
        with torch.no_grad():
            y = model(x)
        signature = infer_signature(x.numpy(), y.numpy())
        with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=run_id):
            files = local_files or write_model_files(Path(tmp), model, cfg, runtime)
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
        out["model_uri"] = info.model_uri
        if cfg.tracking.register:
            out.update(register(info.model_uri, cfg.tracking.register, cfg.tracking.aliases, tracker.tracking_uri,
                                tags={"eval_top1": f"{summary['top1']:.4f}"} if summary else None))
    except Exception as exc:
        logger.error("could not log the final model to MLflow (%s: %s); it is kept in %s", type(exc).__name__, exc,
                     run_dir / "final_model")
    if "://" not in str(run_dir):
        (run_dir / "final_model.json").write_text(json.dumps({k: v for k, v in out.items() if k != "summary"}))
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
    """Rebuild a logged model from ``models:/NAME@ALIAS``, ``models:/NAME/VERSION``, ``runs:/ID/model``
    or a local ``final_model`` folder, without unpickling. Returns (model in eval mode, metadata)."""
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
