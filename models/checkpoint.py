"""Loading local checkpoint files into models, safely and strictly.

Every family adapts foreign checkpoints (timm ViT -> ATS-ViT, image ViT -> TimeSformer/XViT,
image SparseFormer -> VideoSparseFormer) in its own ``checkpoint_filter_fn(state_dict, model)``;
this module does the rest: ``weights_only=True`` loading (never unpickle arbitrary objects),
unwrapping the usual containers, and errors that name the offending keys and shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn as nn

FilterFn = Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]

# Containers used by timm, DeiT, PySlowFast, mmaction2 and Glimpse's own training checkpoints.
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


def read_state_dict(path: str | Path, *, prefer_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a tensor state dict from a local file with ``weights_only=True``.

    Accepts a bare state dict or one nested under a common container key, and strips a
    ``module.`` prefix left by DistributedDataParallel.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj: object = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # an unsafe pickle or a corrupt file: say which file
            raise ValueError(f"cannot load checkpoint {path} with weights_only=True: {exc}") from exc
    keys = _CONTAINER_KEYS if prefer_ema else tuple(k for k in _CONTAINER_KEYS if "ema" not in k)
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in keys if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                     strict: bool = True) -> None:
    """Raise ``CheckpointMismatchError`` naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    problems: list[str] = []
    shape_bad = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    if shape_bad:
        problems.append("shape mismatch: " + "; ".join(shape_bad[:10]) + (" ..." if len(shape_bad) > 10 else ""))
    if strict:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing:
            problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:10])}"
                            + (" ..." if len(unexpected) > 10 else ""))
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def load_checkpoint(model: nn.Module, path: str | Path, *, filter_fn: FilterFn | None = None,
                    strict: bool = True, prefer_ema: bool = False) -> nn.Module:
    """Load a local checkpoint file into ``model`` (after the family's ``filter_fn``), strictly by default."""
    state_dict = read_state_dict(path, prefer_ema=prefer_ema)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    check_state_dict(model, state_dict, source=str(path), strict=strict)
    model.load_state_dict(state_dict, strict=strict)
    return model
