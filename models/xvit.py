"""X-ViT: space-time mixing attention (Bulat, Perez-Rua, Sudhakaran, Martinez, Tzimiropoulos, NeurIPS 2021,
"Space-time Mixing Attention for Video Transformer"), with ATS (Fayyaz et al., ECCV 2022) in blocks 3-11.

Every frame is a ViT sequence of its own (class token + S patches). In every layer the query of token
``(s, t)`` attends only to the S + 1 tokens of frame ``t`` (cost O(T S^2), as a spatial-only model), but
the keys and values it attends to are MIXED over a local temporal window ``t_w = 1`` (paper section 3,
"space-time mixing"): of each head's ``d_h`` channels, the first ``d_h / shift_div`` come from frame
``t - 1``, the last ``d_h / shift_div`` from frame ``t + 1`` and the rest from frame ``t``:

    k~_{s', t} = [k_{s', t-1}(d_h^{t-1}), k_{s', t}(d_h^{t}), k_{s', t+1}(d_h^{t+1})],   same for v~
    y_{s, t}   = sum_{s'} softmax(q_{s, t} . k~_{s', t} / sqrt(d_h)) v~_{s', t}

(zero outside the clip). Stacking L layers covers a temporal window of ``+-L`` frames at no extra
cost. At the end, a light temporal attention aggregation (TA, section 3) runs ONE transformer layer
over the T frame class tokens plus a learned class token, followed by the MLP head.

Decisions over the paper / the official release (github.com/1adrianb/video-transformers):

* The mixing splits each head's channels, as the paper writes ``k~`` per head. The release shifts
  whole blocks of the flattened ``H * d_h`` channels (``n_div = 8``: the first 1/8 of all channels
  from t+1, the next 1/8 from t-1), which moves whole heads. ``shift_div = 8`` keeps the release's
  amount of mixing (1/8 of the channels from each neighbour); ``shift_div=0`` disables mixing
  (the paper's spatial-only baseline).
* ``time_embed`` (the paper's ``p_t``) is added to every token, class tokens included, and starts at
  zero; the TA layer and the MLP head start at a random init, as in the release.

ATS (ATS paper, appendix E.4: "stages 3 to 11", counted from 0): per-frame class rows score the
positions with the mixed values ``v~`` the attention actually uses; positions are sampled once per clip
and shared by all frames, so ``k~`` / ``v~`` still mix the same position across neighbouring frames
(see :mod:`models.video_vit_common`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, calculate_drop_path_rates
from torch import Tensor

from models.ats import DEFAULT_K_FLOOR, check_ats_stages, with_class_token
from models.attention import zero_padding
from models.registry import register_glimpse
from models.video_vit_common import (
    FrameAttention,
    TokenState,
    VideoATSMixin,
    VideoViTMixin,
    ats_clip_attention,
    configure_ats,
    create_video_vit,
    fill_from_model,
    forward_video_blocks,
    frame_key_mask,
    gather_kept,
    initial_state,
    is_video_checkpoint,
    resize_pos_embed,
    with_class_live,
)

__all__ = ["XViT", "MixingAttention", "XViTBlock", "ATSXViTBlock", "TemporalAttentionAggregation",
           "mix_time", "checkpoint_filter_fn", "analytic_flops"]


# ---------------------------------------------------------------------------------------------- helpers


def mix_time(x: Tensor, num_frames: int, fold: int) -> Tensor:
    """Space-time mixing of keys or values (paper section 3, ``k~``): per head, channels ``[0, fold)``
    from frame t-1, ``[d_h - fold, d_h)`` from frame t+1, the rest from frame t; zero outside the clip.

    x (B*T, H, N, Dh), frames of a clip contiguous -> (B*T, H, N, Dh). ``fold = 0`` returns x.
    """
    if fold == 0:
        return x
    bt, h, n, dh = x.shape
    x5 = x.view(bt // num_frames, num_frames, h, n, dh)  # (B, T, H, N, Dh)
    zeros = x5.new_zeros(x5.shape[0], 1, h, n, fold)  # (B, 1, H, N, fold): nothing before / after the clip
    past = torch.cat([zeros, x5[:, :-1, ..., :fold]], dim=1)  # (B, T, H, N, fold) frame t takes t-1
    future = torch.cat([x5[:, 1:, ..., dh - fold:], zeros], dim=1)  # (B, T, H, N, fold) frame t takes t+1
    return torch.cat([past, x5[..., fold:dh - fold], future], dim=-1).view(bt, h, n, dh)  # (B*T, H, N, Dh)


class MixingAttention(FrameAttention):
    """Frame attention whose keys and values are mixed over ``t-1, t, t+1`` (same parameters as ViT)."""

    def __init__(self, dim: int, num_heads: int, num_frames: int, shift_div: int = 8,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.num_frames = num_frames
        self.fold = 0 if not shift_div else self.head_dim // shift_div
        if shift_div and not 1 <= self.fold <= self.head_dim // 2:
            raise ValueError(f"shift_div={shift_div} leaves {self.fold} mixed channels per neighbour of a "
                             f"{self.head_dim}-channel head; need 2 <= shift_div <= {self.head_dim}")

    def mixed_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B*T, N, D) -> q, k~, v~ each (B*T, H, N, Dh)."""
        q, k, v = self.qkv_heads(x)  # (B*T, H, N, Dh) each
        return q, mix_time(k, self.num_frames, self.fold), mix_time(v, self.num_frames, self.fold)

    def forward(self, x: Tensor, key_mask: Tensor | None = None, static: bool = False) -> Tensor:
        q, k, v = self.mixed_qkv(x)  # (B*T, H, N, Dh) each
        return self.merge_heads(self.attend(q, k, v, key_mask, static))  # (B*T, N, D)


# ----------------------------------------------------------------------------------------------- blocks


class XViTBlock(nn.Module):
    """Pre-norm ViT block with space-time mixing attention; timm ViT parameter names.

    ``forward(x (B, T, 1+S, D), state) -> (x, state)``; padded positions (after ATS) stay zero.
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, shift_div: int = 8, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, stage: int = 0) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.stage = stage
        self.norm1 = norm_layer(dim)
        self.attn = MixingAttention(dim, num_heads, num_frames, shift_div, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def _mlp(self, x: Tensor, pos_mask: Tensor | None, static: bool = False) -> Tensor:
        """Residual MLP on (B, T, 1+S, D); padded positions held at zero."""
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return zero_padding(x, with_class_live(pos_mask), static)  # (B, T, 1+S, D), same positions in every frame

    def forward(self, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        b, t, n, d = x.shape
        res = self.attn(self.norm1(x.reshape(b * t, n, d)), frame_key_mask(state.mask, t),
                        state.static)  # (B*T, 1+S, D)
        x = x + self.drop_path(res.view(b, t, n, d))  # (B, T, 1+S, D)
        return self._mlp(x, state.mask, state.static), state


class ATSXViTBlock(VideoATSMixin, XViTBlock):
    """XViT block with ATS: positions scored per frame (class row, mixed values), sampled once per clip,
    class + kept rows computed in every frame (ATS eq. 6); the MLP and all later blocks see 1 + K'max tokens
    per frame. Same parameters as :class:`XViTBlock`; K is an inference-time knob (``set_ats_k``).
    """

    def forward(self, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        b, t, n, d = x.shape
        q, k, v = self.attn.mixed_qkv(self.norm1(x.reshape(b * t, n, d)))  # (B*T, H, 1+S, Dh) each
        static = self.static_state(x, state)
        out, idx, valid = ats_clip_attention(q, k, v, self.attn, num_frames=t, pos_mask=state.mask, sampler=self,
                                             static=static)
        res = self.attn.merge_heads(out)  # (B*T, 1+K'max, D)
        # (in place, nothing gathered, when every position is kept: keep_all, K = S)
        x = gather_kept(x, with_class_token(idx), dim=2)  # (B, T, 1+K'max, D) class + kept rows
        positions = gather_kept(state.positions, idx, dim=1)  # (B, K'max) original grid indices
        x = x + self.drop_path(res.view(b, t, -1, d))  # (B, T, 1+K'max, D)
        mask = state.mask if self.ats_keep_all else valid  # keep_all: the same (or no) padding
        return self._mlp(x, mask, static), TokenState(mask, positions, static)


class _TABlock(nn.Module):
    """Plain pre-norm transformer layer of the temporal aggregation (release: qkv without bias)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FrameAttention(dim, num_heads, qkv_bias=False, proj_drop=drop)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TemporalAttentionAggregation(nn.Module):
    """TA (paper section 3, "temporal attention aggregation"): a learned class token attends to the T
    frame class tokens through ``depth`` (paper: 1) transformer layers; returns the class token (B, D)."""

    def __init__(self, dim: int, num_heads: int, depth: int = 1, mlp_ratio: float = 4.0, drop: float = 0.0) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[_TABlock(dim, num_heads, mlp_ratio, drop) for _ in range(depth)])

    def forward(self, frames: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(frames.shape[0], -1, -1), frames], dim=1)  # (B, 1+T, D)
        return self.blocks(x)[:, 0]  # (B, D)


# ------------------------------------------------------------------------------------------------ model


class XViT(VideoViTMixin, nn.Module):
    """X-ViT with space-time mixing attention and temporal attention aggregation; timm's model contract.

    Input (B, in_chans, num_frames, img_size, img_size). ``forward_features`` returns the normalised
    tokens (B, T * (1 + S'), D), frame-major (each frame's class token first; with ATS ``S'`` is the
    largest kept count in the batch, padded tokens zero); ``forward_head`` aggregates the T frame class
    tokens with TA and classifies (``pre_logits`` = the MLP head's hidden layer, ``num_features`` wide).

    ATS: ``ats_stages`` (block indices), ``ats_k`` (positions per clip) or ``ats_ratio``, and ``ats_mode``,
    as TimeSformer.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 400, num_frames: int = 8, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, shift_div: int = 8,
                 temporal_depth: int = 1, drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, ats_stages: Sequence[int] = (),
                 ats_k: int | Sequence[int | None] | None = None,
                 ats_ratio: float | Sequence[float | None] | None = None, ats_floor: int = DEFAULT_K_FLOOR,
                 ats_mode: str = "dynamic") -> None:
        super().__init__()
        ats_stages = check_ats_stages(ats_stages, depth)
        self.init_geometry(img_size, patch_size, in_chans, num_frames, embed_dim, num_classes)  # patch_embed too
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # timm ViT's LayerNorm
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # on the CPU: the model may be built on meta
        blocks = []
        for i in range(depth):
            kw = dict(dim=embed_dim, num_heads=num_heads, num_frames=num_frames, shift_div=shift_div,
                      mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                      drop_path=dpr[i], norm_layer=norm_layer, stage=i)
            blocks.append(ATSXViTBlock(**kw) if i in ats_stages else XViTBlock(**kw))
        self.blocks = nn.ModuleList(blocks)
        configure_ats(self, ats_k, ats_ratio, ats_floor, ats_mode)
        self.norm = norm_layer(embed_dim)

        # Head (release's VitHead): dropout on frame features, TA, LayerNorm -> Linear -> GELU -> dropout -> Linear.
        self.frame_drop = nn.Dropout(drop_rate)
        self.temporal_head = TemporalAttentionAggregation(embed_dim, num_heads, temporal_depth, mlp_ratio)
        self.fc_norm = nn.LayerNorm(embed_dim)
        self.head_hidden = nn.Linear(embed_dim, embed_dim)
        self.head_act = nn.GELU()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        self.init_vit_weights()

    # timm contract (set_grad_checkpointing, group_matcher, get_classifier, reset_classifier, forward:
    # VideoViTMixin) ---------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "time_embed", "temporal_head.cls_token"}

    def forward_features(self, x: Tensor) -> Tensor:
        b, _, t = x.shape[:3]
        tok = self.patch_embed(self.frames(x))  # (B*T, S, D)
        cls = self.cls_token.expand(b * t, -1, -1)  # (B*T, 1, D): one class token per frame
        tok = torch.cat([cls, tok], dim=1) + self.pos_embed  # (B*T, 1+S, D) + space pos (p_s)
        n, d = tok.shape[1], tok.shape[2]
        x = self.pos_drop(tok.view(b, t, n, d) + self.time_embed)  # (B, T, 1+S, D) + time pos (p_t)
        x, state = forward_video_blocks(self.blocks, x, initial_state(b, n - 1, x.device), num_frames=t,
                                        checkpointing=self.grad_checkpointing, grid=self.grid_size)
        x = zero_padding(self.norm(x), with_class_live(state.mask), static=True)  # (B, T, 1+S', D), padding zero
        return x.reshape(b, -1, d)  # (B, T*(1+S'), D)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        b, _, d = x.shape
        frames = self.frame_drop(x.view(b, self.num_frames, -1, d)[:, :, 0])  # (B, T, D) frame class tokens
        z = self.head_act(self.head_hidden(self.fc_norm(self.temporal_head(frames))))  # (B, D)
        return z if pre_logits else self.head(self.head_drop(z))


# ------------------------------------------------------------------------------------------- checkpoint

_HEAD_PREFIXES = ("temporal_head.", "fc_norm.", "head_hidden.", "head.")  # the classifier "head." last


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: XViT) -> dict[str, Tensor]:
    """Adapt a timm-format ImageNet ViT state dict (or an XViT one) to ``model``.

    ViT -> XViT, as the paper and release initialise it: the mixing has no parameters, so every
    backbone weight (``patch_embed``, ``cls_token``, blocks, ``norm``) is the ViT's own; ``pos_embed`` is
    resized bicubically to the model's patch grid; ``time_embed`` starts at zero. The ViT's classifier
    reads its class token and has no counterpart here (X-ViT's ``head`` follows the temporal aggregation
    and a hidden layer), so it is dropped, and the aggregation, ``fc_norm`` and ``head_hidden`` keep the
    model's fresh init (the release replaces the head likewise); the classifier ``head`` is then the
    loader's matter (``load_checkpoint(classifier="reset")`` leaves it at its initialisation). An XViT
    checkpoint passes through. Keys the model lacks (e.g. ``dist_token``) are left for strict loading to
    name.
    """
    out = resize_pos_embed(state_dict, model)
    if not is_video_checkpoint(out, "temporal_head."):
        out = {k: v for k, v in out.items() if not k.startswith(_HEAD_PREFIXES)}
        out["time_embed"] = torch.zeros_like(model.time_embed)
        fill_from_model(out, model, [k for k in model.state_dict() if k.startswith(_HEAD_PREFIXES[:-1])])
    return out


# ---------------------------------------------------------------------------------------------- FLOPs


def analytic_flops(*, num_frames: int, img_size: int, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                   mlp_ratio: float = 4.0, num_classes: int = 400, in_chans: int = 3, temporal_depth: int = 1,
                   ats: Mapping[int, int] | None = None) -> float:
    """FLOPs of one XViT view, derived by hand (fvcore convention: 1 multiply-add = 1 FLOP; LayerNorm
    5 per element; softmax, GELU, additions and the channel mixing free), i.e. what
    :func:`models.flops.count_flops` must report. With n = S + 1 tokens per frame, T frames,
    M = mlp_ratio * D, per block and frame:

      LN 5nD + qkv 3nD^2 + attention 2n^2 D + proj nD^2 + LN 5nD + MLP 2nDM
    plus the patch embedding TS * C p^2 D and the final LN 5TnD; the temporal aggregation on T + 1
    tokens per layer: 2 * 5(T+1)D + 4(T+1)D^2 + 2(T+1)^2 D + 2(T+1)DM; the head LN 5D, hidden D^2 and
    classifier D * classes. (T x one ViT-B/16 frame + a small aggregation: the ATS paper's remark.)

    ``ats`` maps an ATS block to its K (positions per clip at the upper bound K' = K): that block adds
    the class rows T(S+1)D, value norms TSD, CDF S and search K ceil(log2 S), computes SDPA and the
    projection for 1 + K rows per frame, 2T(1+K)(1+S)D + T(1+K)D^2, and its MLP on 1 + K tokens per frame.
    """
    s = (img_size // patch_size) ** 2
    t, d = num_frames, embed_dim
    m = int(d * mlp_ratio)
    total = t * s * in_chans * patch_size ** 2 * d  # patch embedding
    for i in range(depth):
        n = s + 1
        total += t * (5 * n * d + 3 * n * d * d)  # LN + qkv on every token
        if ats is not None and i in ats:
            k = min(ats[i], s)
            total += t * n * d + t * s * d + s + k * max(1, math.ceil(math.log2(max(s, 2))))  # ATS scoring
            total += 2 * t * (1 + k) * n * d + t * (1 + k) * d * d  # class + kept rows (SDPA) + proj
            s = k
            n = s + 1
        else:
            total += t * (2 * n * n * d + n * d * d)  # attention + proj
        total += t * (5 * n * d + 2 * n * d * m)  # MLP
    total += 5 * t * (s + 1) * d  # final LN
    ta = t + 1
    total += temporal_depth * (10 * ta * d + 4 * ta * d * d + 2 * ta * ta * d + 2 * ta * d * m)
    return float(total + 5 * d + d * d + d * num_classes)


# -------------------------------------------------------------------------------------------- configs


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Video cfg: input_size is (C, T, H, W); mean/std 0.5 as in the release's Kinetics configs. Only timm
    # PretrainedCfg fields live here (timm's registry validates them); the data geometry is in data_cfgs.
    return {"num_classes": 400, "input_size": (3, 8, 224, 224), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
            "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": True, "first_conv": "patch_embed.proj",
            "classifier": "head", "paper_name": "Space-time Mixing Attention for Video Transformer",
            "paper_ids": "arXiv:2106.05968", **kwargs}


default_cfgs = {
    "xvit_8": _cfg(),
    "xvit_16": _cfg(input_size=(3, 16, 224, 224)),
}
for _name in list(default_cfgs):
    default_cfgs[_name + "_ats"] = {**default_cfgs[_name], "notes": ("ATS (Fayyaz et al., ECCV 2022) in blocks 3-11",)}

# Data geometry added to pretrained_cfg (models.registry): sampling_rate = frame stride (release: 16 frames
# x 16; 8 frames x 32 covers the same span); test_views = (temporal clips, spatial crops): the ATS paper's
# "1 x 3" views.
_STRIDES = {"xvit_8": 32, "xvit_16": 16}
data_cfgs = {name: {"sampling_rate": _STRIDES[name.removesuffix("_ats")], "test_views": (1, 3)}
             for name in default_cfgs}

# ATS paper, appendix E.4: "We integrate our ATS module into the stages 3 to 11 of the XViT".
ATS_STAGES = tuple(range(3, 12))


def _create(variant: str, **kwargs: Any) -> XViT:
    stages = ATS_STAGES if variant.endswith("_ats") else ()
    return create_video_vit(XViT, default_cfgs[variant], stages, **kwargs)


@register_glimpse
def xvit_8(pretrained: bool = False, **kwargs: Any) -> XViT:
    """X-ViT-B/16, 8 frames x 224^2: 142 GFLOPs per view (8 ViT-B frames + temporal aggregation)."""
    return _create("xvit_8", **kwargs)


@register_glimpse
def xvit_16(pretrained: bool = False, **kwargs: Any) -> XViT:
    """X-ViT-B/16, 16 frames x 224^2: 283 GFLOPs per view."""
    return _create("xvit_16", **kwargs)


@register_glimpse
def xvit_8_ats(pretrained: bool = False, **kwargs: Any) -> XViT:
    """X-ViT 8x224 with ATS in blocks 3-11 (K = all positions unless ``ats_k`` / ``ats_ratio``)."""
    return _create("xvit_8_ats", **kwargs)


@register_glimpse
def xvit_16_ats(pretrained: bool = False, **kwargs: Any) -> XViT:
    """X-ViT 16x224 with ATS in blocks 3-11."""
    return _create("xvit_16_ats", **kwargs)
