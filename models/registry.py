"""Model factory: a thin, validating front for timm's registry, and the one place every build ends.

Glimpse families decorate their variant functions with :func:`register_glimpse`, which registers them
with timm and wraps them so that every Glimpse model, however it is built (``models.create_model``,
``timm.create_model`` or the variant function itself), leaves through :func:`finish_model`:

* ``pretrained=True`` is refused (nothing is downloaded at run time; pass ``checkpoint_path=``);
* ``model.pretrained_cfg`` gets the data geometry the model was BUILT for: ``input_size`` follows the
  ``in_chans`` / ``num_frames`` / ``img_size`` actually passed (:func:`built_input_size`), and the
  family's ``data_cfgs[name]`` entries are added (timm's ``PretrainedCfg`` has no field for them);
* the checkpoint adapter is installed (:func:`models.checkpoint.install_checkpoint_adapter`), so
  ``timm.create_model(name, checkpoint_path=...)`` adapts foreign state dicts as Glimpse's loader does;
* ``checkpoint_path=`` given to a Glimpse builder initialises the model from that file through
  :func:`models.checkpoint.load_checkpoint` with ``classifier="reset"`` (what timm's ``pretrained=True``
  would do: a classifier of another class count is left at its initialisation). timm's own
  ``create_model(checkpoint_path=)`` loads strictly instead, as timm always does.

Data keys of ``pretrained_cfg`` (read them instead of repeating geometry elsewhere):

* ``input_size``: ``(C, H, W)`` for images, ``(C, T, H, W)`` for clips;
* ``num_frames``: T (clips only);
* ``sampling_rate``: the frame stride of a clip (clips only): a clip takes every ``sampling_rate``-th
  frame of the source video, so it spans ``num_frames * sampling_rate`` source frames (PySlowFast's
  ``DATA.SAMPLING_RATE``);
* ``test_views``: ``(K, S)``, K temporal clips x S spatial crops per video at evaluation (the papers'
  multi-view testing); ``(1, 1)`` for image models and wherever a paper tests one view.

timm's own names (``deit_small_patch16_224``) pass through :func:`create_model` unchanged.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import timm
import torch.nn as nn

from models.checkpoint import install_checkpoint_adapter, load_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["build_video_model", "built_input_size", "create_model", "finish_model", "list_models", "register_glimpse"]

# Filled by ``register_glimpse``: Glimpse's own names -> the module that defines them.
_GLIMPSE_MODELS: dict[str, str] = {}
_TIMM_CFG_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
VIDEO_DATA_KEYS = ("num_frames", "sampling_rate", "test_views")


def _refuse_download(kwargs: Mapping[str, Any]) -> None:
    if kwargs.get("pretrained"):
        raise ValueError("pretrained=True would download weights; pass checkpoint_path=<local file> instead")


def register_glimpse(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a variant function with timm (as Glimpse's own model) and route its builds through
    :func:`finish_model`. The function's module may define ``data_cfgs[name]`` (see the module doc)."""
    name = fn.__name__
    if name in _GLIMPSE_MODELS:
        raise RuntimeError(f"model name {name!r} registered twice")
    if name in timm.list_models():
        # Never shadow a timm model: the ATS release did, and broke users' timm (STYLE.md #4).
        raise RuntimeError(f"model name {name!r} is already a timm model; choose another name")

    @functools.wraps(fn)
    def build(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        _refuse_download({"pretrained": pretrained})
        checkpoint_path = kwargs.pop("checkpoint_path", None)
        model = finish_model(fn(**kwargs), name)
        if checkpoint_path:
            _init_from_file(model, checkpoint_path)
        return model

    _GLIMPSE_MODELS[name] = fn.__module__
    return timm.models.register_model(build)


def list_models(pattern: str = "") -> list[str]:
    """Glimpse's own model names, sorted, optionally filtered by a substring."""
    return sorted(n for n in _GLIMPSE_MODELS if pattern in n)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a Glimpse model (or any timm model) by name.

    Unknown names raise ``ValueError`` listing Glimpse's models. ``pretrained=True`` is refused: pass
    ``checkpoint_path=`` (a local file), loaded by :func:`models.checkpoint.load_checkpoint` with
    ``classifier="reset"`` for Glimpse's and timm's names alike.
    """
    _refuse_download(kwargs)
    if name not in _GLIMPSE_MODELS and name not in timm.list_models():
        raise ValueError(f"unknown model {name!r}; Glimpse models: {', '.join(list_models())} "
                         "(any timm model name is accepted too)")
    checkpoint_path = kwargs.pop("checkpoint_path", None)
    model = timm.create_model(name, **kwargs)
    if checkpoint_path:
        _init_from_file(model, checkpoint_path)
    return model


def _init_from_file(model: nn.Module, path: str) -> None:
    report = load_checkpoint(model, path, classifier="reset")
    if report.reset_classifier_keys:
        logger.info("%s: classifier %s left at its initialisation (the checkpoint's does not fit)",
                    path, ", ".join(report.reset_classifier_keys))


# --------------------------------------------------------------------------------------- finishing a build


def built_input_size(model: nn.Module, default: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The per-sample input shape the model was built for: ``(C, H, W)`` or ``(C, T, H, W)``.

    Starts from ``default`` (else ``model.pretrained_cfg["input_size"]``) and follows what the model says:
    ``in_chans``, ``num_frames`` (clips) and ``img_size`` (the model's own, else its ``patch_embed``'s; timm
    keeps the cfg's size when a model is built with ``img_size=``). Raises ``ValueError`` without either.
    """
    size = default if default is not None else (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
    if size is None:
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg['input_size']; pass an input explicitly")
    shape = list(size)
    img = getattr(model, "img_size", None)
    if img is None:
        img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(img, int) and not isinstance(img, bool):
        img = (img, img)
    if isinstance(img, (tuple, list)) and len(img) == 2 and all(isinstance(v, int) for v in img):
        shape[-2:] = list(img)
    in_chans = getattr(model, "in_chans", None)
    if isinstance(in_chans, int):
        shape[0] = in_chans
    frames = getattr(model, "num_frames", None)
    if len(shape) == 4 and isinstance(frames, int):
        shape[1] = frames
    return tuple(shape)


def finish_model(model: nn.Module, name: str) -> nn.Module:
    """Attach the pretrained cfg of what was built (module doc) and install the checkpoint adapter."""
    base = getattr(model, "pretrained_cfg", None) or timm.models.get_pretrained_cfg(name).to_dict()
    data = getattr(sys.modules.get(_GLIMPSE_MODELS.get(name, "")), "data_cfgs", {}).get(name, {})
    cfg = {**base, **data, "architecture": name}
    cfg["input_size"] = built_input_size(model, tuple(cfg["input_size"]))
    if len(cfg["input_size"]) == 4:
        cfg["num_frames"] = cfg["input_size"][1]
        missing = [k for k in VIDEO_DATA_KEYS if k not in cfg]
        if missing:
            raise RuntimeError(f"video model {name!r} has no {', '.join(missing)} in its data_cfgs")
    cfg.setdefault("test_views", (1, 1))
    model.pretrained_cfg = model.default_cfg = cfg
    return install_checkpoint_adapter(model)


def build_video_model(model_cls: type[nn.Module], **kwargs: Any) -> nn.Module:
    """Construct a video model directly: timm's ``build_model_with_cfg`` assumes ``input_size=(C, H, W)``,
    video cfgs hold ``(C, T, H, W)``. timm's cfg kwargs are dropped; :func:`finish_model` attaches the cfg."""
    for key in _TIMM_CFG_KWARGS:
        kwargs.pop(key, None)
    return model_cls(**kwargs)
