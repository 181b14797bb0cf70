"""Token Merging on any timm ViT (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023).

ToMe is a rival of ATS that Glimpse ships so that both can be compared in one harness at matched GFLOPs
(``jobs/benchmark_models.py``, the frontier job). In every block, between the attention and the MLP, it
merges ``r`` tokens into others (ToMe section 3):

* **Bipartite soft matching** (ToMe section 3, "Bipartite Soft Matching", steps 1-5): the tokens are split
  alternately into sets A and B; each token of A is linked to its most similar token of B (cosine of the
  attention keys averaged over heads); the ``r`` most similar links are kept, and those A tokens are merged
  into their B partners; the rest of A and all of B are concatenated. The class token is never merged.
* **Size tracking**: every token carries how many patches it stands for, ``s``; merges average features
  weighted by size (ToMe eq. 1's weighted average).
* **Proportional attention** (ToMe eq. 1): ``A = softmax(Q K^T / sqrt(d) + log s)``, so a merged token is
  attended to as the patches it represents would be.

Each block removes exactly ``r`` tokens (at most half of the mergeable ones), so every shape is known
before the forward: no host sync, ``torch.compile(fullgraph=True)`` and ``torch.export`` apply unchanged.

``r`` is an inference-time knob (:func:`set_tome_r`): one value for every block (ToMe's constant
schedule) or one per block. ToMe is applied off the shelf to a trained ViT: the parameters are timm's,
so a timm / DeiT checkpoint loads strictly.

Departures from the official code (``facebookresearch/ToMe``, ``tome/patch/timm.py``), each deliberate:

* the size and ``r`` travel as arguments, not in a dict shared by every module (``_tome_info``), so nothing
  of a forward is stored on the modules (DDP, torch.compile and two concurrent batches stay correct);
* timm's layer scale (``ls1``/``ls2``) and its optional attention norm / gate are kept; the official patch
  skips them (DeiT has none, so its numbers are unaffected);
* the fused SDPA path is used when timm's ``fused_attn`` says so, with ``log s`` as an additive mask
  (the official code forms the attention matrix by hand); both paths are tested for parity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _timm_vit_filter
from torch import Tensor

from models.ats_vit import _DEIT_BASE as DEIT_BASE  # one definition of the DeiT shapes
from models.ats_vit import _DEIT_SMALL as DEIT_SMALL
from models.ats_vit import _DEIT_TINY as DEIT_TINY
from models.ats_vit import check_image_input, deit_cfg
from models.registry import register_glimpse

__all__ = ["TokenMatch", "ToMeVisionTransformer", "apply_tome", "bipartite_soft_matching", "merge_tokens",
           "merge_weighted", "set_tome_r", "tome_schedule"]


# --------------------------------------------------------------------------------------------------
# Pure functions: matching (ToMe section 3) and merging (ToMe eq. 1's size-weighted average)
# --------------------------------------------------------------------------------------------------

class TokenMatch(NamedTuple):
    """Which tokens of set A (the even positions) merge into which tokens of set B (the odd ones).

    ``src`` (B, r, 1): A-positions merged away; ``dst`` (B, r, 1): their B partners; ``unmerged``
    (B, Na - r, 1): A-positions kept, in ascending order (so the class token stays first).
    """

    src: Tensor
    dst: Tensor
    unmerged: Tensor


def bipartite_soft_matching(metric: Tensor, r: int, protect_first: bool = True) -> TokenMatch:
    """ToMe's bipartite soft matching, steps 1-4: pick the ``r`` A tokens most similar to some B token.

    ``metric`` (B, N, D): the keys averaged over heads; ``r`` must be at most ``(N - protect_first) // 2``
    (:func:`tome_schedule` enforces it). ``protect_first`` keeps token 0 (the class token) out of every
    merge. No gradient flows through the choice.
    """
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True)  # (B, N, D) cosine similarity below
        a, b = metric[:, ::2], metric[:, 1::2]  # (B, Na, D), (B, Nb, D): alternate split, step 1
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        if protect_first:
            scores[:, 0, :] = -math.inf  # the class token is never a source
        best, partner = scores.max(dim=-1)  # (B, Na): step 2, one edge per A token
        order = best.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1) most similar first
        src = order[:, :r]  # (B, r, 1): step 3, the r strongest edges
        unmerged = order[:, r:].sort(dim=1).values  # (B, Na - r, 1) ascending: class token first
        dst = partner[..., None].gather(1, src)  # (B, r, 1)
    return TokenMatch(src=src, dst=dst, unmerged=unmerged)


def merge_tokens(x: Tensor, match: TokenMatch, reduce: str = "sum") -> Tensor:
    """Step 5: ``x`` (B, N, C) -> (B, N - r, C) = [kept A tokens, B tokens with the sources reduced in]."""
    a, b = x[:, ::2], x[:, 1::2]  # (B, Na, C), (B, Nb, C)
    B, _, C = a.shape
    r = match.src.shape[1]
    kept = a.gather(1, match.unmerged.expand(B, match.unmerged.shape[1], C))  # (B, Na - r, C)
    src = a.gather(1, match.src.expand(B, r, C))  # (B, r, C)
    b = b.scatter_reduce(1, match.dst.expand(B, r, C), src, reduce=reduce)  # (B, Nb, C)
    return torch.cat([kept, b], dim=1)  # (B, N - r, C)


def merge_weighted(x: Tensor, size: Tensor, match: TokenMatch) -> tuple[Tensor, Tensor]:
    """Size-weighted merge (ToMe eq. 1): features averaged by the patches each token stands for.

    ``x`` (B, N, C), ``size`` (B, N, 1) -> merged ``x`` (B, N - r, C) and summed ``size`` (B, N - r, 1).
    """
    total = merge_tokens(x * size, match)  # (B, N - r, C)
    size = merge_tokens(size, match)  # (B, N - r, 1)
    return total / size, size


def tome_schedule(r: int | Sequence[int], depth: int, num_tokens: int, protected: int = 1) -> list[int]:
    """Tokens each block merges: ``r`` for every block (ToMe's constant schedule) or one value per block,
    each clipped to half of the mergeable tokens left (ToMe section 3: A has half of them)."""
    per_block = [int(r)] * depth if isinstance(r, int) else [int(v) for v in r]
    if len(per_block) != depth or any(v < 0 for v in per_block):
        raise ValueError(f"tome r must be a non-negative int or {depth} of them (one per block), got {r!r}")
    out, n = [], num_tokens
    for v in per_block:
        v = min(v, (n - protected) // 2)
        out.append(v)
        n -= v
    return out


# --------------------------------------------------------------------------------------------------
# Modules: timm's Attention and Block with the same parameters
# --------------------------------------------------------------------------------------------------

class ToMeAttention(Attention):
    """timm ``Attention`` with proportional attention (ToMe eq. 1) that also returns the merge metric.

    ``forward(x (B, N, C), size (B, N, 1) | None) -> (out (B, N, C), metric (B, N, Dh))``.
    """

    def forward(self, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else size.log()[:, None, None, :, 0]  # (B, 1, 1, N): + log s, ToMe eq. 1
        dropout_p = self.attn_drop.p if self.training else 0.0
        if self.fused_attn:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p)  # (B, H, N, Dh)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
            if bias is not None:
                logits = logits + bias
            o = self.attn_drop(logits.softmax(dim=-1)) @ v  # (B, H, N, Dh)
        y = self.norm(o.transpose(1, 2).reshape(B, N, self.attn_dim))  # (B, N, H*Dh)
        if self.gate is not None:
            y = y * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(y)), k.mean(dim=1)  # (B, N, C), (B, N, Dh) keys over heads


class ToMeBlock(Block):
    """timm ``Block`` that merges ``r`` tokens between attention and MLP (ToMe Fig. 1).

    ``forward(x (B, N, C), size (B, N, 1) | None, r) -> (x (B, N - r, C), size (B, N - r, 1) | None)``.
    """

    def forward(self, x: Tensor, size: Tensor | None = None, r: int = 0  # type: ignore[override]
                ) -> tuple[Tensor, Tensor | None]:
        y, metric = self.attn(self.norm1(x), size)  # (B, N, C), (B, N, Dh)
        x = x + self.drop_path1(self.ls1(y))
        if r > 0:
            if size is None:
                size = x.new_ones(x.shape[0], x.shape[1], 1)  # (B, N, 1) every token one patch
            x, size = merge_weighted(x, size, bipartite_soft_matching(metric, r))  # (B, N - r, C)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, size


class ToMeVisionTransformer(VisionTransformer):
    """A timm ``VisionTransformer`` whose blocks merge tokens; built by :func:`apply_tome`.

    ``tome_r``: tokens merged per block (an int, or one per block); ``forward_features`` returns
    (B, N - sum(r), C) tokens, class token first, so timm's ``forward_head`` applies unchanged.
    """

    tome_r: int | tuple[int, ...]

    def merge_schedule(self) -> list[int]:
        return tome_schedule(self.tome_r, len(self.blocks), self.patch_embed.num_patches + self.num_prefix_tokens,
                             protected=self.num_prefix_tokens)

    def forward_features(self, x: Tensor) -> Tensor:  # type: ignore[override]
        check_image_input(x, self.patch_embed.proj.in_channels,
                          None if self.dynamic_img_size else tuple(self.patch_embed.img_size))
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))  # (B, N, C)
        size = None
        for block, r in zip(self.blocks, self.merge_schedule()):
            x, size = block(x, size, r)  # (B, N - r, C)
        return self.norm(x)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, *args, **kwargs):  # noqa: D401
        raise NotImplementedError("forward_intermediates is not available for ToMe models (tokens are merged)")


def apply_tome(model: VisionTransformer, r: int | Sequence[int] = 0) -> ToMeVisionTransformer:
    """Convert a timm ``VisionTransformer`` to ToMe in place (same parameters) and return it.

    Refuses what bipartite matching cannot serve: register / distillation tokens (more than one prefix
    token), attention pooling, patch dropout, and blocks other than timm's ``Block``.
    """
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"apply_tome expects a timm VisionTransformer, got {type(model).__name__}")
    if isinstance(model, ToMeVisionTransformer):
        raise ValueError("model already merges tokens; use set_tome_r() to change r")
    if model.num_prefix_tokens > 1 or model.attn_pool is not None:
        raise ValueError(f"ToMe here supports at most one class token and no attention pooling; model has "
                         f"num_prefix_tokens={model.num_prefix_tokens}, global_pool={model.global_pool!r}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise ValueError("patch dropout (patch_drop_rate > 0) cannot be combined with ToMe")
    for block in model.blocks:
        if type(block) is not Block or type(block.attn) is not Attention:
            raise ValueError(f"ToMe converts timm Block/Attention only, got {type(block).__name__}")
        block.__class__, block.attn.__class__ = ToMeBlock, ToMeAttention
    model.__class__ = ToMeVisionTransformer
    set_tome_r(model, r)
    return model


def set_tome_r(model: nn.Module, r: int | Sequence[int]) -> nn.Module:
    """Set ToMe's ``r`` (the inference-time knob) on a ToMe model; returns it. Checked against its depth."""
    if not isinstance(model, ToMeVisionTransformer):
        raise TypeError(f"{type(model).__name__} does not merge tokens (build a *_tome model or apply_tome)")
    value = int(r) if isinstance(r, int) else tuple(int(v) for v in r)
    tome_schedule(value, len(model.blocks), model.patch_embed.num_patches + model.num_prefix_tokens)  # validate
    model.tome_r = value
    return model


# --------------------------------------------------------------------------------------------------
# Checkpoints, configurations, registered variants
# --------------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """ToMe adds no parameters: a timm ViT / DeiT checkpoint goes through timm's own ViT filter only."""
    return _timm_vit_filter(state_dict, model)


def _cfg(**kwargs) -> dict:
    return deit_cfg("arXiv:2210.09461", crop_pct=0.875, **kwargs)


default_cfgs = {"deit_tiny_tome": _cfg(), "deit_small_tome": _cfg(), "deit_base_tome": _cfg()}

# ToMe's off-the-shelf setting for ViT-S/16 and DeiT at 224 (ToMe Table 4 / Fig. 4): r = 13 per block.
DEFAULT_R = 13


def _create_tome(variant: str, arch: dict, pretrained: bool, **kwargs) -> ToMeVisionTransformer:
    r = kwargs.pop("tome_r", DEFAULT_R)
    model = build_model_with_cfg(VisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 **{**arch, **kwargs})
    return apply_tome(model, r)


@register_glimpse
def deit_tiny_tome(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-Ti with ToMe (r = 13 per block unless ``tome_r`` is given)."""
    return _create_tome("deit_tiny_tome", DEIT_TINY, pretrained,
                        **kwargs)


@register_glimpse
def deit_small_tome(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-S with ToMe (r = 13 per block unless ``tome_r`` is given)."""
    return _create_tome("deit_small_tome", DEIT_SMALL, pretrained,
                        **kwargs)


@register_glimpse
def deit_base_tome(pretrained: bool = False, **kwargs) -> ToMeVisionTransformer:
    """DeiT-B with ToMe (r = 13 per block unless ``tome_r`` is given)."""
    return _create_tome("deit_base_tome", DEIT_BASE, pretrained,
                        **kwargs)
