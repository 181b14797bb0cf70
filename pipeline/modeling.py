"""Model, optimiser, schedule and loss from the configuration (no Ray, no MLflow here)."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import ExperimentConfig, ModelConfig, TrainConfig
from pipeline.knobs import apply_knobs

logger = logging.getLogger("glimpse.model")


def _create(cfg: ModelConfig, num_classes: int | None) -> nn.Module:
    from models import create_model

    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return create_model(cfg.name, **kwargs)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The configured model (any name from ``models.list_models()`` or timm), initialised from
    ``model.pretrained`` through :func:`models.checkpoint.load_checkpoint` (the classifier of another
    class count is left at its initialisation), with its inference-time knobs set (:mod:`pipeline.knobs`)."""
    from models.checkpoint import load_checkpoint

    model = _create(cfg, num_classes)
    if cfg.pretrained:
        report = load_checkpoint(model, cfg.pretrained, classifier="reset")
        if report.reset_classifier_keys:
            logger.info("%s: classifier %s left at its initialisation", cfg.pretrained,
                        ", ".join(report.reset_classifier_keys))
    return apply_knobs(model, cfg)


def model_data_cfg(cfg: ModelConfig) -> dict[str, Any]:
    """The data keys of the model's ``pretrained_cfg`` (``input_size`` as built, ``num_frames``,
    ``sampling_rate``, ``test_views``, ``mean``, ``std``), read from the architecture alone: built on
    the meta device when it can be (no memory, no time), else on the CPU."""
    from models.registry import built_input_size

    try:
        with torch.device("meta"):
            model = _create(cfg, None)
    except (NotImplementedError, RuntimeError):  # a constructor that reads tensor values (e.g. .tolist())
        model = _create(cfg, None)
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    out = {k: pcfg.get(k) for k in ("num_frames", "sampling_rate", "test_views", "mean", "std")}
    out["input_size"] = built_input_size(model)
    if len(out["input_size"]) == 4:
        out["num_frames"] = out["input_size"][1]
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases, norms, and what the model lists in ``no_weight_decay``."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=cfg.lr)


class WarmupCosine:
    """The LR factor at an update: linear warmup over ``warmup`` updates, then cosine to ``floor``."""

    def __init__(self, total: int, warmup: int, floor: float) -> None:
        self.total, self.warmup, self.floor = total, warmup, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-update linear warmup then cosine decay to ``min_lr``."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total, warmup, floor))


def build_mixup(cfg: TrainConfig, num_classes: int, kind: str):
    """timm Mixup/CutMix for images (None for video or when both are off)."""
    if kind != "image" or (cfg.mixup <= 0 and cfg.cutmix <= 0):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
                 num_classes=num_classes)


def build_loss(cfg: TrainConfig, mixup) -> nn.Module:
    from timm.loss import SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 (or fp16) autocast on GPU; None (full precision) on CPU."""
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def example_input(cfg: ExperimentConfig, batch_size: int = 1) -> torch.Tensor:
    """Zeros of the configured input shape: ``(B, 3, T, H, W)`` clips or ``(B, 3, H, W)`` images."""
    d = cfg.data
    if d.kind == "video":
        return torch.zeros(batch_size, 3, d.num_frames, d.crop_size, d.crop_size)
    return torch.zeros(batch_size, 3, d.image_size, d.image_size)


def count_model_cost(model: nn.Module, cfg: ExperimentConfig) -> dict[str, float]:
    """Parameters (M) and, when the model can be traced, GFLOPs per view at the training input size."""
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    try:
        from models.flops import count_flops

        was_training = model.training
        report = count_flops(model.eval(), example_input(cfg))
        model.train(was_training)
        out["gflops"] = float(report.gflops)
    except Exception:  # counting is informative only; some models cannot be traced
        pass
    return out
