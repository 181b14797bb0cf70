"""Stand-alone evaluation on Ray workers: a model from a checkpoint folder or the MLflow registry,
multi-view testing over a shard source, results to JSON and MLflow.

Each worker loads the model itself (``models:/NAME@ALIAS`` downloads on every node), evaluates its
share of the videos, and rank 0 merges the per-video scores, so every video counts exactly once.
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
    views: str = ""  # "KxS"; "" = the model's default
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
    import ray.train
    import ray.train.torch

    from pipeline.model_store import load_model
    from pipeline.train_loop import evaluate_model

    logging.basicConfig(level=logging.INFO)
    req = EvalRequest(**config["request"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    model, meta = load_model(req.model, tracking_uri=req.tracking_uri or None, device=str(device))
    cfg = ExperimentConfig.from_dict(config["experiment"])
    summary = evaluate_model(model, cfg, config["data"], views=tuple(config["views"]), rank=ctx.get_world_rank(),
                             world_size=ctx.get_world_size(), device=device, classes=tuple(meta.get("classes", ())))
    if summary is not None:
        Path(config["output"]).parent.mkdir(parents=True, exist_ok=True)
        Path(config["output"]).write_text(json.dumps(summary, indent=2))
    ray.train.report({"done": 1})


def run_evaluation(req: EvalRequest) -> dict[str, Any]:
    """Evaluate on Ray and log the summary to MLflow; returns the summary."""
    from mlflow.tracking import MlflowClient
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.evaluation import default_views
    from pipeline.launcher import init_ray
    from pipeline.model_store import load_model
    from pipeline.tracking import default_tracking_uri

    tracking_uri = req.tracking_uri or default_tracking_uri("./runs")
    # Read the model's metadata once on the driver (data geometry, classes, default views).
    model, meta = load_model(req.model, tracking_uri=tracking_uri)
    cfg = ExperimentConfig.from_dict(meta["experiment"])
    views = parse_views(req.views, key="--views") if req.views else \
        default_views(cfg.model.name, cfg.data.kind)
    eval_cfg = dataclasses.replace(cfg.eval, aggregate=req.aggregate or cfg.eval.aggregate,
                                   batch_size=req.batch_size or cfg.eval.batch_size)
    cfg = dataclasses.replace(cfg, eval=eval_cfg)
    data = req.data
    if not data:
        from pipeline.data import resolve_sources

        data = resolve_sources(cfg.data).val
    elif "://" not in data and not data.startswith("pipe:"):
        data = str(Path(data).expanduser().resolve())
    output = str(Path(req.output).expanduser().resolve())
    init_ray(req.address)
    request = dataclasses.replace(req, tracking_uri=tracking_uri)
    trainer = TorchTrainer(
        eval_func,
        train_loop_config={"request": dataclasses.asdict(request), "experiment": cfg.to_dict(), "data": data,
                           "views": list(views), "output": output},
        scaling_config=ScalingConfig(num_workers=req.num_workers, resources_per_worker={"CPU": req.cpus_per_worker}),
        run_config=RunConfig(name=f"eval-{time.strftime('%Y%m%d-%H%M%S')}",
                             storage_path=str(Path("./runs").resolve())),
    )
    trainer.fit()
    summary = json.loads(Path(output).read_text())
    try:
        # The client API, not the fluent one: no process-wide active experiment or run is changed.
        client = MlflowClient(tracking_uri)
        exp = client.get_experiment_by_name(req.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(req.experiment)
        run_id = client.create_run(exp_id, run_name=f"eval {req.model}").info.run_id
        for key, value in {"model_uri": req.model, "data": data, "views": f"{views[0]}x{views[1]}",
                           "aggregate": cfg.eval.aggregate}.items():
            client.log_param(run_id, key, value)
        for key in ("top1", "top5", "mean_class_accuracy", "num_videos"):
            client.log_metric(run_id, f"eval/{key}", float(summary[key]))
        client.log_dict(run_id, summary, "eval_results.json")
        _log_eval_figures(client, run_id, model, cfg, data, summary)
        client.set_terminated(run_id)
    except Exception as exc:
        logger.error("could not log the evaluation to MLflow at %s: %s (results are in %s)", tracking_uri, exc, output)
    return summary


def _log_eval_figures(client, run_id: str, model, cfg: ExperimentConfig, data: str, summary: dict[str, Any]) -> None:
    """Per-class accuracy and, for models that sample, their geometry on a few inputs (``figures/``)."""
    from pipeline.data import validation_inputs
    from pipeline.modeling import input_normalization
    from pipeline.visualize import log_figures, run_figures

    try:
        with tempfile.TemporaryDirectory(prefix="glimpse-figures-") as tmp:
            norm = input_normalization(model)
            samples = validation_inputs(cfg.data, data, 4, batch_size=4, seed=cfg.train.seed, **norm)[0]
            paths = run_figures(None, None, summary, model=model, samples=samples, out_dir=tmp, **norm)
            log_figures(client, run_id, paths, root=tmp)
    except Exception:
        logger.warning("could not draw the evaluation's figures", exc_info=True)
