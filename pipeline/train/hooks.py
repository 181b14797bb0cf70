"""What a Ray Train worker does after an optimiser update: the fault drill, step metrics, the progress bar,
checkpoint + ``ray.train.report``, validation (with GFLOPs inside a sweep).

``report`` is called only with a checkpoint (every ``train.checkpoint_every`` steps and at epoch end), not
at every log step: Ray Train keeps one unconsumed report per worker and its controller drains them every
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s), so a report more often than that stalls the step. Step
metrics go to MLflow from rank 0 (buffered, flushed with each checkpoint, so a restarted run re-logs
exactly the lost steps: the metric history has no gaps or repeats).
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path

from pipeline.evaluation.distributed import evaluate_model, mean_over_ranks, measure_average_gflops
from pipeline.modeling import autocast_dtype
from pipeline.train import checkpointing
from pipeline.train.setup import WorkerRun
from pipeline.train.state import TrainState
from pipeline.train.step import MetricWindow

logger = logging.getLogger("glimpse.train")


def fault_drill(worker: WorkerRun, step: int) -> None:
    """``train.fail_at_step``: the highest rank kills its own process at that step, once per run (a marker
    file in the run folder says it happened)."""
    at = worker.cfg.train.fail_at_step
    if not at or step != at or worker.rank != worker.world_size - 1:
        return
    marker = Path(worker.run.run_dir) / "fault_drill_done"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    logger.warning("fault drill: rank %d kills itself at step %d", worker.rank, step)
    os.kill(os.getpid(), signal.SIGKILL)


def save_and_report(worker: WorkerRun, state: TrainState, metrics: dict[str, float], end_of_epoch: bool) -> None:
    """Checkpoint (written by rank 0) and ``ray.train.report`` on every rank; then the tracker's flush, so
    metrics become durable together with their checkpoint."""
    import ray.train  # RAY

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if worker.rank == 0:
            checkpointing.save_state(tmp, state.state_dict(), worker.checkpoint_meta())
            ckpt = ray.train.Checkpoint.from_directory(tmp)  # RAY
        epoch_metrics = {"epochs_done": state.epoch + 1} if end_of_epoch else {}  # 1-based: a scheduler's clock
        ray.train.report({**metrics, **epoch_metrics, "step": state.step, "epoch": state.epoch},  # RAY: a barrier
                         checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step{state.step:08d}")
    if worker.tracker is not None:
        worker.tracker.flush()


class TrainHooks:
    """The worker's :class:`pipeline.train.step.StepHooks`: one instance per run, one progress bar per epoch."""

    def __init__(self, worker: WorkerRun, end_batch: int) -> None:
        self.worker, self.end_batch = worker, end_batch
        self.window = MetricWindow()
        self.bar = None

    def start_epoch(self, state: TrainState) -> None:
        w = self.worker
        if w.rank == 0 and w.run.progress:
            from pipeline.console import progress_bar

            accum = w.cfg.train.accum_steps
            self.bar = progress_bar(f"epoch {state.epoch + 1}/{w.cfg.train.epochs}",
                                    total=(self.end_batch - state.batch_in_epoch) // accum, unit="step")

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_update(self, state: TrainState, window: MetricWindow, end_of_epoch: bool) -> bool:
        """Drill, log, checkpoint, validate; True once ``train.stop_at_step`` is reached."""
        tcfg = self.worker.cfg.train
        fault_drill(self.worker, state.step)
        if self.bar is not None:
            self.bar.update(1, loss=window.loss, top1=window.top1,
                            samples_per_s=window.samples_per_s(self.worker.world_size))
        ckpt_now = bool(tcfg.checkpoint_every and state.step % tcfg.checkpoint_every == 0) \
            or state.step == tcfg.stop_at_step
        if state.step % tcfg.log_every == 0 or ckpt_now or end_of_epoch:
            metrics = self.log_window(state, window)
            if end_of_epoch:
                metrics.update(self.validate(state))
                save_and_report(self.worker, state, metrics, end_of_epoch=True)
            elif ckpt_now:
                save_and_report(self.worker, state, metrics, end_of_epoch=False)
        return bool(tcfg.stop_at_step and state.step >= tcfg.stop_at_step)

    def log_window(self, state: TrainState, window: MetricWindow) -> dict[str, float]:
        """The window's loss/top-1 averaged over ranks, LR, samples/s, skipped samples; logged on rank 0."""
        w = self.worker
        samples_per_s = window.samples_per_s(w.world_size)
        metrics = mean_over_ranks({"train/loss": window.loss, "train/top1": window.top1}, w.device)
        metrics["train/lr"] = state.optimizer.param_groups[0]["lr"]
        metrics["train/samples_per_s"] = samples_per_s
        metrics["data/skipped"] = float(w.stats.total()) if w.stats is not None else 0.0
        if w.tracker is not None:
            w.tracker.log_metrics(metrics, step=state.step)
            if self.bar is None and state.step % (w.cfg.train.log_every * 5) == 0:
                logger.info("epoch %d step %d loss %.4f top1 %.3f lr %.2e %.1f samples/s", state.epoch, state.step,
                            metrics["train/loss"], metrics["train/top1"], metrics["train/lr"], samples_per_s)
        window.reset()
        return metrics

    def validate(self, state: TrainState) -> dict[str, float]:
        """Single-view validation every ``train.val_every`` epochs (not after the last: the final evaluation
        follows); ``val/gflops`` too when the run context asks (sweeps compare accuracy and cost)."""
        w, tcfg = self.worker, self.worker.cfg.train
        done = state.epoch + 1
        if not tcfg.val_every or done % tcfg.val_every or done >= tcfg.epochs:
            return {}
        amp = autocast_dtype(tcfg, w.device)
        summary = evaluate_model(state.eval_model, w.cfg, w.run.val_source, rank=w.rank, world_size=w.world_size,
                                 device=w.device, classes=w.run.classes, views=(1, 1), amp=amp)
        state.model.train()
        if summary is None:  # ranks other than 0
            return {}
        metrics = {"val/top1": summary["top1"], "val/top5": summary["top5"], "val/loss": summary["loss"]}
        if w.run.gflops_samples:
            metrics["val/gflops"] = measure_average_gflops(state.eval_model, w.cfg, w.run.val_source,
                                                           w.run.gflops_samples)
        w.tracker.log_metrics(metrics, step=state.step)
        return metrics

