"""Driver side of training: connect to Ray, build the ``TorchTrainer``, run it, say where the results are.

    cfg = finalize(resolve_config(KINETICS_PRESETS, "demo", overrides))
    result = run_training(cfg)                       # a TrainResult: run folder, MLflow URI, evaluation

Run it from the command line (``jobs/train_kinetics.py``), locally, on a local Ray or a cluster:

    python jobs/train_kinetics.py --preset smoke
    RAY_ADDRESS=127.0.0.1:6379 python jobs/train_kinetics.py --preset demo
    ray job submit --working-dir . -- python jobs/train_kinetics.py --preset demo --name my-run

With ``cluster.address`` empty and no ``RAY_ADDRESS`` (``ray job submit`` sets it), a local Ray is started
in this process. A sweep (``pipeline.sweep``) builds its trials' trainers with :func:`build_trainer` and a
:class:`~pipeline.context.RunContext` of its own (parent run, tags, GFLOPs, no final model).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.context import RunContext, build_run_context, finalize, is_local

logger = logging.getLogger("glimpse.train")

REPO_ROOT = Path(__file__).resolve().parents[2]


def init_ray(address: str = "", num_cpus: int | None = None) -> None:
    """Connect to the cluster at ``address`` / ``RAY_ADDRESS``, or start a local Ray with ``num_cpus``.

    Workers get the repository on ``PYTHONPATH`` so they import Glimpse's ``datasets`` package (not
    Hugging Face's) without an install; ``ray job submit --working-dir`` ships the same tree.
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))}
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if address != "auto" else None, log_to_driver=True)
    else:
        # A local Ray has no node to preempt: without Ray Train's preemption watcher, whose creation logs a
        # core_worker ERROR line about its restart arguments on every run (Ray 2.60, ray#53727).
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(num_cpus=num_cpus, runtime_env={"env_vars": env}, log_to_driver=True)


@dataclass(frozen=True)
class TrainResult:
    """Where a finished (or failed) run is: its folder, MLflow store, final evaluation and logged model."""

    run_dir: str
    run_name: str
    tracking_uri: str
    eval: dict[str, Any] | None
    model: dict[str, Any]
    error: str | None

    @property
    def figures_dir(self) -> str:
        return f"{self.run_dir.rstrip('/')}/figures"

    @property
    def mlflow_ui(self) -> str:
        """The command that opens this run's MLflow store in a browser."""
        return f"mlflow ui --backend-store-uri {self.tracking_uri}"


def _use_gpu(cfg: ExperimentConfig) -> bool:
    import ray

    if cfg.cluster.use_gpu == "auto":
        return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    return cfg.cluster.use_gpu == "true"


def build_trainer(cfg: ExperimentConfig, run: RunContext, *, train_loop: Callable[[dict], None] | None = None,
                  callbacks: Sequence[Any] | None = None):
    """The ``TorchTrainer`` of a finalised ``cfg``: ``train_loop`` (default :func:`pipeline.train.loop.train_func`)
    on ``cluster.num_workers`` workers with ``{"cfg": cfg.to_dict(), "run": run.to_dict()}``.

    ``callbacks`` are Ray Train ``UserCallback`` s (e.g. Tune's ``TuneReportCallback`` when the trainer runs
    inside a Tune trial). Ray Train's own console logs go at ``cluster.log_level`` (``LoggingConfig``).
    """
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.train.loop import train_func

    cluster = cfg.cluster
    use_gpu = _use_gpu(cfg)
    return TorchTrainer(
        train_loop or train_func,
        train_loop_config={"cfg": cfg.to_dict(), "run": run.to_dict()},
        scaling_config=ScalingConfig(num_workers=cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cluster.cpus_per_worker}),
        run_config=RunConfig(name=cluster.name, storage_path=cluster.storage_path,
                             failure_config=FailureConfig(max_failures=cluster.max_failures),
                             callbacks=list(callbacks) if callbacks else None,
                             logging_config=LoggingConfig(log_level=cluster.log_level)),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def run_training(cfg: ExperimentConfig) -> TrainResult:
    """Fit the configured experiment on Ray Train (finalising it first) and return where its results are."""
    cfg = finalize(cfg)
    init_ray(cfg.cluster.address)
    run = build_run_context(cfg)
    run_dir = Path(run.run_dir)
    if is_local(run.run_dir):
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    error = None
    try:
        build_trainer(cfg, run).fit()
    except Exception as exc:  # TrainingFailedError and friends: report, let the job exit non-zero
        error = f"{type(exc).__name__}: {exc}"
        logger.error("training failed: %s", error)
    local = is_local(run.run_dir)
    evaluation = _read_json(run_dir / "eval_results.json") if local else None
    model = (_read_json(run_dir / "final_model.json") if local else None) or {}
    return TrainResult(run_dir=run.run_dir, run_name=run.run_name, tracking_uri=run.tracking_uri, eval=evaluation,
                       model=model, error=error)
