"""Model, optimiser, schedule and loss from the configuration (no Ray, no MLflow here)."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn as nn

from pipeline.config import ExperimentConfig, ModelConfig, TrainConfig


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The configured model (any name from ``models.list_models()`` or timm), optionally initialised
    from a local pretrained file through its family's ``checkpoint_filter_fn``."""
    from models import create_model

    kwargs: dict[str, Any] = dict(cfg.kwargs)
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    model = create_model(cfg.name, num_classes=num_classes, **kwargs)
    if cfg.pretrained:
        init_from_pretrained(model, cfg.pretrained)
    return model


def init_from_pretrained(model: nn.Module, path: str) -> None:
    """Load pretrained weights; a classifier of another class count is left at its initialisation."""
    from models.checkpoint import check_state_dict, read_state_dict

    state = read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    dropped = [k for k in state if k.startswith(classifier + ".") and k in own and own[k].shape != state[k].shape]
    for k in dropped:
        del state[k]
    check_state_dict(model, state, source=path, strict=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in missing if not k.startswith(classifier + ".")]
    if bad_missing or unexpected:
        raise ValueError(f"pretrained file {path} does not fit {type(model).__name__}: missing {bad_missing[:10]}, "
                         f"unexpected {unexpected[:10]}")


def input_normalization(model: nn.Module) -> dict[str, Any]:
    """``{"mean", "std"}`` from the model's ``pretrained_cfg`` (what its data must be normalised with),
    or ``{}`` for the data pipeline's default (ImageNet)."""
    model = model.module if hasattr(model, "module") else model
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return {"mean": cfg.get("mean"), "std": cfg.get("std")} if cfg.get("mean") else {}


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


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-update linear warmup then cosine decay to ``min_lr``."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    floor = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def count_model_cost(model: nn.Module, cfg: ExperimentConfig) -> dict[str, float]:
    """Parameters (M) and, when the model can be traced, GFLOPs per view at the training input size."""
    out = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
    try:
        from models.flops import count_flops

        if cfg.data.kind == "video":
            shape = (1, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
        else:
            shape = (1, 3, cfg.data.image_size, cfg.data.image_size)
        was_training = model.training
        report = count_flops(model.eval(), torch.zeros(shape))
        model.train(was_training)
        out["gflops"] = float(report.gflops)
    except Exception:  # counting is informative only; some models cannot be traced
        pass
    return out
