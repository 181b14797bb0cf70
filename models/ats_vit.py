"""DeiT / ViT with the Adaptive Token Sampler (Fayyaz et al., ECCV 2022, ``/work/shared/papers/ats.txt``).

:func:`apply_ats` converts any timm ``VisionTransformer`` in place: blocks at the ATS stages sample
tokens (:class:`models.ats.ATSBlock`), every later block is mask-aware (:class:`models.ats.MaskedBlock`),
the pooling ignores padding, and the parameters (state_dict keys and shapes) stay exactly timm's, so
a timm / DeiT checkpoint loads with ``strict=True``.

Stages count timm's blocks from 0 (the paper's appendix F.3 uses "stages 0, 3, 6" and "3-11" for the
12-block DeiT-S). Paper settings (section 4.1, appendix E.1):

* multi-stage: ATS in blocks 3-11 (3 .. depth-1 if depth is overridden), with
  ``K_n = max(floor(rho * N_n), 8)`` and rho = 1 by default (K = the stage's input tokens; rho = 0.87 /
  0.72 give the paper's 2.5 / 2 GFLOPs averages on ImageNet);
* single-stage: ATS in block 3 only, K = 197 by default, K = 108 / 78 / 48 for 3.0 / 2.5 / 2.0 GFLOPs
  (at the upper bound K' = K; on real images K' < K and the average cost is lower).

Variants: ``deit_{tiny,small,base}_ats`` (multi-stage; ``single_stage=True`` for stage 3 only) and
``deit_small_ats_k108`` / ``_k78`` / ``_k48`` (single stage 3). Every variant accepts ``ats_stages``,
``ats_k``, ``ats_ratio``, ``ats_floor``, ``ats_mode`` (the keywords of every ATS family) and timm's
``VisionTransformer`` kwargs (img_size, num_classes, ...). K and the mode are also changeable after
construction with :func:`set_ats_k` and :func:`set_ats_mode`.

``ats_mode="static"`` (:mod:`models.ats`) keeps exactly 1 + K slots per stage, repeats and padding
masked: no host sync, ``torch.compile(fullgraph=True)`` and ``torch.export`` with a dynamic batch work,
with the same logits as the default ``"dynamic"`` mode. A forward on meta tensors runs static shapes
in either mode.

timm contract with padding: ``forward_features(x)`` returns ``(B, 1 + K'max, C)`` tokens whose padded
rows are exactly zero, and ``forward_head(features)`` without a ``token_mask`` takes all-zero rows for
padding (:func:`models.attention.nonzero_token_mask`), so ``forward_head(forward_features(x))`` equals
``forward(x)`` on any batch; ``forward`` itself passes the mask it got from
:meth:`ATSVisionTransformer.forward_features_masked` explicitly. Nothing is stored on the module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import PatchDropout, register_notrace_function
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _timm_vit_filter
from torch import Tensor

from models.ats import (
    DEFAULT_K_FLOOR,
    convert_blocks,
    forward_ats_blocks,
    masked_pool,
    set_ats_k,
    set_ats_mode,
)
from models.attention import full_mask_if_none, nonzero_token_mask, zero_padding
from models.registry import register_glimpse

__all__ = ["ATSVisionTransformer", "apply_ats", "checkpoint_filter_fn", "set_ats_k", "set_ats_mode", "MULTI_STAGES",
           "SINGLE_STAGE"]

MULTI_STAGES: tuple[int, ...] = tuple(range(3, 12))  # paper: "stages 3 to 11" of DeiT (0-based blocks)
FIRST_STAGE = 3  # multi-stage variants sample in every block from 3 on (3-11 for the 12-block DeiTs)
SINGLE_STAGE: tuple[int, ...] = (3,)  # paper: "the stage 3 of DeiT-S"
_POOLS = ("token", "avg", "max", "avgmax", "")


@register_notrace_function
def check_image_input(x: Tensor, in_chans: int, img_size: tuple[int, int] | None) -> None:
    """Refuse inputs the model cannot take, naming the offending value (an FX leaf: plain Python checks)."""
    if x.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    if img_size is not None and tuple(x.shape[-2:]) != tuple(img_size):
        raise ValueError(f"expected image size {tuple(img_size)}, got {tuple(x.shape[-2:])}; "
                         "build the model with img_size=... (or dynamic_img_size=True)")



class ATSVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks run through :func:`models.ats.forward_ats_blocks`.

    Not constructed directly: :func:`apply_ats` swaps an existing model's class to this one (the
    modules and parameters stay). Inside :func:`models.trace.record` each ATS stage emits a
    :class:`models.trace.KeptTokens` over the patch grid; the token mask is passed, never stored.
    """

    def patch_grid(self, x: Tensor) -> tuple[int, int]:
        """(rows, cols) of patch cells for the input ``x`` (B, C, H, W)."""
        if self.dynamic_img_size:
            return self.patch_embed.dynamic_feat_size(tuple(x.shape[-2:]))
        return tuple(self.patch_embed.grid_size)

    def forward_features_masked(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) -> tokens (B, 1+K'max, C) after the final norm (zero in padded slots) and
        their mask (B, 1+K'max), or None when nothing is padded."""
        check_image_input(x, self.in_chans, None if self.dynamic_img_size else tuple(self.patch_embed.img_size))
        grid = self.patch_grid(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x)  # (B, 1+N, C)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        checkpoint = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        x, mask = forward_ats_blocks(self.blocks, x, checkpoint=checkpoint, grid=grid)  # (B, 1+K, C), (B, 1+K)
        # the final norm maps zero padding to its bias: re-zero, the mask always applied (one multiply, no sync)
        return zero_padding(self.norm(x), mask, static=True), mask

    def forward_features(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """timm contract: (B, C, H, W) -> (B, 1+K'max, C), padded rows exactly zero (see the module doc).
        (No ``attn_mask`` / ``is_causal``: ATS builds its own token masks.)"""
        return self.forward_features_masked(x)[0]

    def pool(self, x: Tensor, pool_type: str | None = None, token_mask: Tensor | None = None) -> Tensor:
        """timm's pooling with padded tokens ignored. Without ``token_mask``, all-zero rows of ``x`` are
        the padding (:func:`models.attention.nonzero_token_mask`); class-token pooling needs no mask."""
        pool_type = self.global_pool if pool_type is None else pool_type
        if token_mask is None and pool_type not in ("token", ""):
            token_mask = nonzero_token_mask(x)  # (B, N)
        prefix = 0 if self.pool_include_prefix else self.num_prefix_tokens
        return masked_pool(x, token_mask, pool_type, num_prefix_tokens=prefix)

    def forward_head(self, x: Tensor, pre_logits: bool = False, token_mask: Tensor | None = None) -> Tensor:
        x = self.fc_norm(self.pool(x, token_mask=token_mask))  # (B, C)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        x, mask = self.forward_features_masked(x)
        return self.forward_head(x, token_mask=full_mask_if_none(mask, x))

    def forward_intermediates(self, *args, **kwargs):  # noqa: D401
        raise NotImplementedError("forward_intermediates is not available for ATS models (token counts vary "
                                  "per sample); use forward_features, and models.trace.record() for the kept tokens")


def apply_ats(model: VisionTransformer, stages: Sequence[int],
              k: int | Sequence[int | None] | None = None, ratio: float | Sequence[float | None] | None = None,
              floor: int = DEFAULT_K_FLOOR, mode: str = "dynamic") -> ATSVisionTransformer:
    """Convert a timm ``VisionTransformer`` to ATS in place (and return it).

    ``stages``: 0-based block indices that sample tokens; every block after the first stage becomes
    mask-aware. ``k`` / ``ratio``: one value for all stages or one per stage (see
    :func:`models.ats.resolve_k`); neither = the paper's K = input tokens. ``mode``: ``dynamic`` or
    ``static`` shapes (:func:`models.ats.set_ats_mode`). Refuses models ATS cannot
    serve: no class token, register / distillation tokens, attention pooling, patch dropout,
    or blocks other than timm's ``Block``.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_ats expects a timm VisionTransformer, got {type(model).__name__}")
    if isinstance(model, ATSVisionTransformer):
        raise ValueError("model already has ATS; use set_ats_k() to change K")
    if not model.has_class_token or model.num_prefix_tokens != 1:
        raise ValueError(f"ATS scores tokens by the class token's attention and needs exactly one prefix token; "
                         f"model has class_token={model.has_class_token}, num_prefix_tokens={model.num_prefix_tokens}")
    if model.attn_pool is not None or model.global_pool not in _POOLS:
        raise ValueError(f"global_pool={model.global_pool!r} is not supported with ATS (use one of {_POOLS})")
    if isinstance(model.patch_drop, PatchDropout):
        raise ValueError("patch dropout (patch_drop_rate > 0) cannot be combined with ATS: it reorders tokens")
    convert_blocks(model.blocks, stages, k=k, ratio=ratio, floor=floor, mode=mode)
    model.__class__ = ATSVisionTransformer  # same modules and parameters, mask-aware forward
    return model


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Adapt a timm ViT / DeiT checkpoint to an ATS model: ATS adds no parameters, so this is timm's
    own ViT filter (patch-embed / position-embedding resizing, DeiT layer-scale names) and nothing else."""
    return _timm_vit_filter(state_dict, model, adapt_layer_scale=True)


def deit_cfg(paper_ids: str, crop_pct: float = 0.9, **kwargs) -> dict:
    """timm's ``pretrained_cfg`` of a DeiT-shaped model (224 px, ImageNet mean/std): one definition for the
    ATS, ToMe and EViT variants, which differ only in their paper and evaluation crop."""
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": crop_pct, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0",
        "paper_ids": paper_ids, **kwargs,
    }


def _cfg(**kwargs) -> dict:
    return deit_cfg("arXiv:2111.15667", **kwargs)


default_cfgs = {
    "deit_tiny_ats": _cfg(),
    "deit_small_ats": _cfg(),
    "deit_base_ats": _cfg(),
    "deit_small_ats_k108": _cfg(),
    "deit_small_ats_k78": _cfg(),
    "deit_small_ats_k48": _cfg(),
}


def _create_deit_ats(variant: str, *, stages: Sequence[int] | None, k: int | None = None, ratio: float | None = None,
                     pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    if kwargs.pop("single_stage", False):
        stages = SINGLE_STAGE
    elif stages is None:  # multi-stage: blocks 3 .. depth-1 (the paper's 3-11; shorter when depth is overridden)
        stages = tuple(range(FIRST_STAGE, kwargs["depth"]))
    stages = kwargs.pop("ats_stages", stages)
    if "ats_k" in kwargs or "ats_ratio" in kwargs:  # an explicit K or ratio replaces the variant's default
        k, ratio = kwargs.pop("ats_k", None), kwargs.pop("ats_ratio", None)
    floor = kwargs.pop("ats_floor", DEFAULT_K_FLOOR)
    mode = kwargs.pop("ats_mode", "dynamic")
    model = build_model_with_cfg(VisionTransformer, variant, pretrained,
                                 pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    return apply_ats(model, stages, k=k, ratio=ratio, floor=floor, mode=mode)


_DEIT_TINY = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
_DEIT_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_DEIT_BASE = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)


@register_glimpse
def deit_tiny_ats(pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    """DeiT-Ti + ATS, multi-stage (blocks 3-11, rho = 1); ``single_stage=True`` for block 3 only."""
    return _create_deit_ats("deit_tiny_ats", stages=None, ratio=1.0, pretrained=pretrained,
                            **dict(_DEIT_TINY, **kwargs))


@register_glimpse
def deit_small_ats(pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    """DeiT-S + ATS, multi-stage (blocks 3-11, rho = 1); ``single_stage=True`` for block 3 only."""
    return _create_deit_ats("deit_small_ats", stages=None, ratio=1.0, pretrained=pretrained,
                            **dict(_DEIT_SMALL, **kwargs))


@register_glimpse
def deit_base_ats(pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    """DeiT-B + ATS, multi-stage (blocks 3-11, rho = 1); ``single_stage=True`` for block 3 only."""
    return _create_deit_ats("deit_base_ats", stages=None, ratio=1.0, pretrained=pretrained,
                            **dict(_DEIT_BASE, **kwargs))


@register_glimpse
def deit_small_ats_k108(pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    """DeiT-S + ATS, single stage 3, K = 108 (3.0 GFLOPs at K' = K; appendix E.1)."""
    return _create_deit_ats("deit_small_ats_k108", stages=SINGLE_STAGE, k=108, pretrained=pretrained,
                            **dict(_DEIT_SMALL, **kwargs))


@register_glimpse
def deit_small_ats_k78(pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    """DeiT-S + ATS, single stage 3, K = 78 (2.5 GFLOPs at K' = K; appendix E.1)."""
    return _create_deit_ats("deit_small_ats_k78", stages=SINGLE_STAGE, k=78, pretrained=pretrained,
                            **dict(_DEIT_SMALL, **kwargs))


@register_glimpse
def deit_small_ats_k48(pretrained: bool = False, **kwargs) -> ATSVisionTransformer:
    """DeiT-S + ATS, single stage 3, K = 48 (2.0 GFLOPs at K' = K; appendix B / E.1)."""
    return _create_deit_ats("deit_small_ats_k48", stages=SINGLE_STAGE, k=48, pretrained=pretrained,
                            **dict(_DEIT_SMALL, **kwargs))
