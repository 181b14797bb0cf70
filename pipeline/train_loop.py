"""The per-worker training loop: plain PyTorch with Ray Train's touch points marked ``# RAY``.

Touch points: the worker's rank/device (``get_context``, ``get_device``), DDP (``prepare_model``),
``get_checkpoint`` on (re)start, and ``report`` on every rank (it is a barrier). MLflow calls run on
rank 0 only, through the buffered ``Tracker``.

``report`` is called only with a checkpoint (every ``train.checkpoint_every`` steps and at epoch
end), not at every log step: Ray Train keeps one unconsumed report per worker and its controller
drains them every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s), so a report more often than that
stalls the step. Step metrics go to MLflow directly from rank 0 (``jobs/benchmark_training.py``
measures what is left of Ray's overhead).

Steps: the global step counts optimiser updates. A checkpoint holds the model, optimiser, scheduler,
scaler, EMA, RNG states and the data position (epoch, batches done in it), so a restarted run
continues at the next update: the step sequence has no gaps or repeats.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline import checkpointing
from pipeline.config import ExperimentConfig
from pipeline.data import batch_inputs, build_dataset, validation_inputs
from pipeline.evaluation import gather_aggregators, run_views, summarize
from pipeline.modeling import (
    autocast_dtype,
    build_loss,
    build_mixup,
    build_model,
    build_optimizer,
    build_scheduler,
    count_model_cost,
    input_normalization,
)
from pipeline.tracking import Tracker, environment_info

logger = logging.getLogger("glimpse.train")


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(values, t.tolist()))


def evaluate_model(model: nn.Module, cfg: ExperimentConfig, source: str, *, views: tuple[int, int], rank: int,
                   world_size: int, device: torch.device, classes: tuple[str, ...],
                   amp: torch.dtype | None = None) -> dict[str, Any] | None:
    """Distributed multi-view evaluation; the summary on rank 0, None on other ranks."""
    from datasets.loader import DataStats, make_loader

    stats = DataStats()
    dataset = build_dataset(cfg.data, source, train=False, batch_size=cfg.eval.batch_size, rank=rank,
                            world_size=world_size, seed=cfg.train.seed, views=views, stats=stats,
                            **input_normalization(model))
    loader = make_loader(dataset, num_workers=cfg.data.loader_workers)
    agg, loss = run_views(model, loader, kind=cfg.data.kind, num_views=views[0] * views[1],
                          aggregate=cfg.eval.aggregate, device=device, autocast_dtype=amp, progress=rank == 0)
    skipped = _mean_over_ranks({"skipped": float(stats.total())}, device)["skipped"] * world_size
    loss = _mean_over_ranks({"loss": loss}, device)["loss"]
    merged = gather_aggregators(agg)
    if merged is None:
        return None
    summary = summarize(merged, classes)
    summary.update(loss=loss, skipped_samples=int(round(skipped)), views_spec=f"{views[0]}x{views[1]}")
    return summary


def measure_average_gflops(model: nn.Module, cfg: ExperimentConfig, source: str, max_samples: int) -> float:
    """Average per-sample GFLOPs over the first ``max_samples`` validation samples (one view each),
    counting each sample's kept tokens (``models.flops.average_flops``; ATS section 3.2). Models
    without adaptive tokens cost the same on every input: they are counted once."""
    from models.ats import ats_stages
    from models.flops import average_flops, count_flops

    model = _unwrap(model)
    device = next(model.parameters()).device
    batches = [x.to(device) for x in validation_inputs(cfg.data, source, max_samples, batch_size=cfg.eval.batch_size,
                                                        seed=cfg.train.seed, **input_normalization(model))]
    was_training = model.training
    try:
        if not ats_stages(model):
            return float(count_flops(model, batches[0][:1]).gflops)
        return float(average_flops(model, batches))
    finally:
        model.train(was_training)


def train_func(config: dict[str, Any]) -> None:
    """Ray Train worker entry point. ``config`` = {"experiment": ..., "runtime": ...} (plain dicts)."""
    import ray.train  # RAY
    import ray.train.torch  # RAY

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = ExperimentConfig.from_dict(config["experiment"])
    runtime = config["runtime"]
    ctx = ray.train.get_context()  # RAY
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()  # RAY
    tcfg = cfg.train

    torch.manual_seed(tcfg.seed)  # same initial weights everywhere (DDP broadcasts them anyway)
    if tcfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(max(1, int(runtime.get("threads_per_worker", 1))))

    model = build_model(cfg.model, runtime["num_classes"])
    cost = count_model_cost(model, cfg) if rank == 0 else {}
    model = ray.train.torch.prepare_model(model)  # RAY: device placement + DDP when world_size > 1
    optimizer = build_optimizer(_unwrap(model), tcfg)

    # Steps per epoch come from the data pipeline (identical on every rank).
    probe = build_dataset(cfg.data, runtime["train"], train=True, batch_size=tcfg.batch_size, rank=rank,
                          world_size=world_size, seed=tcfg.seed, samples_per_epoch=runtime["train_samples"])
    batches_per_epoch = probe.steps_per_epoch
    if batches_per_epoch < tcfg.accum_steps:
        raise ValueError(f"data gives {batches_per_epoch} batches per epoch per worker, fewer than "
                         f"train.accum_steps={tcfg.accum_steps}: lower train.batch_size or add data")
    updates_per_epoch = batches_per_epoch // tcfg.accum_steps
    scheduler = build_scheduler(optimizer, tcfg, updates_per_epoch)
    amp = autocast_dtype(tcfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    mixup = build_mixup(tcfg, runtime["num_classes"], cfg.data.kind)
    criterion = build_loss(tcfg, mixup)
    ema = None
    if tcfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(_unwrap(model), decay=tcfg.ema_decay)

    epoch, batch_in_epoch, step = 0, 0, 0
    checkpoint = ray.train.get_checkpoint()  # RAY: set when resuming (restart with the same name, or a failure)
    state = None
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            state = checkpointing.load_state(ckpt_dir)
    # Ray's controller learns of a report when it next polls the workers; a worker that dies right
    # after a checkpoint can leave it on storage but unregistered. Take whichever is newer.
    newest = checkpointing.newest_local_state(runtime["run_dir"])
    if newest is not None and (state is None or newest["step"] > state["step"]):
        state = newest
    if state is not None:
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and "ema" in state:
            ema.module.load_state_dict(state["ema"])
        epoch, batch_in_epoch, step = state["epoch"], state["batch_in_epoch"], state["step"]
        checkpointing.restore_rng(state["rng"])
        if batch_in_epoch >= updates_per_epoch * tcfg.accum_steps:
            epoch, batch_in_epoch = epoch + 1, 0
        logger.info("rank %d resumed from checkpoint at step %d (epoch %d, batch %d)", rank, step, epoch,
                    batch_in_epoch)

    tracker = None
    if rank == 0:
        tracker = Tracker(runtime["tracking_uri"], cfg.tracking.experiment, runtime["run_name"],
                          artifact_root=runtime.get("artifact_root"))
        if state is None:  # a fresh run; a resumed one logged these already
            tracker.log_params(cfg.flat())
            tracker.set_tags({**environment_info(world_size, str(device)), "glimpse.model": cfg.model.name})
            # Inside a sweep (pipeline.tune): nest this run under the sweep's parent run, one run per trial.
            if runtime.get("parent_run_id"):
                tracker.set_tags({"mlflow.parentRunId": runtime["parent_run_id"]})
            tracker.set_tags(runtime.get("extra_tags") or {})
            tracker.log_metrics({f"model/{k}": v for k, v in cost.items()}, step=0)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.yaml"
                path.write_text(cfg.to_yaml())
                tracker.log_artifact(path)
                tracker.flush()

    def save_and_report(metrics: dict[str, float], final_of_epoch: bool) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch, "batch_in_epoch": batch_in_epoch, "step": step,
                         "rng": checkpointing.capture_rng()}
                if ema is not None:
                    state["ema"] = ema.module.state_dict()
                checkpointing.save_state(tmp, state, {"experiment": cfg.to_dict(), "num_classes": runtime["num_classes"],
                                                      "classes": list(runtime["classes"])})
                ckpt = ray.train.Checkpoint.from_directory(tmp)  # RAY
            epoch_metrics = {"epochs_done": epoch + 1} if final_of_epoch else {}  # 1-based: a scheduler's clock
            ray.train.report({**metrics, **epoch_metrics, "step": step, "epoch": epoch},  # RAY: a barrier on every rank
                             checkpoint=ckpt, checkpoint_dir_name=f"checkpoint_step{step:08d}")
        if tracker is not None:
            tracker.flush()  # metrics become durable together with their checkpoint

    from datasets.loader import DataStats, make_loader

    stats = DataStats()
    seen_window, window_start, window_loss, window_correct, window_count = 0, time.perf_counter(), 0.0, 0, 0
    stop = False
    while epoch < tcfg.epochs and not stop:
        dataset = build_dataset(cfg.data, runtime["train"], train=True, batch_size=tcfg.batch_size, rank=rank,
                                world_size=world_size, seed=tcfg.seed, epoch=epoch,
                                samples_per_epoch=runtime["train_samples"], start_batch=batch_in_epoch, stats=stats,
                                **input_normalization(model))
        loader = make_loader(dataset, num_workers=cfg.data.loader_workers, pin_memory=device.type == "cuda")
        model.train()
        end_batch = updates_per_epoch * tcfg.accum_steps  # a tail shorter than accum_steps is not used
        for batch in loader:
            if batch_in_epoch >= end_batch:
                break
            x = batch_inputs(batch, cfg.data.kind).to(device, non_blocking=True)
            y = batch["label"].to(device, non_blocking=True)
            target = y
            if mixup is not None:
                x, target = mixup(x, y)
            sync = (batch_in_epoch + 1) % tcfg.accum_steps == 0
            no_sync = getattr(model, "no_sync", None) if not sync else None
            with no_sync() if no_sync else _nullcontext():
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = model(x)
                    loss = criterion(logits, target)
                scaler.scale(loss / tcfg.accum_steps).backward()
            batch_in_epoch += 1
            window_loss += float(loss.detach()) * y.numel()
            window_correct += int((logits.detach().argmax(-1) == y).sum())
            window_count += y.numel()
            seen_window += y.numel()
            if not sync:
                continue
            if tcfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(_unwrap(model), step=step)
            step += 1

            if tcfg.fail_at_step and step == tcfg.fail_at_step and rank == world_size - 1:
                marker = Path(runtime["run_dir"]) / "fault_drill_done"
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(str(step))
                    logger.warning("fault drill: rank %d kills itself at step %d", rank, step)
                    os.kill(os.getpid(), signal.SIGKILL)

            log_now = step % tcfg.log_every == 0
            ckpt_now = (tcfg.checkpoint_every and step % tcfg.checkpoint_every == 0) or step == tcfg.stop_at_step
            end_of_epoch = batch_in_epoch >= end_batch
            if log_now or ckpt_now or end_of_epoch:
                elapsed = time.perf_counter() - window_start
                metrics = _mean_over_ranks({"train/loss": window_loss / max(window_count, 1),
                                            "train/top1": window_correct / max(window_count, 1)}, device)
                metrics["train/lr"] = optimizer.param_groups[0]["lr"]
                metrics["train/samples_per_s"] = seen_window * world_size / max(elapsed, 1e-9)
                metrics["data/skipped"] = float(stats.total())
                if tracker is not None:
                    tracker.log_metrics(metrics, step=step)
                    if step % (tcfg.log_every * 5) == 0 or end_of_epoch:
                        logger.info("epoch %d step %d loss %.4f top1 %.3f lr %.2e %.1f samples/s", epoch, step,
                                    metrics["train/loss"], metrics["train/top1"], metrics["train/lr"],
                                    metrics["train/samples_per_s"])
                seen_window, window_start, window_loss, window_correct, window_count = 0, time.perf_counter(), 0., 0, 0
                if ckpt_now and not end_of_epoch:
                    save_and_report(metrics, final_of_epoch=False)
                if end_of_epoch:
                    if tcfg.val_every and (epoch + 1) % tcfg.val_every == 0 and epoch + 1 < tcfg.epochs:
                        summary = evaluate_model(ema.module if ema is not None else model, cfg, runtime["val"],
                                                 views=(1, 1), rank=rank, world_size=world_size, device=device,
                                                 classes=tuple(runtime["classes"]), amp=amp)
                        model.train()
                        if summary is not None:
                            metrics.update({"val/top1": summary["top1"], "val/top5": summary["top5"],
                                            "val/loss": summary["loss"]})
                            if runtime.get("gflops_samples"):  # sweeps compare trials on accuracy AND cost
                                metrics["val/gflops"] = measure_average_gflops(
                                    ema.module if ema is not None else _unwrap(model), cfg, runtime["val"],
                                    runtime["gflops_samples"])
                            tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith("val/")}, step=step)
                    save_and_report(metrics, final_of_epoch=True)
            if tcfg.stop_at_step and step >= tcfg.stop_at_step:
                stop = True
                break
        if not stop:
            epoch, batch_in_epoch = epoch + 1, 0

    if stop:
        logger.info("stopping at step %d as asked (train.stop_at_step); resume with the same run name", step)
        if tracker is not None:
            tracker.flush()
        return

    final_model = ema.module if ema is not None else _unwrap(model)
    summary = None
    if cfg.eval.at_end:
        views = tuple(runtime["views"])
        summary = evaluate_model(final_model, cfg, runtime["val"], views=views, rank=rank, world_size=world_size,
                                 device=device, classes=tuple(runtime["classes"]), amp=amp)
    if rank == 0:
        from pipeline.model_store import log_final_model

        metrics = {}
        if summary is not None:
            metrics = {"eval/top1": summary["top1"], "eval/top5": summary["top5"], "eval/loss": summary["loss"],
                       "eval/mean_class_accuracy": summary["mean_class_accuracy"],
                       "eval/skipped_samples": summary["skipped_samples"]}
            tracker.log_metrics(metrics, step=step)
        tracker.flush()
        logged = _unwrap_for_logging(final_model)
        if runtime.get("log_final_model", True):  # sweeps log only the model they select (pipeline.tune)
            log_final_model(tracker, logged, cfg, runtime, summary)
        log_run_figures(tracker, logged, cfg, runtime["val"], summary, runtime["run_dir"])
        tracker.close()
    ray.train.report({**(summary and {k: v for k, v in summary.items() if isinstance(v, (int, float))} or {}),  # RAY
                      "step": step, "epoch": epoch, "done": 1})


def log_run_figures(tracker: Tracker, model: nn.Module, cfg: ExperimentConfig, source: str,
                    summary: dict[str, Any] | None, run_dir: str, max_samples: int = 4,
                    count_samples: int = 32) -> None:
    """Training curves, per-class accuracy and (for models that sample) the sampling geometry on
    ``max_samples`` validation inputs, with ATS's K' histogram over ``count_samples`` (ATS Fig. 6), as
    PNGs under the run's ``figures/`` artifacts (``pipeline.visualize``). The model is already logged:
    a figure that cannot be drawn costs a warning, never the run."""
    from models.ats import ats_stages
    from pipeline.visualize import collect_kept_counts, log_figures, run_figures

    out = Path(run_dir) / "figures" if "://" not in run_dir else Path(tempfile.mkdtemp(prefix="glimpse-figures-"))
    try:
        norm = input_normalization(model)
        has_ats = bool(ats_stages(model))
        batches = validation_inputs(cfg.data, source, count_samples if has_ats else max_samples,
                                    batch_size=max_samples, seed=cfg.train.seed, **norm)
        kept = collect_kept_counts(model, batches) if has_ats else None
        paths = run_figures(tracker, None, summary, model=model, samples=batches[0], out_dir=out,
                            max_samples=max_samples, kept_counts=kept, **norm)
        log_figures(tracker, None, paths, root=out)
        logger.info("logged %d figures (%s)", len(paths), out)
    except Exception:
        logger.warning("could not draw the run's figures", exc_info=True)


def _unwrap_for_logging(model: nn.Module) -> nn.Module:
    return _unwrap(model).to("cpu").eval()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
