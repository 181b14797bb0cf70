"""One training step and one epoch of them, shared by the Ray Train worker and the plain benchmark loop.

A step is timm's: inputs through :func:`pipeline.data.model_inputs` (device, normalisation), Mixup/CutMix
for images, autocast (bf16/fp16 on GPU), the loss scaled by the accumulation count and, at each
``train.accum_steps``-th batch, gradient clipping, the optimiser and scheduler steps and the EMA update
(no DDP all-reduce on the batches in between). The global step counts optimiser updates.

:func:`train_one_epoch` runs the steps of one epoch from the state's data position. After every update it
calls ``hooks.after_update`` (logging, checkpoints, validation: ``pipeline.train.hooks``), which may end
the epoch early by returning True (``train.stop_at_step``, the benchmark's measured window).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn as nn

from pipeline.config import ExperimentConfig
from pipeline.data import model_inputs
from pipeline.modeling import autocast_dtype, build_loss, build_mixup
from pipeline.train.state import TrainState


@dataclass(frozen=True)
class StepRecipe:
    """What a step does besides the model: loss, Mixup/CutMix, autocast, accumulation and clipping."""

    criterion: nn.Module
    mixup: Any | None
    amp: torch.dtype | None
    accum_steps: int
    clip_grad: float

    @classmethod
    def create(cls, cfg: ExperimentConfig, num_classes: int, device: torch.device) -> StepRecipe:
        mixup = build_mixup(cfg.train, num_classes, cfg.data.kind)
        return cls(criterion=build_loss(cfg.train, mixup), mixup=mixup, amp=autocast_dtype(cfg.train, device),
                   accum_steps=cfg.train.accum_steps, clip_grad=cfg.train.clip_grad)


@dataclass
class MetricWindow:
    """Training loss, top-1 and samples/s since the last :meth:`reset` (a logging window)."""

    loss_sum: float = 0.0
    correct: int = 0
    count: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += float(loss.detach()) * labels.numel()
        self.correct += int((logits.detach().argmax(-1) == labels).sum())
        self.count += labels.numel()

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.count, 1)

    @property
    def top1(self) -> float:
        return self.correct / max(self.count, 1)

    def samples_per_s(self, world_size: int = 1) -> float:
        return self.count * world_size / max(time.perf_counter() - self.started, 1e-9)

    def reset(self) -> None:
        self.loss_sum, self.correct, self.count, self.started = 0.0, 0, 0, time.perf_counter()


class StepHooks(Protocol):
    def after_update(self, state: TrainState, window: MetricWindow, end_of_epoch: bool) -> bool:
        """Called after each optimiser update; return True to stop training here."""


def _optimizer_update(state: TrainState, recipe: StepRecipe) -> None:
    if recipe.clip_grad > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), recipe.clip_grad)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    state.optimizer.zero_grad(set_to_none=True)
    state.scheduler.step()
    if state.ema is not None:
        state.ema.update(state.module, step=state.step)
    state.step += 1


def train_batch(state: TrainState, recipe: StepRecipe, x: torch.Tensor, y: torch.Tensor,
                window: MetricWindow) -> bool:
    """Forward and backward one batch; the optimiser update when it closes an accumulation group.
    Returns True when an update was made."""
    target = y
    if recipe.mixup is not None:
        x, target = recipe.mixup(x, y)
    update = (state.batch_in_epoch + 1) % recipe.accum_steps == 0
    no_sync = getattr(state.model, "no_sync", None) if not update else None  # DDP: all-reduce at the update only
    with no_sync() if no_sync else contextlib.nullcontext():
        device_type = x.device.type
        with torch.autocast(device_type, dtype=recipe.amp, enabled=recipe.amp is not None):
            logits = state.model(x)
            loss = recipe.criterion(logits, target)
        state.scaler.scale(loss / recipe.accum_steps).backward()
    state.batch_in_epoch += 1
    window.add(loss, logits, y)
    if update:
        _optimizer_update(state, recipe)
    return update


def train_one_epoch(state: TrainState, loader: Iterable[dict], cfg: ExperimentConfig, *, recipe: StepRecipe,
                    device: torch.device, end_batch: int, window: MetricWindow | None = None,
                    hooks: StepHooks | None = None) -> bool:
    """Train on ``loader`` from ``state.batch_in_epoch`` until ``end_batch`` batches of the epoch are done
    (a tail shorter than ``accum_steps`` is not used). Returns True when a hook stopped training."""
    window = window if window is not None else MetricWindow()
    state.model.train()
    for batch in loader:
        if state.batch_in_epoch >= end_batch:
            break
        x, y = model_inputs(batch, cfg.data, device)
        if not train_batch(state, recipe, x, y, window):
            continue
        if hooks is not None and hooks.after_update(state, window, state.batch_in_epoch >= end_batch):
            return True
    return False
