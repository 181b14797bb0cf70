"""The state of a training run: everything a checkpoint holds and a resumed run continues from.

``TrainState`` gathers the model, optimiser, LR scheduler, gradient scaler, EMA weights, the data
position (epoch, batches done in it) and the global step (optimiser updates so far). ``state_dict()``
adds the RNG states; ``load_state_dict()`` restores all of it, so a restarted run continues at the next
update with the same random numbers: N straight steps equal N/2 steps, a stop and N/2 resumed steps,
bit for bit. Everything in a state dict loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import TrainConfig
from pipeline.evaluation.distributed import unwrap
from pipeline.modeling import build_optimizer, build_scheduler
from pipeline.train import checkpointing


@dataclass
class TrainState:
    model: nn.Module  # as prepared for training (DDP-wrapped when world_size > 1)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: Any | None = None  # timm ModelEmaV3 when train.ema_decay > 0
    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0

    @classmethod
    def create(cls, model: nn.Module, cfg: TrainConfig, updates_per_epoch: int, amp: torch.dtype | None) -> TrainState:
        """Fresh optimiser, schedule (``updates_per_epoch`` per epoch), scaler (fp16 only) and EMA for ``model``."""
        optimizer = build_optimizer(unwrap(model), cfg)
        ema = None
        if cfg.ema_decay > 0:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(unwrap(model), decay=cfg.ema_decay)
        return cls(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg, updates_per_epoch),
                   scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16), ema=ema)

    @property
    def module(self) -> nn.Module:
        """The trained network without its DDP wrapper."""
        return unwrap(self.model)

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated and logged: the EMA weights when there are some."""
        return self.ema.module if self.ema is not None else self.module

    def state_dict(self) -> dict[str, Any]:
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
                 "rng": checkpointing.capture_rng()}
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and "ema" in state:
            self.ema.module.load_state_dict(state["ema"])
        self.epoch, self.batch_in_epoch, self.step = state["epoch"], state["batch_in_epoch"], state["step"]
        checkpointing.restore_rng(state["rng"])

    def next_epoch(self) -> None:
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def resume(self, state: dict[str, Any], end_batch: int) -> None:
        """Load ``state``; a checkpoint written at an epoch's last batch continues with the next epoch."""
        self.load_state_dict(state)
        if self.batch_in_epoch >= end_batch:
            self.next_epoch()
