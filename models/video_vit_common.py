"""Pieces shared by Glimpse's video ViTs (:mod:`models.timesformer`, :mod:`models.xvit`).

* input validation for ``(B, C, T, H, W)`` clips;
* multi-head self-attention with timm ViT's parameter names (``qkv``, ``proj``) on PyTorch's fused
  ``scaled_dot_product_attention``, with an optional key-padding mask;
* the token state that flows through the blocks once ATS has dropped spatial positions;
* ATS across time (Fayyaz et al., ECCV 2022, eqs. 3-6, applied per frame and shared by the clip);
* helpers that inflate an ImageNet ViT state dict (timm format) into a video model.

Token layout used by both families: a clip has ``T`` frames of ``S = (H / p) * (W / p)`` patches. Patch
tokens are kept as ``(B, S, T, D)`` (TimeSformer) or ``(B, T, 1 + S, D)`` (XViT, one class token per
frame); frame-level attention always runs on ``(B * T, 1 + S, D)`` sequences whose first row is a class
token, frames of one clip contiguous (row ``b * T + t``).

ATS across time (the ATS paper does not say how to sample video tokens; this is Glimpse's decision):
    Both TimeSformer (divided space-time attention) and XViT (space-time mixing) need the SAME spatial
    positions in every frame: TimeSformer's temporal attention attends along one position's tube, and
    XViT's key/value mixing takes channels from the same position in frames ``t - 1`` and ``t + 1``.
    So ATS samples spatial positions ONCE PER CLIP and every frame keeps them:

    1. per frame ``t`` the class token's attention row gives eq. 3 scores over the ``S`` positions
       (normalised to sum 1 in that frame);
    2. the clip's score of a position is the mean of its per-frame scores (each frame votes with equal
       weight; the mean still sums to 1, so it is a distribution for eqs. 4-5);
    3. inverse transform sampling (eqs. 4-5) picks ``K' <= K`` positions per clip;
    4. eq. 6 computes the kept rows ``O = A^s V`` in every frame (``T * (K' + 1)`` query rows instead of
       ``T * (S + 1)``); the FFN and every later block run on the kept positions only.

    ``K`` therefore counts spatial positions (each carries ``T`` tokens) and is resolved per clip from
    its own live positions + 1, exactly as :func:`models.ats.resolve_k` counts one image's tokens (one
    frame's sequence): a count, or ``max(floor(ratio * N), floor)``, or by default all positions. The
    class token(s) are always kept. Clips of a batch keep different ``K'``; the batch is trimmed to the
    largest and the padded positions are masked: keys excluded from every later softmax, tokens held at
    zero, never pooled (both models pool class tokens only). The kept positions and ``K'`` of every
    stage are recorded as :class:`models.ats.ATSStageTrace` (``model.ats_trace``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function, resample_abs_pos_embed
from torch import Tensor

from models.ats import (
    ATSSamplingMixin,
    ats_significance,
    ats_stages,
    class_attention,
    inverse_transform_sample,
    key_padding_mask,
    set_ats_k,
    with_class_token,
)
from models.registry import build_video_model

__all__ = [
    "check_video_input", "FrameAttention", "TokenState", "initial_state", "frame_key_mask", "masked_sdpa",
    "gather_positions", "gather_rows", "sample_clip_positions", "ats_clip_attention", "configure_ats",
    "check_ats_stages", "vit_pos_embed_to_grid", "fill_from_model",
]


# ----------------------------------------------------------------------------------------------- inputs


def check_video_input(x: Tensor, *, in_chans: int, num_frames: int, img_size: tuple[int, int], model: str) -> None:
    """Refuse anything but a ``(B, in_chans, num_frames, H, W)`` clip with ``(H, W) == img_size``.

    Raises ``ValueError`` naming the offending value (channels, frames or size).
    """
    if x.ndim != 5:
        raise ValueError(f"{model} expects a (B, C, T, H, W) clip, got a {x.ndim}-D tensor of shape {tuple(x.shape)}")
    _, c, t, h, w = x.shape
    if c != in_chans:
        raise ValueError(f"{model} expects {in_chans} channels, got C={c} (input shape {tuple(x.shape)})")
    if t != num_frames:
        raise ValueError(f"{model} was built for num_frames={num_frames}, got T={t} frames "
                         f"(input shape {tuple(x.shape)}); build it with num_frames={t}")
    if (h, w) != tuple(img_size):
        raise ValueError(f"{model} was built for img_size={tuple(img_size)}, got H x W = {h} x {w} "
                         f"(input shape {tuple(x.shape)}); build it with img_size={h}")


# -------------------------------------------------------------------------------------------- attention


def masked_sdpa(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, dropout_p: float = 0.0) -> Tensor:
    """Fused attention ``softmax(q k^T / sqrt(Dh)) v`` with padded keys excluded.

    q (B, H, Nq, Dh), k / v (B, H, Nk, Dh), key_mask (B, Nk) bool (True = live key) or None.
    Every row must have at least one live key (the class token always is).
    """
    attn_mask = key_padding_mask(key_mask)  # (B, 1, 1, Nk), or None when nothing is padded (fast path)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # (B, H, Nq, Dh)


class FrameAttention(nn.Module):
    """Multi-head self-attention with timm ViT's parameter names (``qkv``, ``proj``).

    ``qkv_heads`` and ``merge_heads`` are exposed so that the blocks can run their own attention pattern
    (XViT's key/value mixing, ATS's class row + kept rows) with the same weights.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> q, k, v, each (B, H, N, Dh)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        return qkv[0], qkv[1], qkv[2]

    def merge_heads(self, o: Tensor) -> Tensor:
        """(B, H, N, Dh) -> output projection -> (B, N, D)."""
        b, _, n, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, -1)))

    @property
    def dropout_p(self) -> float:
        return self.attn_drop if self.training else 0.0

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        q, k, v = self.qkv_heads(x)  # (B, H, N, Dh) each
        return self.merge_heads(masked_sdpa(q, k, v, key_mask, self.dropout_p))  # (B, N, D)


# ----------------------------------------------------------------------------------------- token state


class TokenState(NamedTuple):
    """What the blocks pass along besides the tokens once ATS may have dropped spatial positions.

    mask: (B, S') bool, True = live position; None while no position was dropped (no padding anywhere).
    positions: (B, S') long, each current position's index in the ORIGINAL patch grid (row-major over
        ``(H / p, W / p)``); padded slots hold meaningless indices: read them with ``mask``.
    """

    mask: Tensor | None
    positions: Tensor


def initial_state(batch: int, num_positions: int, device: torch.device) -> TokenState:
    positions = torch.arange(num_positions, device=device).unsqueeze(0).expand(batch, -1)  # (B, S)
    return TokenState(mask=None, positions=positions)


def frame_key_mask(pos_mask: Tensor | None, num_frames: int) -> Tensor | None:
    """Per-frame key mask ``(B * T, 1 + S)`` from a clip's position mask ``(B, S)`` (class token live)."""
    if pos_mask is None:
        return None
    cls = torch.ones_like(pos_mask[:, :1])  # (B, 1)
    return torch.cat([cls, pos_mask], dim=1).repeat_interleave(num_frames, dim=0)  # (B*T, 1+S)


@register_notrace_function
def gather_positions(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Select positions ``idx`` (B, K) along ``dim`` of ``x`` (B, ...): data-dependent, kept out of FX tracing."""
    shape = [1] * x.ndim
    shape[0], shape[dim] = idx.shape
    index = idx.reshape(shape).expand(*[x.shape[i] if i != dim else idx.shape[1] for i in range(x.ndim)])
    return torch.gather(x, dim, index)


# ------------------------------------------------------------------------------------------------ ATS


@register_notrace_function
def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x (B', H, N, Dh), idx (B', L) -> (B', H, L, Dh): the same rows in every head."""
    bt, h, _, dh = x.shape
    index = idx[:, None, :, None].expand(bt, h, idx.shape[1], dh)  # (B', H, L, Dh)
    return torch.gather(x, 2, index)


def sample_clip_positions(q_cls: Tensor, k: Tensor, v: Tensor, *, num_frames: int, pos_mask: Tensor | None,
                          budget: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Steps 1-3 of the module docstring: eq. 3 per frame, mean over the clip's frames, eqs. 4-5.

    q_cls (B*T, H, Dh) the frames' class-token queries; k, v (B*T, H, 1+S, Dh); pos_mask (B, S) or None;
    budget (B,) K per clip. Returns idx (B, K'max) kept positions (ascending) and valid (B, K'max).
    Runs without gradient: the selection is discrete (as in the paper and :mod:`models.ats`).
    """
    with torch.no_grad():
        key_mask = frame_key_mask(pos_mask, num_frames)  # (B*T, 1+S) or None
        cls_attn = class_attention(q_cls, k, scale, key_mask)  # (B*T, H, 1+S) row 1 of A, by hand
        frame_scores = ats_significance(cls_attn, v, key_mask)  # (B*T, S) eq. 3, each row sums to 1
        b, s = budget.shape[0], frame_scores.shape[1]
        clip_scores = frame_scores.view(b, num_frames, s).mean(dim=1)  # (B, S) every frame votes equally
        return inverse_transform_sample(clip_scores, budget, pos_mask)  # (B, K'max) each


def ats_clip_attention(q: Tensor, k: Tensor, v: Tensor, *, num_frames: int, pos_mask: Tensor | None,
                       sampler: ATSSamplingMixin, scale: float, dropout_p: float = 0.0,
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """ATS on frame-level attention with positions shared by the clip (module docstring, steps 1-4).

    Args:
        q, k, v: (B*T, H, 1 + S, Dh) per-frame queries / keys / values, row 0 the frame's class token
            (for XViT ``k`` / ``v`` are the time-mixed ones its attention really uses).
        num_frames: T.
        pos_mask: (B, S) live positions, or None (all live).
        sampler: the block's K settings (:class:`models.ats.ATSSamplingMixin`): K is resolved per clip
            from its own live positions + 1 (one frame's sequence, as ``resolve_k`` counts an image's).
        scale: attention scale (1 / sqrt(Dh)).

    Returns:
        out: (B*T, H, 1 + K'max, Dh) eq. 6 ``O = A^s V`` for the class row and the kept positions of
            every frame, fused SDPA over all live keys (the N x N matrix is never formed);
        idx: (B, K'max) kept positions (indices into the current S, ascending);
        valid: (B, K'max) bool, False on padding (clips with K' < K'max).
    """
    bt, _, n, _ = q.shape
    b, s = bt // num_frames, n - 1
    if sampler.ats_keep_all:  # sample nothing away: the exact reference path
        idx = torch.arange(s, device=q.device).expand(b, s)  # (B, S)
        valid = torch.ones_like(idx, dtype=torch.bool) if pos_mask is None else pos_mask  # (B, S)
    else:
        n_live = (torch.full((b,), s, device=q.device) if pos_mask is None else pos_mask.sum(dim=1)) + 1  # (B,)
        idx, valid = sample_clip_positions(q[:, :, 0], k, v, num_frames=num_frames, pos_mask=pos_mask,
                                           budget=sampler.k_per_sample(n_live), scale=scale)
    rows = with_class_token(idx).repeat_interleave(num_frames, dim=0)  # (B*T, 1+K'max) same rows per frame
    q_rows = gather_rows(q, rows)  # (B*T, H, 1+K'max, Dh) queries of the kept rows only
    out = masked_sdpa(q_rows, k, v, frame_key_mask(pos_mask, num_frames), dropout_p)  # (B*T, H, 1+K'max, Dh)
    return out, idx, valid


def configure_ats(model: nn.Module, k: int | Sequence[int | None] | None, ratio: float | Sequence[float | None] | None,
                  floor: int) -> None:
    """Apply the constructor's ``ats_k`` / ``ats_ratio`` / ``ats_floor`` to every ATS block (validated)."""
    if ats_stages(model):
        set_ats_k(model, k, ratio, floor=floor)
    elif k is not None or ratio is not None:
        raise ValueError(f"ats_k={k!r} / ats_ratio={ratio!r} given but the model has no ATS stage (ats_stages=())")


def check_ats_stages(stages: Sequence[int], depth: int) -> list[int]:
    stages = list(stages)
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < depth:
            raise ValueError(f"ATS stage {s!r} is not a block index in [0, {depth - 1}] (stages count from 0)")
    if len(set(stages)) != len(stages):
        raise ValueError(f"ATS stages repeat: {stages}")
    return sorted(stages)


# --------------------------------------------------------------------------------------- checkpoints


def vit_pos_embed_to_grid(posemb: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a ViT position embedding ``(1, 1 + g*g, D)`` to ``(1, 1 + gh*gw, D)``, bicubic (class row kept)."""
    return resample_abs_pos_embed(posemb, list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=True)


def fill_from_model(out: dict[str, Tensor], model: nn.Module, keys: Sequence[str]) -> None:
    """Take ``keys`` from the model's own (freshly initialised) state: parts a ViT checkpoint cannot provide."""
    own = model.state_dict()
    for key in keys:
        out[key] = own[key].detach().clone()


# --------------------------------------------------------------------------- variant construction


def create_video_vit(model_cls: type[nn.Module], variant: str, cfgs: Mapping[str, dict[str, Any]],
                     video_meta: Mapping[str, dict[str, Any]], **kwargs: Any) -> nn.Module:
    """Build a TimeSformer / XViT variant: defaults from its cfg, then the video facts (frame stride,
    the papers' 1 x 3 test views, frames, classes) added to ``pretrained_cfg``."""
    cfg = cfgs[variant]
    _, t, h, _ = cfg["input_size"]
    kwargs.setdefault("num_frames", t)
    kwargs.setdefault("img_size", h)
    kwargs.setdefault("num_classes", cfg["num_classes"])
    kwargs.pop("global_pool", None)
    model = build_video_model(model_cls, variant, cfg, **kwargs)
    meta = video_meta[variant.removesuffix("_ats")]
    model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **meta, "test_views": (1, 3),
                                                "num_frames": model.num_frames, "num_classes": model.num_classes}
    return model


def vit_b_kwargs(**kwargs: Any) -> dict[str, Any]:
    """ViT-B/16 geometry (both video transformers start from an ImageNet ViT-B/16)."""
    return {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs}


def with_paper_ats_stages(kwargs: dict[str, Any], stages: Sequence[int]) -> dict[str, Any]:
    """The paper's ATS stages; a reduced-depth (test) model keeps those that exist; explicit ats_stages win."""
    return {"ats_stages": tuple(s for s in stages if s < kwargs.get("depth", 12)), **kwargs}
