"""Loading checkpoints into models: one loader for every path, safely and strictly.

:func:`load_checkpoint` is the only place that decides what a checkpoint may change:

1. read: a local file with ``weights_only=True`` (never unpickle arbitrary objects; ``.safetensors``
   too) or an in-memory state dict; the usual containers (timm, DeiT, PySlowFast, mmaction2, Glimpse's
   training checkpoints) are unwrapped and a DistributedDataParallel ``module.`` prefix is stripped;
2. adapt (:func:`adapt_state_dict`): a dict that already fits the model is loaded as it is; otherwise
   the family's ``checkpoint_filter_fn(state_dict, model)`` (found in the module that defines the
   model's class: timm ViT -> ATS-ViT, image ViT -> TimeSformer/XViT, image SparseFormer ->
   VideoSparseFormer, the PS-ViT and SparseFormer releases) remaps and inflates the keys. Filters
   never decide about the classifier;
3. the classifier rule: the classifier is what ``pretrained_cfg["classifier"]`` names (a module path,
   ``"head"`` by default). ``classifier="strict"`` refuses any classifier that does not fit;
   ``"reset"`` leaves classifier parameters whose shapes differ (or that one side lacks) at the
   model's initialisation and reports them (fine-tuning on another label set);
4. everything else must fit exactly: otherwise :class:`CheckpointMismatchError` names the missing,
   unexpected and mis-shaped keys.

Glimpse's builders also install the adapter of step 2 as a ``load_state_dict`` pre-hook
(:func:`install_checkpoint_adapter`), so ``timm.create_model(name, checkpoint_path=...)``, which calls
``model.load_state_dict(sd, strict=True)`` itself, adapts foreign dicts the same way (its classifier
rule is timm's: strict).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
from torch import Tensor

__all__ = ["CheckpointMismatchError", "LoadReport", "adapt_state_dict", "check_state_dict", "classifier_keys",
           "family_filter", "install_checkpoint_adapter", "load_checkpoint", "read_state_dict"]

FilterFn = Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]]
ClassifierRule = Literal["strict", "reset"]

# Containers used by timm, DeiT, PySlowFast, mmaction2 and Glimpse's own training checkpoints.
_CONTAINER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state")


class CheckpointMismatchError(ValueError):
    """A checkpoint's keys or shapes do not fit the model."""


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_checkpoint` did.

    ``source``: the file path, or ``"<state dict>"``. ``adapted``: True when the dict did not fit as it
    was and the family's ``checkpoint_filter_fn`` adapted it. ``reset_classifier_keys``: the classifier
    parameters left at the model's initialisation (``classifier="reset"`` only), sorted.
    """

    source: str
    adapted: bool
    reset_classifier_keys: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------- reading


def _unwrap(obj: object, *, prefer_ema: bool, source: str) -> dict[str, Tensor]:
    """The tensor state dict inside ``obj`` (containers unwrapped, ``module.`` prefix stripped)."""
    keys = _CONTAINER_KEYS if prefer_ema else tuple(k for k in _CONTAINER_KEYS if "ema" not in k)
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in keys if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{source} does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def read_state_dict(path: str | Path, *, prefer_ema: bool = False) -> dict[str, Tensor]:
    """Read a tensor state dict from a local file with ``weights_only=True``.

    Accepts a bare state dict or one nested under a common container key (EMA weights first with
    ``prefer_ema``), and strips a ``module.`` prefix left by DistributedDataParallel.
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
    return _unwrap(obj, prefer_ema=prefer_ema, source=str(path))


# ---------------------------------------------------------------------------------------------- adapting


def family_filter(model: nn.Module) -> FilterFn | None:
    """The ``checkpoint_filter_fn`` of the module that defines ``type(model)``, or None (timm's own
    families included: a timm ``VisionTransformer`` gets timm's ViT filter)."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def classifier_keys(model: nn.Module, keys: object = None) -> list[str]:
    """The state-dict keys (of ``model``, or among ``keys``) under the classifier module(s) that
    ``model.pretrained_cfg["classifier"]`` names (default ``"head"``)."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    prefixes = tuple(n + "." for n in ((names,) if isinstance(names, str) else names))
    pool = model.state_dict().keys() if keys is None else keys
    return [k for k in pool if k.startswith(prefixes)]


def _fits(model: nn.Module, state_dict: Mapping[str, Tensor]) -> bool:
    """Same keys and shapes as the model, the classifier aside (that is the classifier rule's matter)."""
    own = model.state_dict()
    head = set(classifier_keys(model)) | set(classifier_keys(model, state_dict.keys()))
    body = set(own) - head
    return body == set(state_dict) - head and all(own[k].shape == state_dict[k].shape for k in body)


def adapt_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], bool]:
    """``(state_dict, adapted)``: the dict as it is when it fits ``model`` (classifier aside), else what the
    family's ``checkpoint_filter_fn`` makes of it (``adapted=True``). Models without a filter get it as is."""
    state_dict = dict(state_dict)
    if _fits(model, state_dict):
        return state_dict, False
    filter_fn = family_filter(model)
    if filter_fn is None:
        return state_dict, False
    return dict(filter_fn(state_dict, model)), True


def _adapt_on_load(module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict: bool,
                   missing_keys, unexpected_keys, error_msgs) -> None:
    """``load_state_dict`` pre-hook: adapt a foreign dict in place (e.g. for timm's
    ``create_model(checkpoint_path=)``). The adaptation is taken only when its result fits the model:
    anything else (a partial dict loaded with ``strict=False``, a checkpoint of another size) reaches
    ``load_state_dict`` untouched, which then loads or reports it as it always does. (torch passes
    ``strict=True`` to every pre-hook, whatever the caller asked, so the hook cannot go by that flag.)"""
    local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    adapted, changed = adapt_state_dict(module, local)
    if not changed or not _fits(module, adapted):
        return
    for k in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[k]
    state_dict.update({prefix + k: v for k, v in adapted.items()})


def install_checkpoint_adapter(model: nn.Module) -> nn.Module:
    """Make ``model.load_state_dict(sd, strict=True)`` adapt ``sd`` as :func:`load_checkpoint` does (once)."""
    if not getattr(model, "_glimpse_checkpoint_adapter", False):
        model.register_load_state_dict_pre_hook(_adapt_on_load)
        model._glimpse_checkpoint_adapter = True
    return model


# ------------------------------------------------------------------------------------------------ checks


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "checkpoint",
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
            problems.append(f"missing keys ({len(missing)}): {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listed(unexpected)}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit {type(model).__name__}: " + " | ".join(problems))


def _reset_classifier(model: nn.Module, state_dict: dict[str, Tensor]) -> tuple[str, ...]:
    """Classifier entries that do not fit are replaced by the model's own (dropped if it has none)."""
    own = model.state_dict()
    reset = []
    for key in set(classifier_keys(model)) | set(classifier_keys(model, state_dict.keys())):
        if key not in own:
            del state_dict[key]  # the model has no such classifier parameter (e.g. num_classes=0)
            reset.append(key)
        elif key not in state_dict or state_dict[key].shape != own[key].shape:
            state_dict[key] = own[key]  # left at the model's initialisation
            reset.append(key)
    return tuple(sorted(reset))


def load_checkpoint(model: nn.Module, source: str | Path | Mapping[str, Tensor], *,
                    classifier: ClassifierRule = "strict", prefer_ema: bool = False) -> LoadReport:
    """Load ``source`` (a local file or a state dict) into ``model``: read, adapt, apply the classifier
    rule, then load strictly (module docstring). Raises :class:`CheckpointMismatchError` naming the keys
    and shapes that do not fit, ``FileNotFoundError`` for a missing file."""
    if classifier not in ("strict", "reset"):
        raise ValueError(f"classifier must be 'strict' or 'reset', got {classifier!r}")
    if isinstance(source, (str, Path)):
        name, state_dict = str(source), read_state_dict(source, prefer_ema=prefer_ema)
    else:
        name, state_dict = "<state dict>", _unwrap(source, prefer_ema=prefer_ema, source="<state dict>")
    state_dict, adapted = adapt_state_dict(model, state_dict)
    reset = _reset_classifier(model, state_dict) if classifier == "reset" else ()
    check_state_dict(model, state_dict, source=name, strict=True)
    model.load_state_dict(state_dict, strict=True)  # fits now: the adapter hook, if any, leaves it as is
    return LoadReport(source=name, adapted=adapted, reset_classifier_keys=reset)
