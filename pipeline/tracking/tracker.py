"""MLflow tracking for rank 0: parameters, metrics by step, artifacts, with an outage buffer.

Metrics are held in memory and sent together with each checkpoint (``flush``). Two things follow:
a run that restarts from its last checkpoint after a worker failure re-logs exactly the steps that
were lost, so the metric history has no gaps or repeats; and a tracking server that is down costs
nothing but a warning: records wait in the buffer until the server answers, or the end of the run.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger("glimpse.tracking")

RUN_NAME_TAG = "glimpse.run_name"


def default_tracking_uri(storage_path: str) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else an SQLite store beside the runs (the registry works on a laptop)."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if env:
        return env
    if "://" in storage_path:
        raise ValueError(f"storage_path {storage_path!r} is remote: set MLFLOW_TRACKING_URI (or "
                         "tracking.tracking_uri) to a tracking server reachable from every node")
    root = Path(storage_path).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def _quick_failures() -> None:
    # MLflow retries an unreachable server for minutes by default; a training step must not wait.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def environment_info(world_size: int, device: str) -> dict[str, str]:
    import mlflow
    import ray
    import timm
    import torch

    return {"env.python": platform.python_version(), "env.torch": torch.__version__, "env.timm": timm.__version__,
            "env.ray": ray.__version__, "env.mlflow": mlflow.__version__, "env.device": device,
            "env.world_size": str(world_size), "env.cuda": str(torch.version.cuda),
            "env.host": platform.node()}


class Tracker:
    """Rank-0 MLflow logger bound to one run, found by its Glimpse run name (so resumes reuse it).

    Every call is buffered; ``flush()`` sends the buffer and keeps it on failure. Nothing raises
    out of here because the tracking server is unreachable.
    """

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, artifact_root: str | None = None,
                 enabled: bool = True) -> None:
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.artifact_root = artifact_root
        self.enabled = enabled
        self.run_id: str | None = None
        self._params: dict[str, str] = {}
        self._tags: dict[str, str] = {}
        self._metrics: list[tuple[str, float, int, int]] = []
        self._artifacts: list[tuple[str, str | None]] = []
        self._warned = False
        if enabled:
            _quick_failures()

    # ------------------------------------------------------------------ buffer
    def log_params(self, params: Mapping[str, Any]) -> None:
        # MLflow params are strings of at most 6000 characters.
        self._params.update({k: str(v)[:6000] for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._tags.update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self._metrics.extend((k, float(v), now, int(step)) for k, v in metrics.items())

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._artifacts.append((str(path), artifact_path))

    @property
    def pending(self) -> int:
        return len(self._metrics) + len(self._artifacts) + len(self._params) + len(self._tags)

    # ------------------------------------------------------------------ sending
    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def ensure_run(self) -> str:
        """Find or create the MLflow run for this Glimpse run name; returns its id (may raise)."""
        if self.run_id:
            return self.run_id
        client = self._client()
        exp = client.get_experiment_by_name(self.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(self.experiment,
                                                                         artifact_location=self.artifact_root)
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{self.run_name}'",
                                   max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = client.create_run(exp_id, run_name=self.run_name, tags={RUN_NAME_TAG: self.run_name}).info.run_id
        return self.run_id

    def flush(self) -> bool:
        """Send everything buffered. Returns True when the buffer is empty afterwards."""
        if not self.enabled or not self.pending:
            return True
        from mlflow.entities import Metric, Param, RunTag

        try:
            run_id = self.ensure_run()
            client = self._client()
            # log_batch takes at most 1000 metrics and 100 params per call.
            params = list(self._params.items())
            for i in range(0, len(params), 100):
                client.log_batch(run_id, params=[Param(k, v) for k, v in params[i:i + 100]])
            self._params.clear()
            if self._tags:
                client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self._tags.items()])
                self._tags.clear()
            while self._metrics:
                chunk = self._metrics[:1000]
                client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in chunk])
                del self._metrics[:1000]
            while self._artifacts:
                path, artifact_path = self._artifacts[0]
                if Path(path).is_dir():
                    client.log_artifacts(run_id, path, artifact_path)
                else:
                    client.log_artifact(run_id, path, artifact_path)
                self._artifacts.pop(0)
        except Exception as exc:  # unreachable server, timeouts, 5xx: keep the records
            if not self._warned:
                logger.warning("MLflow tracking at %s is unreachable (%s); training goes on, %d records are "
                               "buffered and will be sent when it answers or at the end", self.tracking_uri,
                               type(exc).__name__, self.pending)
                self._warned = True
            return False
        if self._warned:
            logger.warning("MLflow tracking at %s answers again; buffered records sent", self.tracking_uri)
            self._warned = False
        return True

    def close(self, status: str = "FINISHED", retries: int = 3, wait_s: float = 5.0) -> bool:
        """Final flush (with a few retries) and mark the run finished."""
        if not self.enabled:
            return True
        for attempt in range(retries):
            if self.flush():
                try:
                    self._client().set_terminated(self.ensure_run(), status=status)
                    return True
                except Exception as exc:
                    logger.warning("could not close MLflow run: %s", exc)
            if attempt + 1 < retries:
                time.sleep(wait_s)
        logger.error("MLflow tracking at %s stayed unreachable; %d records were not logged", self.tracking_uri,
                     self.pending)
        return False
