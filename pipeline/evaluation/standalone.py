"""Stand-alone evaluation on Ray workers: a model from a checkpoint folder or the MLflow registry,
multi-view testing over a shard source, results to JSON and MLflow.

Each worker loads the model itself (``models:/NAME@ALIAS`` downloads on every node), evaluates its
share of the videos, and rank 0 merges the per-video scores, so every video counts exactly once. The
views are ``--views``, else the ones the model's config was evaluated with, else its pretrained_cfg's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ExperimentConfig, parse_views

logger = logging.getLogger("glimpse.eval")


@dataclass(frozen=True)
class EvalRequest:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, or a local checkpoint folder
    data: str = ""  # shard source; "" = the validation source the model was trained with
    views: str = ""  # "KxS"; "" = the model's config, else its pretrained_cfg test views
    aggregate: Literal["prob", "logit", ""] = ""
    batch_size: int = 0
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    tracking_uri: str = ""
    experiment: str = "glimpse-eval"
    output: str = "eval_results.json"
    address: str = ""


def eval_func(config: dict[str, Any]) -> None:
    """Ray Train worker: evaluate ``config['request']`` on this rank's share of the data."""
    import ray.train  # RAY
    import ray.train.torch  # RAY

    from pipeline.console import quiet_worker_logging
    from pipeline.evaluation.distributed import evaluate_model
    from pipeline.tracking.model_store import load_model

    cfg = ExperimentConfig.from_dict(config["experiment"])
    quiet_worker_logging(cfg.cluster.log_level)
    req = EvalRequest(**config["request"])
    ctx = ray.train.get_context()  # RAY 1: rank and world size
    device = ray.train.torch.get_device()  # RAY 1: this worker's device
    model, meta = load_model(req.model, tracking_uri=req.tracking_uri or None, device=str(device))
    summary = evaluate_model(model, cfg, config["data"], rank=ctx.get_world_rank(), world_size=ctx.get_world_size(),
                             device=device, classes=tuple(meta.get("classes", ())), progress=True)
    if summary is not None:
        Path(config["output"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["output"]).write_text(json.dumps(summary, indent=2))
    ray.train.report({"done": 1})  # RAY 2: on every rank


def evaluation_config(req: EvalRequest, meta: dict[str, Any]) -> ExperimentConfig:
    """The model's training config with the request's views, aggregation and batch size, finalised."""
    from pipeline.context import resolve_geometry

    cfg = ExperimentConfig.from_dict(meta["experiment"])
    if req.views:
        parse_views(req.views, key="--views")
    ev = dataclasses.replace(cfg.eval, views=req.views or cfg.eval.views,
                             aggregate=req.aggregate or cfg.eval.aggregate,
                             batch_size=req.batch_size or cfg.eval.batch_size)
    cfg = dataclasses.replace(cfg, eval=ev)
    data, ev = resolve_geometry(cfg)  # configs stored before geometry was resolved: the model's
    return dataclasses.replace(cfg, data=data, eval=ev)


def run_evaluation(req: EvalRequest) -> dict[str, Any]:
    """Evaluate on Ray and log the summary to MLflow; returns the summary."""
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.data import resolve_sources
    from pipeline.tracking import default_tracking_uri
    from pipeline.tracking.model_store import load_model
    from pipeline.train.launch import init_ray

    tracking_uri = req.tracking_uri or default_tracking_uri("./runs")
    # Read the model's metadata once on the driver (data geometry, classes, views).
    model, meta = load_model(req.model, tracking_uri=tracking_uri)
    cfg = evaluation_config(req, meta)
    data = req.data
    if not data:
        data = resolve_sources(cfg.data).val
    elif "://" not in data and not data.startswith("pipe:"):
        data = str(Path(data).expanduser().resolve())
    output = str(Path(req.output).expanduser().resolve())
    init_ray(req.address)
    request = dataclasses.replace(req, tracking_uri=tracking_uri)
    trainer = TorchTrainer(
        eval_func,
        train_loop_config={"request": dataclasses.asdict(request), "experiment": cfg.to_dict(), "data": data,
                           "output": output},
        scaling_config=ScalingConfig(num_workers=req.num_workers, resources_per_worker={"CPU": req.cpus_per_worker}),
        run_config=RunConfig(name=f"eval-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(Path("./runs").resolve()),
                             logging_config=LoggingConfig(log_level=cfg.cluster.log_level)),
    )
    trainer.fit()
    summary = json.loads(Path(output).read_text())
    _log_evaluation(tracking_uri, req, cfg, data, model, summary, output)
    return summary


def _log_evaluation(tracking_uri: str, req: EvalRequest, cfg: ExperimentConfig, data: str, model, summary: dict,
                    output: str) -> None:
    """One MLflow run for the evaluation (client API: no process-wide active run is changed)."""
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(req.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(req.experiment)
        run_id = client.create_run(exp_id, run_name=f"eval {req.model}").info.run_id
        for key, value in {"model_uri": req.model, "data": data, "views": cfg.eval.views,
                           "aggregate": cfg.eval.aggregate}.items():
            client.log_param(run_id, key, value)
        for key in ("top1", "top5", "mean_class_accuracy", "num_videos"):
            client.log_metric(run_id, f"eval/{key}", float(summary[key]))
        client.log_dict(run_id, summary, "eval_results.json")
        _log_eval_figures(client, run_id, model, cfg, data, summary)
        client.set_terminated(run_id)
    except Exception as exc:
        logger.error("could not log the evaluation to MLflow at %s: %s (results are in %s)", tracking_uri, exc, output)


def _log_eval_figures(client, run_id: str, model, cfg: ExperimentConfig, data: str, summary: dict[str, Any]) -> None:
    """Per-class accuracy and, for models that sample, their geometry on a few inputs (``figures/``)."""
    from pipeline.data import validation_inputs
    from pipeline.visualize import log_figures, run_figures

    try:
        with tempfile.TemporaryDirectory(prefix="glimpse-figures-") as tmp:
            samples = validation_inputs(cfg.data, data, 4, batch_size=4, seed=cfg.train.seed)[0]
            paths = run_figures(None, None, summary, model=model, samples=samples, out_dir=tmp, mean=cfg.data.mean,
                                std=cfg.data.std)
            log_figures(client, run_id, paths, root=tmp)
    except Exception:
        logger.warning("could not draw the evaluation's figures", exc_info=True)
