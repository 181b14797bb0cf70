"""EViT on any timm ViT (Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers
via Token Reorganizations", ICLR 2022).

EViT is a rival of ATS that Glimpse ships so that both can be compared in one harness at matched GFLOPs.
At a few blocks (DeiT-S/B: the 4th, 7th and 10th, i.e. 0-based blocks 3, 6, 9), between the attention
and the MLP, it reorganises the tokens (EViT section 3.2):

* **attentive tokens**: the ``ceil(kappa * (N - 1))`` non-class tokens with the highest class-token
  attention, averaged over heads (EViT eq. 3's ``A_{cls}``), are kept (``kappa`` = the keep rate);
* **inattentive token fusion** (EViT eq. 4): the others are fused into one token, their sum weighted by
  their class attention, appended after the kept ones.

The class-attention row is ATS's (:func:`models.ats.class_attention`: computed by hand, the rest of the
attention fused), so both methods score tokens with the same code. Every kept count is fixed by the keep
rate and the input size: static shapes, no host sync, ``torch.compile(fullgraph=True)`` and
``torch.export`` apply. The keep rate is an inference-time knob (:func:`set_evit_keep_rate`); a trained
ViT's parameters are unchanged, so a timm / DeiT checkpoint loads strictly.

Departures from the official code (``youweiliang/evit``, ``evit.py``): the keep rate travels as an
argument of each block's forward rather than as module state; the fused token of an earlier
reorganisation is scored and kept or fused again like any other token at a later one (the official code
does the same, silently); the kept tokens are taken in descending attention order, as ``torch.topk``
returns them (the official order too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _timm_vit_filter
from torch import Tensor

from models.ats import class_attention
from models.ats_vit import _DEIT_BASE as DEIT_BASE  # one definition of the DeiT shapes
from models.ats_vit import _DEIT_SMALL as DEIT_SMALL
from models.ats_vit import _DEIT_TINY as DEIT_TINY
from models.ats_vit import check_image_input, deit_cfg
from models.attention import masked_attention
from models.registry import register_glimpse

__all__ = ["EViTVisionTransformer", "apply_evit", "evit_kept_counts", "fuse_inattentive", "keep_attentive",
           "set_evit_keep_rate"]

DEFAULT_LOCATIONS: tuple[int, ...] = (3, 6, 9)  # EViT section 4.1: the 4th, 7th and 10th layers of DeiT
DEFAULT_KEEP_RATE = 0.7  # EViT Table 1's main DeiT-S setting


# --------------------------------------------------------------------------------------------------
# Pure functions: EViT eqs. 3-4
# --------------------------------------------------------------------------------------------------

def keep_attentive(x: Tensor, cls_attn: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """The ``keep`` non-class tokens of ``x`` (B, N, C) with the largest ``cls_attn`` (B, N-1).

    Returns the new tokens (B, 1 + keep, C), class token first, and the kept indices (B, keep) into the
    non-class tokens, in descending attention order.
    """
    idx = cls_attn.topk(keep, dim=1, largest=True, sorted=True).indices  # (B, keep)
    kept = x[:, 1:].gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))  # (B, keep, C)
    return torch.cat([x[:, :1], kept], dim=1), idx  # (B, 1 + keep, C)


def fuse_inattentive(x: Tensor, cls_attn: Tensor, kept_idx: Tensor) -> Tensor:
    """EViT eq. 4: the non-class tokens NOT in ``kept_idx``, summed with their class attention as weights.

    ``x`` (B, N, C), ``cls_attn`` (B, N-1), ``kept_idx`` (B, keep) -> (B, 1, C).
    """
    weights = cls_attn.scatter(1, kept_idx, 0.0)  # (B, N-1) zero for the kept tokens
    return (weights[..., None] * x[:, 1:]).sum(dim=1, keepdim=True)  # (B, 1, C)


def evit_kept_counts(keep_rates: Sequence[float], num_tokens: int) -> list[int]:
    """Non-class tokens each block keeps for ``num_tokens`` input tokens (class included), EViT's
    ``ceil(kappa * (N - 1))`` plus the fused token; ``N - 1`` where ``kappa`` is 1 (no reorganisation)."""
    out, n = [], num_tokens
    for rate in keep_rates:
        if rate < 1.0:
            keep = max(1, math.ceil(rate * (n - 1)))
            if keep < n - 1:  # something is left to fuse
                n = 1 + keep + 1  # class + kept + fused
        out.append(n - 1)
    return out


# --------------------------------------------------------------------------------------------------
# Modules: timm's Attention and Block with the same parameters
# --------------------------------------------------------------------------------------------------

class EViTAttention(Attention):
    """timm ``Attention`` that also returns the class token's attention to the other tokens, averaged over
    heads (EViT eq. 3). ``forward(x (B, N, C)) -> (out (B, N, C), cls_attn (B, N-1))``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        with torch.no_grad():  # the choice of tokens is discrete; the fusion weights carry no gradient either
            cls_attn = class_attention(q[:, :, 0], k, self.scale)[:, :, 1:].mean(dim=1)  # (B, N-1)
        o = masked_attention(q, k, v, None, scale=self.scale, fused=self.fused_attn,
                             dropout_p=self.attn_drop.p if self.training else 0.0)  # (B, H, N, Dh)
        y = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))  # (B, N, H*Dh)
        if self.gate is not None:
            y = y * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(y)), cls_attn


class EViTBlock(Block):
    """timm ``Block`` that reorganises tokens between attention and MLP when ``keep_rate < 1``.

    ``forward(x (B, N, C), keep_rate) -> x (B, 1 + keep + 1, C)`` (unchanged size when ``keep_rate`` = 1).
    """

    def forward(self, x: Tensor, keep_rate: float = 1.0) -> Tensor:  # type: ignore[override]
        y, cls_attn = self.attn(self.norm1(x))  # (B, N, C), (B, N-1)
        x = x + self.drop_path1(self.ls1(y))
        keep = max(1, math.ceil(keep_rate * (x.shape[1] - 1)))
        if keep_rate < 1.0 and keep < x.shape[1] - 1:
            kept, idx = keep_attentive(x, cls_attn, keep)  # (B, 1 + keep, C)
            x = torch.cat([kept, fuse_inattentive(x, cls_attn, idx)], dim=1)  # (B, 2 + keep, C)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class EViTVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks at ``evit_locations`` keep ``evit_keep_rate`` of the
    tokens; built by :func:`apply_evit`. ``forward_features`` returns (B, N', C), class token first."""

    evit_keep_rate: float | tuple[float, ...]
    evit_locations: tuple[int, ...]

    def keep_rates(self) -> list[float]:
        """The keep rate of every block (1 outside the reorganisation locations)."""
        rate = self.evit_keep_rate
        rates = [rate] * len(self.evit_locations) if isinstance(rate, (int, float)) else list(rate)
        per_block = [1.0] * len(self.blocks)
        for loc, r in zip(self.evit_locations, rates):
            per_block[loc] = float(r)
        return per_block

    def forward_features(self, x: Tensor) -> Tensor:  # type: ignore[override]
        check_image_input(x, self.patch_embed.proj.in_channels,
                          None if self.dynamic_img_size else tuple(self.patch_embed.img_size))
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))  # (B, N, C)
        for block, rate in zip(self.blocks, self.keep_rates()):
            x = block(x, rate)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, *args, **kwargs):  # noqa: D401
        raise NotImplementedError("forward_intermediates is not available for EViT models (tokens are dropped)")


def _check_keep_rate(rate: float | Sequence[float], locations: Sequence[int]) -> float | tuple[float, ...]:
    rates = [rate] if isinstance(rate, (int, float)) else list(rate)
    if isinstance(rate, (int, float)) is False and len(rates) != len(locations):
        raise ValueError(f"evit keep rate: give one value or {len(locations)} (one per location), got {rate!r}")
    if any(not 0 < float(r) <= 1 for r in rates):
        raise ValueError(f"evit keep rate must be in (0, 1], got {rate!r}")
    return float(rate) if isinstance(rate, (int, float)) else tuple(float(r) for r in rates)


def apply_evit(model: VisionTransformer, keep_rate: float | Sequence[float] = DEFAULT_KEEP_RATE,
               locations: Sequence[int] = DEFAULT_LOCATIONS) -> EViTVisionTransformer:
    """Convert a timm ``VisionTransformer`` to EViT in place (same parameters) and return it.

    EViT scores tokens by the class token's attention: it needs exactly one prefix token (the class
    token) and class-token pooling, timm ``Block``/``Attention`` blocks and no patch dropout.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_evit expects a timm VisionTransformer, got {type(model).__name__}")
    if isinstance(model, EViTVisionTransformer):
        raise ValueError("model already has EViT; use set_evit_keep_rate() to change the keep rate")
    if not model.has_class_token or model.num_prefix_tokens != 1 or model.global_pool != "token":
        raise ValueError("EViT needs one class token and class-token pooling (global_pool='token')")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("patch dropout (patch_drop_rate > 0) cannot be combined with EViT")
    locations = tuple(int(v) for v in locations)
    if not locations or any(not 0 <= v < len(model.blocks) for v in locations) or sorted(set(locations)) != list(locations):
        raise ValueError(f"evit locations must be increasing block indices in [0, {len(model.blocks)}), got {locations}")
    for block in model.blocks:
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ValueError(f"EViT converts timm Block/Attention only, got {type(block).__name__}")
        block.__class__, block.attn.__class__ = EViTBlock, EViTAttention
    model.__class__ = EViTVisionTransformer
    model.evit_locations = locations
    return set_evit_keep_rate(model, keep_rate)


def set_evit_keep_rate(model: nn.Module, keep_rate: float | Sequence[float]) -> nn.Module:
    """Set EViT's keep rate (the inference-time knob): one value for every location or one per location."""
    if not isinstance(model, EViTVisionTransformer):
        raise TypeError(f"{type(model).__name__} has no EViT (build a *_evit model or apply_evit)")
    model.evit_keep_rate = _check_keep_rate(keep_rate, model.evit_locations)
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoints, configurations, registered variants
# --------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """EViT adds no parameters: a timm ViT / DeiT checkpoint goes through timm's own ViT filter only."""
    return _timm_vit_filter(state_dict, model)


def _cfg(**kwargs) -> dict:
    return deit_cfg("arXiv:2202.07800", crop_pct=0.875, **kwargs)


default_cfgs = {"deit_tiny_evit": _cfg(), "deit_small_evit": _cfg(), "deit_base_evit": _cfg()}


def _create_evit(variant: str, arch: dict, pretrained: bool, **kwargs) -> EViTVisionTransformer:
    rate = kwargs.pop("evit_keep_rate", DEFAULT_KEEP_RATE)
    arch = {**arch, **kwargs}
    # EViT's blocks 3, 6, 9 of the 12-block DeiTs; those that exist when depth is overridden (at least one).
    locations = kwargs.pop("evit_locations", None) or tuple(v for v in DEFAULT_LOCATIONS if v < arch["depth"]) or (0,)
    arch.pop("evit_locations", None)
    model = build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 **arch)
    return apply_evit(model, rate, locations)


@register_glimpse
def deit_tiny_evit(pretrained: bool = False, **kwargs) -> EViTVisionTransformer:
    """DeiT-Ti with EViT (keep rate 0.7 at blocks 3, 6, 9 unless ``evit_keep_rate``/``evit_locations``)."""
    return _create_evit("deit_tiny_evit", DEIT_TINY, pretrained,
                        **kwargs)


@register_glimpse
def deit_small_evit(pretrained: bool = False, **kwargs) -> EViTVisionTransformer:
    """DeiT-S with EViT (keep rate 0.7 at blocks 3, 6, 9 unless ``evit_keep_rate``/``evit_locations``)."""
    return _create_evit("deit_small_evit", DEIT_SMALL, pretrained,
                        **kwargs)


@register_glimpse
def deit_base_evit(pretrained: bool = False, **kwargs) -> EViTVisionTransformer:
    """DeiT-B with EViT (keep rate 0.7 at blocks 3, 6, 9 unless ``evit_keep_rate``/``evit_locations``)."""
    return _create_evit("deit_base_evit", DEIT_BASE, pretrained,
                        **kwargs)
