"""Driver side: connect to Ray, build the TorchTrainer from the configuration, run it, collect results.

    cfg = resolve_config(KINETICS_PRESETS, "demo", overrides)
    result = run_training(finalize(cfg))

With ``cluster.address`` empty and no ``RAY_ADDRESS`` (``ray job submit`` sets it), a local Ray is
started in this process; otherwise the given cluster is used.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig, parse_views
from pipeline.data import resolve_sources
from pipeline.evaluation import default_views
from pipeline.tracking import default_tracking_uri

logger = logging.getLogger("glimpse")

REPO_ROOT = Path(__file__).resolve().parents[1]


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS``, or start a local Ray.

    Locally, workers get the repository on ``PYTHONPATH`` so they import Glimpse's ``datasets``
    package (not Hugging Face's) without an install.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if address != "auto" else None, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, log_to_driver=True)


def is_local(path: str) -> bool:
    return "://" not in path


def finalize(cfg: ExperimentConfig) -> ExperimentConfig:
    """Fill what a run needs before it starts (its name, an absolute storage path); once, on the driver."""
    cluster = cfg.cluster
    name = cluster.name or f"{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage = str(Path(cluster.storage_path).expanduser().resolve()) if is_local(cluster.storage_path) \
        else cluster.storage_path
    return dataclasses.replace(cfg, cluster=dataclasses.replace(cluster, name=name, storage_path=storage))


@dataclass
class TrainResult:
    run_dir: str
    run_name: str
    tracking_uri: str
    eval: dict[str, Any] | None
    model: dict[str, Any]
    error: str | None


def runtime_info(cfg: ExperimentConfig) -> dict[str, Any]:
    """Facts resolved on the driver and shipped to every worker (absolute sources, classes, tracking)."""
    sources = resolve_sources(cfg.data)
    storage = cfg.cluster.storage_path
    tracking_uri = cfg.tracking.tracking_uri or default_tracking_uri(storage)
    artifact_root = None
    if tracking_uri.startswith("sqlite:") and is_local(storage):
        artifact_root = (Path(storage) / "mlartifacts").as_uri()
    views = parse_views(cfg.eval.views) if cfg.eval.views else default_views(cfg.model.name, cfg.data.kind)
    return {"train": sources.train, "val": sources.val, "num_classes": sources.num_classes,
            "classes": list(sources.classes), "train_samples": sources.train_samples,
            "tracking_uri": tracking_uri, "artifact_root": artifact_root, "run_name": cfg.cluster.name,
            "run_dir": f"{storage.rstrip('/')}/{cfg.cluster.name}", "views": list(views),
            "threads_per_worker": max(1, int(cfg.cluster.cpus_per_worker))}


def build_trainer(cfg: ExperimentConfig, runtime: dict[str, Any], train_func=None, callbacks: list | None = None):
    """The TorchTrainer for ``cfg``; ``callbacks`` are Ray Train ``UserCallback`` s (e.g. Tune's
    ``TuneReportCallback`` when the trainer runs inside a Tune trial, see ``pipeline.tune``)."""
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train_loop import train_func as default_train_func

    cluster = cfg.cluster
    if cluster.use_gpu == "auto":
        use_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    else:
        use_gpu = cluster.use_gpu == "true"
    return TorchTrainer(
        train_func or default_train_func,
        train_loop_config={"experiment": cfg.to_dict(), "runtime": runtime},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker}),
        run_config=RunConfig(name=cluster.name, storage_path=cluster.storage_path,
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             callbacks=list(callbacks) if callbacks else None),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def run_training(cfg: ExperimentConfig) -> TrainResult:
    """Fit the configured experiment on Ray Train and return where its results are."""
    init_ray(cfg.cluster.address)
    runtime = runtime_info(cfg)
    if is_local(runtime["run_dir"]):
        run_dir = Path(runtime["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    trainer = build_trainer(cfg, runtime)
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # TrainingFailedError and friends: report, let the job exit non-zero
        error = f"{type(exc).__name__}: {exc}"
        logger.error("training failed: %s", error)
    evaluation, model = None, {}
    run_dir = Path(runtime["run_dir"])
    if is_local(runtime["run_dir"]):
        if (run_dir / "eval_results.json").is_file():
            evaluation = json.loads((run_dir / "eval_results.json").read_text())
        if (run_dir / "final_model.json").is_file():
            model = json.loads((run_dir / "final_model.json").read_text())
    return TrainResult(run_dir=runtime["run_dir"], run_name=cfg.cluster.name, tracking_uri=runtime["tracking_uri"],
                       eval=evaluation, model=model, error=error)
