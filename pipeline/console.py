"""What a run shows on the console: Glimpse's own INFO lines, progress bars, and little else.

Glimpse logs through the ``glimpse`` logger at INFO; the root logger keeps Python's default level
(WARNING) in the driver. That is what keeps libraries quiet there. Ray Train's workers set their root
logger to INFO with a console handler, which let Ray Train's per-report line ("Reporting training result
N: TrainingReport(...)", an INFO record of a logger named by its module's path) reach the console from
every worker at every report: :func:`quiet_worker_logging` sets that logger to the library level. Ray
Train's own ``ray.train`` records go at ``cluster.log_level`` through ``ray.train.LoggingConfig``
(:func:`pipeline.train.launch.build_trainer`); MLflow's through its ``MLFLOW_LOGGING_LEVEL`` setting.

Progress bars: ``tqdm`` in the driver. Inside Ray workers, the same ``tqdm`` bar is written as one full
line per refresh (at most every ``WORKER_REFRESH_S``): Ray forwards a worker's output line by line, so a
carriage-return bar would reach the driver only when its epoch ends. Not Ray's ``tqdm_ray``: with it, the
driver's log subscriber failed ("Missing :authority header") after a Ray Train run, and every later GCS
call of that driver (the next Tune sweep's) hung; its bars also showed wrong elapsed times.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def quiet_libraries(level: str = "WARNING") -> None:
    """MLflow's INFO lines ("Creating initial MLflow database tables") and artifact-download bars off:
    through MLflow's own settings, before it configures its loggers, and on its logger if it already did."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", level)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(level)


def configure_logging(level: str = "INFO", library_level: str = "WARNING") -> None:
    """Glimpse's ``glimpse.*`` loggers at ``level``, quiet libraries (:func:`quiet_libraries`); the root logger
    keeps its level. Records still propagate (pytest's ``caplog``, an application's own handlers); a handler
    of our own is added only when the root logger has none."""
    quiet_libraries(library_level)
    log = logging.getLogger("glimpse")
    log.setLevel(level)
    if not logging.getLogger().handlers and not any(getattr(h, "_glimpse", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._glimpse = True  # type: ignore[attr-defined]
        log.addHandler(handler)


# Ray Train (2.60) logs "Reporting training result N: TrainingReport(...)" at INFO, through a logger named
# by the path of the module that reports, on every report of every worker; its workers' root logger is
# at INFO with a console handler, so the whole report reached the console.
_RAY_REPORT_MODULE = "ray.train.v2._internal.execution.context"


def quiet_worker_logging(library_level: str = "WARNING") -> None:
    """In a Ray worker: Glimpse's INFO lines, and ``library_level`` for the libraries' records (Ray Train's
    per-report line included)."""
    import importlib.util

    configure_logging("INFO", library_level)
    try:
        spec = importlib.util.find_spec(_RAY_REPORT_MODULE)
    except ModuleNotFoundError:
        spec = None
    if spec is not None and spec.origin:
        logging.getLogger(spec.origin).setLevel(library_level)


def _in_ray_worker() -> bool:
    try:
        import ray
    except ImportError:
        return False
    # Ray Train's workers are actors; the driver has no actor id.
    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


WORKER_REFRESH_S = 10.0  # a Ray worker's bar: one line at most this often (and one at the end)


class LineStream:
    """A text stream for tqdm that turns each carriage-return redraw into a line of its own."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


class ProgressBar:
    """A tqdm bar with ``update(n, **postfix)``; in a Ray worker, one line per refresh (see the module doc)."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it") -> None:
        from tqdm import tqdm

        self.desc = desc
        if _in_ray_worker():
            self._bar: Any = tqdm(desc=desc, total=total, unit=unit, file=LineStream(sys.stderr),
                                  mininterval=WORKER_REFRESH_S, leave=True)
        else:
            self._bar = tqdm(desc=desc, total=total, unit=unit, mininterval=1.0, dynamic_ncols=True, leave=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if postfix:
            text = " ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in postfix.items())
            self._bar.set_postfix_str(text, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()


def progress_bar(desc: str, total: int | None = None, unit: str = "it") -> ProgressBar:
    return ProgressBar(desc, total=total, unit=unit)
