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
    # timm would load the file itself, skipping the family's adapter: load it here instead.
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    model = timm.create_model(name, **kwargs)
    if checkpoint_path:
        load_family_checkpoint(model, checkpoint_path)
    return model


def load_family_checkpoint(model: nn.Module, path: str) -> nn.Module:
    """Load a local checkpoint strictly, through the model family's ``checkpoint_filter_fn`` if it has one
    (timm's own families included: a timm ViT file loads into an ATS-ViT, TimeSformer or XViT)."""
    import sys

    from models.checkpoint import load_checkpoint

    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return load_checkpoint(model, path, filter_fn=filter_fn)


def build_video_model(model_cls: type[nn.Module], variant: str, default_cfg: dict[str, Any], **kwargs: Any) -> nn.Module:
    """Build a video model and attach its pretrained cfg.

    timm's ``build_model_with_cfg`` assumes image ``input_size=(C, H, W)``; video cfgs hold
    ``input_size=(C, T, H, W)``, so video families construct through here. The attached cfg's
    ``input_size`` follows the ``num_frames`` / ``img_size`` actually passed, so data pipelines and
    the FLOPs counter read the geometry the model was built for.
    """
    if kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True would download weights; pass checkpoint_path=<local file> instead")
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    model = model_cls(**kwargs)
    c, t, h, w = default_cfg["input_size"]
    t = kwargs.get("num_frames", t)
    size = kwargs.get("img_size", (h, w))
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    cfg = {**default_cfg, "architecture": variant, "input_size": (kwargs.get("in_chans", c), t, h, w)}
    model.pretrained_cfg = model.default_cfg = cfg
    if checkpoint_path:
        load_family_checkpoint(model, checkpoint_path)
    return model
