"""Pieces shared by Glimpse's video ViTs (:mod:`models.timesformer`, :mod:`models.xvit`).

* input and geometry validation for ``(B, C, T, H, W)`` clips, and the timm plumbing both models share;
* multi-head self-attention with timm ViT's parameter names (``qkv``, ``proj``) on
  :func:`models.attention.masked_attention` (fused SDPA or the manual softmax, timm's ``fused_attn``
  switch), with an optional key-padding mask;
* the token state that flows through the blocks once ATS has dropped spatial positions, and the block
  loop that emits one :class:`models.trace.KeptTokens` per ATS stage while a trace is recorded;
* ATS across time (Fayyaz et al., ECCV 2022, ATS eqs. 3-6, applied per frame and shared by the clip);
* helpers that inflate an ImageNet ViT state dict (timm format) into a video model, and the variant
  builder.

Token layout used by both families: a clip has ``T`` frames of ``S = (H / p) * (W / p)`` patches. Patch
tokens are kept as ``(B, S, T, D)`` (TimeSformer) or ``(B, T, 1 + S, D)`` (XViT, one class token per
frame); frame-level attention always runs on ``(B * T, 1 + S, D)`` sequences whose first row is a class
token, frames of one clip contiguous (row ``b * T + t``).

ATS across time (the ATS paper does not say how to sample video tokens; this is Glimpse's decision):
    Both TimeSformer (divided space-time attention) and XViT (space-time mixing) need the SAME spatial
    positions in every frame: TimeSformer's temporal attention attends along one position's tube, and
    XViT's key/value mixing takes channels from the same position in frames ``t - 1`` and ``t + 1``.
    So ATS samples spatial positions ONCE PER CLIP and every frame keeps them:

    1. per frame ``t`` the class token's attention row gives ATS eq. 3 scores over the ``S`` positions
       (normalised to sum 1 in that frame);
    2. the clip's score of a position is the mean of its per-frame scores (each frame votes with equal
       weight; the mean still sums to 1, so it is a distribution for ATS eqs. 4-5);
    3. inverse transform sampling (ATS eqs. 4-5) picks ``K' <= K`` positions per clip;
    4. ATS eq. 6 computes the kept rows ``O = A^s V`` in every frame (``T * (K' + 1)`` query rows instead
       of ``T * (S + 1)``); the FFN and every later block run on the kept positions only.

    ``K`` therefore counts spatial positions (each carries ``T`` tokens) and is resolved per clip from
    its own live positions + 1, exactly as :func:`models.ats.resolve_k` counts one image's tokens (one
    frame's sequence): a count, or ``max(floor(ratio * N), floor)``, or by default all positions. The
    class token(s) are always kept. Clips of a batch keep different ``K'``; the batch is trimmed to the
    largest and the padded positions are masked: keys excluded from every later softmax, tokens held at
    zero (:func:`models.attention.zero_padding`), never pooled (both models pool class tokens only).
    With ``ats_mode="static"`` (:mod:`models.ats`) a stage keeps exactly K position slots per clip
    instead, repeated picks masked like padding: no host sync, the same logits. Inside :func:`models.trace.record` every ATS stage emits its kept positions (patch cells of the
    frame grid, shared by all frames) as a :class:`models.trace.KeptTokens` with ``num_frames = T``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from timm.layers import (
    PatchEmbed,
    register_notrace_function,
    resample_abs_pos_embed,
    trunc_normal_,
    use_fused_attn,
)
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.ats import (
    DEFAULT_K_FLOOR,
    ATSSamplingMixin,
    ats_significance,
    ats_stages,
    check_ats_mode,
    class_attention,
    inverse_transform_sample,
    set_ats_k,
    set_ats_mode,
    with_class_token,
)
from models.attention import masked_attention
from models.registry import build_video_model
from models.trace import KeptTokens, emit, recording
from models.weight_init import init_linear_and_norm_

__all__ = [
    "check_video_input", "check_video_geometry", "FrameAttention", "TokenState", "initial_state", "with_class_live",
    "frame_key_mask", "gather_kept", "gather_positions", "sample_clip_positions", "ats_clip_attention",
    "configure_ats", "forward_video_blocks", "VideoATSMixin", "VideoViTMixin", "vit_pos_embed_to_grid", "resize_pos_embed",
    "is_video_checkpoint", "fill_from_model", "create_video_vit",
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


def check_video_geometry(img_size: int | tuple[int, int], patch_size: int, num_frames: int) -> tuple[int, int]:
    """``img_size`` as (H, W), after refusing a frame count below 1 or a size that is not a multiple of
    ``patch_size`` (naming the value)."""
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if img_size[0] % patch_size or img_size[1] % patch_size:
        raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
    return img_size


# -------------------------------------------------------------------------------------------- attention


class FrameAttention(nn.Module):
    """Multi-head self-attention with timm ViT's parameter names (``qkv``, ``proj``).

    ``qkv_heads``, ``attend`` and ``merge_heads`` are exposed so that the blocks can run their own attention
    pattern (XViT's key/value mixing, ATS's class row + kept rows) with the same weights. ``fused_attn``
    (timm's switch, from ``timm.layers.use_fused_attn()`` at build time) picks fused SDPA or the manual
    softmax (:func:`models.attention.masked_attention`).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, N, D) -> q, k, v, each (B, H, N, Dh)."""
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        return qkv[0], qkv[1], qkv[2]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, static: bool = False) -> Tensor:
        """q (B, H, Lq, Dh), k / v (B, H, Lk, Dh), key_mask (B, Lk) or None -> (B, H, Lq, Dh); ``static``:
        the mask is applied without a host-side check (:mod:`models.attention`)."""
        return masked_attention(q, k, v, key_mask, scale=self.scale, fused=self.fused_attn,
                                dropout_p=self.dropout_p, static=static)  # (B, H, Lq, Dh)

    def merge_heads(self, o: Tensor) -> Tensor:
        """(B, H, N, Dh) -> output projection -> (B, N, D)."""
        b, _, n, _ = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, -1)))

    @property
    def dropout_p(self) -> float:
        return self.attn_drop if self.training else 0.0

    def forward(self, x: Tensor, key_mask: Tensor | None = None, static: bool = False) -> Tensor:
        q, k, v = self.qkv_heads(x)  # (B, H, N, Dh) each
        return self.merge_heads(self.attend(q, k, v, key_mask, static))  # (B, N, D)


# ----------------------------------------------------------------------------------------- token state


class TokenState(NamedTuple):
    """What the blocks pass along besides the tokens once ATS may have dropped spatial positions.

    mask: (B, S') bool, True = live position; None while no position was dropped (no padding anywhere).
    positions: (B, S') long, each current position's index in the ORIGINAL patch grid (row-major over
        ``(H / p, W / p)``); padded slots hold meaningless indices: read them with ``mask``.
    static: True once an ATS stage ran static shapes: every later masked step applies ``mask`` without a
        host-side check (:mod:`models.attention`).
    """

    mask: Tensor | None
    positions: Tensor
    static: bool = False


def initial_state(batch: int, num_positions: int, device: torch.device) -> TokenState:
    positions = torch.arange(num_positions, device=device).unsqueeze(0).expand(batch, -1)  # (B, S)
    return TokenState(mask=None, positions=positions)


def with_class_live(pos_mask: Tensor | None) -> Tensor | None:
    """A frame's token mask ``(B, 1 + S)`` from its position mask ``(B, S)``: the class token is always live."""
    if pos_mask is None:
        return None
    return torch.cat([torch.ones_like(pos_mask[:, :1]), pos_mask], dim=1)  # (B, 1+S)


def frame_key_mask(pos_mask: Tensor | None, num_frames: int) -> Tensor | None:
    """Per-frame key mask ``(B * T, 1 + S)`` from a clip's position mask ``(B, S)`` (class token live)."""
    if pos_mask is None:
        return None
    return with_class_live(pos_mask).repeat_interleave(num_frames, dim=0)  # (B*T, 1+S)


@register_notrace_function
def gather_positions(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Select positions ``idx`` (B, K) along ``dim`` of ``x`` (B, ...): data-dependent, kept out of FX tracing."""
    shape = [1] * x.ndim
    shape[0], shape[dim] = idx.shape
    index = idx.reshape(shape).expand(*[x.shape[i] if i != dim else idx.shape[1] for i in range(x.ndim)])
    return torch.gather(x, dim, index)


@register_notrace_function
def gather_kept(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """:func:`gather_positions` for a stage's kept positions: ``x`` itself, no copy, when ``idx`` covers the
    whole ``dim`` (the in-place layout of :func:`models.ats.inverse_transform_sample`: then it is 0..n-1)."""
    if idx.shape[1] == x.shape[dim]:
        return x
    return gather_positions(x, idx, dim)


# ------------------------------------------------------------------------------------------------ ATS


def sample_clip_positions(q_cls: Tensor, k: Tensor, v: Tensor, *, num_frames: int, pos_mask: Tensor | None,
                          budget: Tensor, scale: float, slots: int | None = None) -> tuple[Tensor, Tensor]:
    """Steps 1-3 of the module docstring: ATS eq. 3 per frame, mean over the clip's frames, ATS eqs. 4-5.

    q_cls (B*T, H, Dh) the frames' class-token queries; k, v (B*T, H, 1+S, Dh); pos_mask (B, S) or None;
    budget (B,) K per clip; slots: static mode's slot count (None: dynamic). Returns idx (B, K'max) kept
    positions (ascending) and valid (B, K'max) (:func:`models.ats.inverse_transform_sample`).
    Runs without gradient: the selection is discrete (as in the paper and :mod:`models.ats`).
    """
    with torch.no_grad():
        key_mask = frame_key_mask(pos_mask, num_frames)  # (B*T, 1+S) or None
        cls_attn = class_attention(q_cls, k, scale, key_mask)  # (B*T, H, 1+S) row 1 of A, by hand
        frame_scores = ats_significance(cls_attn, v, key_mask)  # (B*T, S) ATS eq. 3, each row sums to 1
        b, s = budget.shape[0], frame_scores.shape[1]
        clip_scores = frame_scores.view(b, num_frames, s).mean(dim=1)  # (B, S) every frame votes equally
        return inverse_transform_sample(clip_scores, budget, pos_mask, slots)  # (B, K'max) each


def ats_clip_attention(q: Tensor, k: Tensor, v: Tensor, attn: FrameAttention, *, num_frames: int,
                       pos_mask: Tensor | None, sampler: ATSSamplingMixin, static: bool = False
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """ATS on frame-level attention with positions shared by the clip (module docstring, steps 1-4).

    Args:
        q, k, v: (B*T, H, 1 + S, Dh) per-frame queries / keys / values, row 0 the frame's class token
            (for XViT ``k`` / ``v`` are the time-mixed ones its attention really uses).
        attn: the block's attention (scale, ``fused_attn``, dropout).
        num_frames: T.
        pos_mask: (B, S) live positions, or None (all live).
        sampler: the block's K settings (:class:`models.ats.ATSSamplingMixin`): K is resolved per clip
            from its own live positions + 1 (one frame's sequence, as ``resolve_k`` counts an image's).

    Returns:
        out: (B*T, H, 1 + K'max, Dh) ATS eq. 6 ``O = A^s V`` for the class row and the kept positions of
            every frame, over all live keys (the N x N matrix is never formed);
        idx: (B, K'max) kept positions (indices into the current S, ascending);
        valid: (B, K'max) bool, False on padding (clips with K' < K'max).
        With ``static`` (static mode, :mod:`models.ats`) K'max is the stage's K (repeats invalid); when it
        reaches S the positions stay in place (``idx`` = 0..S-1) and no row is gathered.
    """
    bt, _, n, _ = q.shape
    b, s = bt // num_frames, n - 1
    if sampler.ats_keep_all:  # sample nothing away: the exact reference path
        idx = torch.arange(s, device=q.device).expand(b, s)  # (B, S)
        valid = torch.ones_like(idx, dtype=torch.bool) if pos_mask is None else pos_mask  # (B, S)
    else:
        n_live = (torch.full((b,), s, device=q.device) if pos_mask is None else pos_mask.sum(dim=1)) + 1  # (B,)
        idx, valid = sample_clip_positions(q[:, :, 0], k, v, num_frames=num_frames, pos_mask=pos_mask,
                                           budget=sampler.k_per_sample(n_live, static), scale=attn.scale,
                                           slots=sampler.static_slots(n) if static else None)
    rows = with_class_token(idx).repeat_interleave(num_frames, dim=0)  # (B*T, 1+K'max) same rows per frame
    q_rows = gather_kept(q, rows, dim=2)  # (B*T, H, 1+K'max, Dh) queries of the kept rows only
    out = attn.attend(q_rows, k, v, frame_key_mask(pos_mask, num_frames), static)  # (B*T, H, 1+K'max, Dh)
    return out, idx, valid


def configure_ats(model: nn.Module, k: int | Sequence[int | None] | None, ratio: float | Sequence[float | None] | None,
                  floor: int, mode: str = "dynamic") -> None:
    """Apply the constructor's ``ats_k`` / ``ats_ratio`` / ``ats_floor`` / ``ats_mode`` to every ATS block
    (validated)."""
    check_ats_mode(mode)
    if ats_stages(model):
        set_ats_k(model, k, ratio, floor=floor)
        set_ats_mode(model, mode)
    elif k is not None or ratio is not None:
        raise ValueError(f"ats_k={k!r} / ats_ratio={ratio!r} given but the model has no ATS stage (ats_stages=())")


def forward_video_blocks(blocks: Iterable[nn.Module], x: Tensor, state: TokenState, *, checkpointing: bool,
                         grid: tuple[int, int], num_frames: int) -> tuple[Tensor, TokenState]:
    """Run the blocks (``block(x, state) -> (x, state)``), recomputing activations in the backward pass
    with ``checkpointing``; while a trace is recorded, each ATS block emits its kept positions over the
    frame ``grid`` (rows, cols) as a :class:`models.trace.KeptTokens` shared by the ``num_frames`` frames."""
    traced = recording()
    for blk in blocks:
        if checkpointing and torch.is_grad_enabled():
            x, state = checkpoint(blk, x, state, use_reentrant=False)
        else:
            x, state = blk(x, state)
        if traced and isinstance(blk, ATSSamplingMixin):
            valid = torch.ones_like(state.positions, dtype=torch.bool) if state.mask is None else state.mask
            emit(KeptTokens(blk.stage, state.positions, valid, grid=grid, num_frames=num_frames))
    return x, state


class VideoATSMixin(ATSSamplingMixin):
    """Mixed in before a video block class: the block's arguments plus ``ats_k`` / ``ats_ratio`` /
    ``ats_floor`` (K per clip, an inference-time knob: :func:`models.ats.set_ats_k`) and ``ats_mode``
    (:func:`models.ats.set_ats_mode`)."""

    def __init__(self, *args: Any, ats_k: int | None = None, ats_ratio: float | None = None,
                 ats_floor: int = DEFAULT_K_FLOOR, ats_mode: str = "dynamic", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.set_k(ats_k, ats_ratio, floor=ats_floor)
        self.set_mode(ats_mode)

    def static_state(self, x: Tensor, state: TokenState) -> bool:
        """Whether this forward runs static shapes: an earlier stage did, or this one does."""
        return state.static or self.is_static(x)


class VideoViTMixin:
    """timm plumbing shared by TimeSformer and XViT (same embeddings' names, same block list, one head)."""

    grad_checkpointing: bool
    cls_token: nn.Parameter
    head: nn.Module
    num_classes: int
    num_features: int

    def init_geometry(self, img_size: int | tuple[int, int], patch_size: int, in_chans: int, num_frames: int,
                      embed_dim: int, num_classes: int) -> None:
        """Validate and keep the clip geometry and widths, and build the per-frame ``patch_embed`` (timm's)."""
        self.img_size = check_video_geometry(img_size, patch_size, num_frames)
        self.num_classes, self.num_frames, self.in_chans = num_classes, num_frames, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(self.img_size, patch_size, in_chans, embed_dim)
        self.grid_size = self.patch_embed.grid_size

    def frames(self, x: Tensor) -> Tensor:
        """A checked clip (B, C, T, H, W) -> its frames (B*T, C, H, W), frames of a clip contiguous."""
        check_video_input(x, in_chans=self.in_chans, num_frames=self.num_frames, img_size=self.img_size,
                          model=type(self).__name__)
        b, c, t, h, w = x.shape
        return x.transpose(1, 2).reshape(b * t, c, h, w)  # (B*T, C, H, W)

    def init_vit_weights(self) -> None:
        """timm ViT's init: position embedding and class token trunc-normal(0.02), then every linear / norm."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        init_linear_and_norm_(self)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}  # where the model lives (meta too)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (memory for long clips)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for timm's layer-wise LR decay: embeddings, then one group per block."""
        return {"stem": r"^cls_token|^pos_embed|^time_embed|^patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def get_classifier(self) -> nn.Module:
        return self.head


# --------------------------------------------------------------------------------------- checkpoints


def vit_pos_embed_to_grid(posemb: Tensor, grid: tuple[int, int]) -> Tensor:
    """Resize a ViT position embedding ``(1, 1 + g*g, D)`` to ``(1, 1 + gh*gw, D)``, bicubic (class row kept)."""
    return resample_abs_pos_embed(posemb, list(grid), num_prefix_tokens=1, interpolation="bicubic", antialias=True)


def resize_pos_embed(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A copy of ``state_dict`` whose ``pos_embed`` is resized to the model's patch grid when it differs."""
    out = dict(state_dict)
    if "pos_embed" in out and out["pos_embed"].shape != model.pos_embed.shape:
        out["pos_embed"] = vit_pos_embed_to_grid(out["pos_embed"], model.grid_size)
    return out


def is_video_checkpoint(state_dict: Mapping[str, Tensor], video_prefix: str) -> bool:
    """True for a video model's own state dict (it has ``time_embed`` or keys under ``video_prefix``)."""
    return "time_embed" in state_dict or any(video_prefix in k for k in state_dict)


def fill_from_model(out: dict[str, Tensor], model: nn.Module, keys: Sequence[str]) -> None:
    """Take ``keys`` from the model's own (freshly initialised) state: parts a ViT checkpoint cannot provide."""
    own = model.state_dict()
    for key in keys:
        out[key] = own[key].detach().clone()


# --------------------------------------------------------------------------- variant construction


def create_video_vit(model_cls: type[nn.Module], cfg: Mapping[str, Any], paper_ats_stages: Sequence[int] = (),
                     **kwargs: Any) -> nn.Module:
    """Build a TimeSformer / XViT variant: ViT-B/16 geometry (both start from an ImageNet ViT-B/16), the
    cfg's frames, frame size and classes, then the caller's kwargs. ATS variants get ``paper_ats_stages``
    (those a reduced-depth model has) unless ``ats_stages`` is given."""
    _, t, h, _ = cfg["input_size"]
    args = {"patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12, "num_frames": t, "img_size": h,
            "num_classes": cfg["num_classes"], **kwargs}
    if paper_ats_stages:
        args.setdefault("ats_stages", tuple(s for s in paper_ats_stages if s < args["depth"]))
    args.pop("global_pool", None)  # both pool class tokens; timm's factory may pass global_pool
    return build_video_model(model_cls, **args)
