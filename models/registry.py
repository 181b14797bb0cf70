"""Model factory: a thin, validating front for timm's registry.

Glimpse families register their variants with ``timm.models.register_model``; this module
adds the project-wide rules: names are checked against Glimpse's own list first (with the
valid names in the error), and timm's own names (``deit_small_patch16_224``) pass through.
"""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

# Filled by ``register_glimpse`` (family modules decorate their variant functions with it).
_GLIMPSE_MODELS: dict[str, str] = {}


def register_glimpse(fn):
    """Register a variant function with timm and remember it as one of Glimpse's own models."""
    name = fn.__name__
    if name in _GLIMPSE_MODELS:
        raise RuntimeError(f"model name {name!r} registered twice")
    if name in timm.list_models() and name not in _GLIMPSE_MODELS:
        # Never shadow a timm model: the ATS release did, and broke users' timm (STYLE.md #4).
        raise RuntimeError(f"model name {name!r} is already a timm model; choose another name")
    _GLIMPSE_MODELS[name] = fn.__module__
    return timm.models.register_model(fn)


def list_models(pattern: str = "") -> list[str]:
    """Glimpse's own model names, sorted, optionally filtered by a substring."""
    return sorted(n for n in _GLIMPSE_MODELS if pattern in n)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a Glimpse model (or any timm model) by name.

    Unknown names raise ``ValueError`` listing Glimpse's models. ``pretrained=True`` is refused:
    nothing is downloaded at run time; pass ``checkpoint_path=`` (a local file) instead.
    """
    if kwargs.get("pretrained"):
        raise ValueError("pretrained=True would download weights; pass checkpoint_path=<local file> instead")
    if name not in _GLIMPSE_MODELS and name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}; Glimpse models: {', '.join(list_models())} "
                         "(any timm model name is accepted too)")
    return timm.create_model(name, **kwargs)
