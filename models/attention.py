"""Masked multi-head attention and token padding: the one implementation every family uses.

Token-efficient models pad: after an ATS stage (ATS section 3.2, appendix A) each sample keeps its own
K' tokens and the batch is trimmed to the largest, so shorter samples carry padded slots. Two rules keep
a sample's result independent of its batch, and both live here:

* padded keys take no part in any softmax: :func:`masked_attention` (fused SDPA or the softmax formed
  by hand, chosen by timm's ``fused_attn`` switch, so a model can be checked against its manual twin);
* padded token rows are exactly zero after every block: :func:`zero_padding`, the one helper that
  re-zeroes them (LayerNorm maps a zero row to its bias, residual adds would carry it on).

Masks are ``(B, N)`` bool tensors, ``True`` = live, over the rows of the tensor they accompany, or
``None`` when nothing is padded. ``static=True`` (ATS's static-shape mode, :mod:`models.ats`) makes every
helper here free of host syncs: a given mask is always applied, never first checked for "all live" (that
check reads a device value on the host, which stalls a GPU's launch queue and breaks ``torch.compile``'s
full graphs); the result is the same, only the unmasked fast paths are skipped. Image ATS (``models.ats``), PS-ViT + ATS (the same blocks) and the video
transformers' frame attention and video ATS (``models.video_vit_common``) all attend through here.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function
from torch import Tensor

__all__ = ["full_mask_if_none", "key_padding_mask", "masked_attention", "nonzero_token_mask", "set_model_fused_attn",
           "zero_padding"]


@register_notrace_function
def key_padding_mask(token_mask: Tensor | None, static: bool = False) -> Tensor | None:
    """(B, N) live mask -> (B, 1, 1, N) SDPA boolean mask (True = attend), or None if nothing is padded
    (``static``: None only when ``token_mask`` is None, no look at its values)."""
    if token_mask is None:
        return None
    if not static and bool(token_mask.all()):
        return None  # lets SDPA take its unmasked fast path
    return token_mask[:, None, None, :]  # (B, 1, 1, N)


@register_notrace_function  # an FX leaf: whether anything is padded is data-dependent
def masked_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, *, scale: float,
                     fused: bool, dropout_p: float = 0.0, static: bool = False) -> Tensor:
    """``softmax(q k^T * scale) v`` for the given query rows, padded keys excluded (ATS eqs. 1-2; ATS eq. 6
    when the queries are the kept rows only).

    ``q`` (B, H, Lq, Dh), ``k`` / ``v`` (B, H, Lk, Dh), ``key_mask`` (B, Lk) bool or None -> (B, H, Lq, Dh).
    ``fused`` runs ``F.scaled_dot_product_attention``; otherwise the (Lq, Lk) matrix is formed by hand (the
    same maths: the pair is tested for parity). ``dropout_p`` drops attention weights (pass 0 in eval).
    Every query row needs at least one live key (the class token always is). ``static``: see the module doc.
    """
    mask = key_padding_mask(key_mask, static)  # (B, 1, 1, Lk) or None
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                              scale=scale)  # (B, H, Lq, Dh)
    logits = (q * scale) @ k.transpose(-2, -1)  # (B, H, Lq, Lk)
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))  # padded keys get weight 0
    a = logits.softmax(dim=-1)  # (B, H, Lq, Lk) rows of A
    if dropout_p > 0.0:
        a = F.dropout(a, p=dropout_p)
    return a @ v  # (B, H, Lq, Dh)


@register_notrace_function
def zero_padding(x: Tensor, token_mask: Tensor | None, static: bool = False) -> Tensor:
    """Zero the padded token rows of ``x`` (B, ..., N, C) given ``token_mask`` (B, N); a no-op (no copy)
    when nothing is padded (``static``: when ``token_mask`` is None). The leading ``...`` (e.g. XViT's
    frames) share the sample's mask."""
    if token_mask is None or (not static and bool(token_mask.all())):
        return x
    shape = (x.shape[0],) + (1,) * (x.dim() - 3) + (token_mask.shape[1], 1)
    return x * token_mask.reshape(shape).to(x.dtype)  # (B, ..., N, C)


def nonzero_token_mask(x: Tensor) -> Tensor:
    """(B, N, C) features -> (B, N) mask, True where a token row is not all zero.

    Padded rows of an ATS model's features are exactly zero (:func:`zero_padding`), so this recovers the
    token mask from the features alone (timm's ``forward_head(forward_features(x))``). A live row is all
    zero only if the final LayerNorm maps it there (constant features and zero bias): such a token would
    then be taken for padding.
    """
    return x.ne(0).any(dim=-1)  # (B, N)


def full_mask_if_none(token_mask: Tensor | None, x: Tensor) -> Tensor:
    """``token_mask``, or an all-live (B, N) mask for ``x`` (B, N, C) when nothing is padded: what a model's
    ``forward`` hands its head, so that the head never has to infer the mask from zero rows."""
    if token_mask is not None:
        return token_mask
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)  # (B, N)


def set_model_fused_attn(model: nn.Module, enabled: bool) -> int:
    """Switch every attention module of ``model`` (those with timm's ``fused_attn`` attribute) to fused
    SDPA or the manual softmax; returns how many were switched. timm reads ``use_fused_attn()`` (the
    ``TIMM_FUSED_ATTN`` environment variable) only when a module is built."""
    switched = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = bool(enabled)
            switched += 1
    return switched
