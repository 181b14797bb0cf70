"""TimeSformer: divided space-time attention (Bertasius, Wang, Torresani, ICML 2021, "Is Space-Time
Attention All You Need for Video Understanding?"), with ATS (Fayyaz et al., ECCV 2022) in blocks 3-5.

A clip (B, 3, T, H, W) is cut into S = (H/16)(W/16) patches per frame; the tokens are one class token
plus S * T patch tokens (order: position-major, ``(s, t)``). Every block is the paper's "divided
space-time attention (T+S)" (section 3, Fig. 1):

    temporal:  each patch attends to the same spatial position in all T frames   (B*S, T, D)
               -> temporal_fc, residual
    spatial:   each patch attends to the S patches of its frame + the class token (B*T, 1+S, D);
               the class token is repeated per frame and its T outputs are averaged
    MLP on all tokens.

Departures from / decisions over the official code (github.com/facebookresearch/TimeSformer):

* ``temporal_fc`` is zero-initialised in EVERY block. The release zero-inits blocks 1.. and leaves
  block 0's at a random init; with all zero the inflated model starts as the image ViT applied per
  frame with the class token averaged over frames, so for ``T = 1`` (or identical frames) it
  reproduces the ImageNet model's logits exactly (tested).
* The position embedding is resized bicubically in :func:`checkpoint_filter_fn` (the release resizes
  with nearest neighbour at run time), ``time_embed`` starts at zero as in the release.
* Stochastic depth drops a whole clip's residual (the release drops per spatial tube in the temporal
  branch).

ATS (ATS paper, appendix E.5: "stages 3 to 5", counted from 0 as the paper does for DeiT, where
"stages 3 to 11" are the last nine of twelve blocks): the sampler sits in the spatial attention, where
the class token attends; positions are sampled once per clip and shared by all frames so that the
temporal attention stays a regular (K' x T) tube grid. See :mod:`models.video_vit_common`.
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

from models.ats import DEFAULT_K_FLOOR, check_ats_stages
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
    forward_video_blocks,
    frame_key_mask,
    gather_kept,
    initial_state,
    is_video_checkpoint,
    resize_pos_embed,
    with_class_live,
)

__all__ = ["TimeSformer", "DividedBlock", "ATSDividedBlock", "checkpoint_filter_fn", "analytic_flops"]


# ----------------------------------------------------------------------------------------------- blocks


class DividedBlock(nn.Module):
    """One TimeSformer block: temporal attention, spatial attention, MLP (pre-norm, residual each).

    Parameter names follow the release (``temporal_norm1``, ``temporal_attn``, ``temporal_fc``) and
    timm's ViT block (``norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``), so a
    ViT checkpoint maps key for key. ``forward(x, state)`` with x (B, 1 + S*T, D).
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, stage: int = 0) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.stage = stage
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = FrameAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = FrameAttention(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)

    def _temporal(self, x: Tensor) -> Tensor:
        """Temporal attention along each position's tube; returns the updated patch tokens (B, S*T, D)."""
        b, n, d = x.shape
        t = self.num_frames
        s = (n - 1) // t
        tubes = x[:, 1:].reshape(b * s, t, d)  # (B*S, T, D): one sequence per spatial position
        res = self.temporal_fc(self.temporal_attn(self.temporal_norm1(tubes)))  # (B*S, T, D)
        return x[:, 1:] + self.drop_path(res.view(b, s * t, d))  # (B, S*T, D)

    def _frames(self, cls: Tensor, patches: Tensor) -> Tensor:
        """(B, 1, D) class token + (B, S*T, D) patches -> per-frame sequences (B*T, 1+S, D)."""
        b, n, d = patches.shape
        t = self.num_frames
        s = n // t
        frames = patches.view(b, s, t, d).transpose(1, 2).reshape(b * t, s, d)  # (B*T, S, D)
        cls_f = cls.expand(b, t, d).reshape(b * t, 1, d)  # (B*T, 1, D): the class token in every frame
        return torch.cat([cls_f, frames], dim=1)  # (B*T, 1+S, D)

    def _finish(self, cls: Tensor, patches: Tensor, res: Tensor, token_mask: Tensor | None,
                static: bool = False) -> Tensor:
        """Spatial residual (class outputs averaged over frames), MLP, padding held at zero.

        cls (B, 1, D), patches (B, S*T, D), res (B*T, 1+S, D) the spatial attention output; ``static``:
        see :class:`models.video_vit_common.TokenState`.
        """
        b, n, d = patches.shape
        t = self.num_frames
        s = n // t
        res_cls = res[:, 0].view(b, t, d).mean(dim=1, keepdim=True)  # (B, 1, D): average over frames
        res_p = res[:, 1:].view(b, t, s, d).transpose(1, 2).reshape(b, s * t, d)  # (B, S*T, D)
        x = torch.cat([cls, patches], dim=1) + self.drop_path(torch.cat([res_cls, res_p], dim=1))  # (B, 1+S*T, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return zero_padding(x, token_mask, static)  # (B, 1+S*T, D), padded tokens exactly zero

    def forward(self, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        t = self.num_frames
        patches = self._temporal(x)  # (B, S*T, D)
        xs = self._frames(x[:, :1], patches)  # (B*T, 1+S, D)
        res = self.attn(self.norm1(xs), frame_key_mask(state.mask, t), state.static)  # (B*T, 1+S, D)
        return self._finish(x[:, :1], patches, res, _token_mask(state.mask, t), state.static), state


class ATSDividedBlock(VideoATSMixin, DividedBlock):
    """TimeSformer block with ATS in its spatial attention (positions sampled once per clip).

    Same parameters as :class:`DividedBlock` (ATS has none). The temporal attention runs on all live
    positions; the spatial attention scores the positions from the class rows (ATS eq. 3, averaged over
    frames), samples ``K' <= K`` positions per clip (ATS eqs. 4-5) and computes only the class + kept rows
    of every frame (ATS eq. 6); the MLP and all later blocks see ``1 + K'max * T`` tokens.
    K is an inference-time knob (:func:`models.ats.set_ats_k`).
    """

    def forward(self, x: Tensor, state: TokenState) -> tuple[Tensor, TokenState]:
        b, n, d = x.shape
        t = self.num_frames
        s = (n - 1) // t
        patches = self._temporal(x)  # (B, S*T, D)
        xs = self.norm1(self._frames(x[:, :1], patches))  # (B*T, 1+S, D)
        q, k, v = self.attn.qkv_heads(xs)  # (B*T, H, 1+S, Dh) each
        static = self.static_state(x, state)
        out, idx, valid = ats_clip_attention(q, k, v, self.attn, num_frames=t, pos_mask=state.mask, sampler=self,
                                             static=static)
        res = self.attn.merge_heads(out)  # (B*T, 1+K'max, D)
        kmax = idx.shape[1]  # S when every position stays in place (keep_all, K = S): nothing gathered
        kept = gather_kept(patches.view(b, s, t, d), idx, dim=1).reshape(b, kmax * t, d)  # (B, K'max*T, D)
        positions = gather_kept(state.positions, idx, dim=1)  # (B, K'max) original grid indices
        mask = state.mask if self.ats_keep_all else valid  # keep_all: the same (or no) padding
        x = self._finish(x[:, :1], kept, res, _token_mask(mask, t), static)
        return x, TokenState(mask, positions, static)


def _token_mask(pos_mask: Tensor | None, num_frames: int) -> Tensor | None:
    """(B, S) position mask -> (B, 1 + S*T) token mask in the (s, t) token order, class token live."""
    if pos_mask is None:
        return None
    return with_class_live(pos_mask.repeat_interleave(num_frames, dim=1))  # (B, 1+S*T): position s = tokens s*T..


# ------------------------------------------------------------------------------------------------ model


class TimeSformer(VideoViTMixin, nn.Module):
    """TimeSformer with divided space-time attention; timm's model contract.

    Input (B, in_chans, num_frames, img_size, img_size). ``forward_features`` returns the normalised
    tokens (B, 1 + S' * T, D) (class token first, then position-major patch tokens; with ATS ``S'`` is the
    largest kept count in the batch and padded tokens are zero), ``forward_head`` classifies the class token.

    ATS: ``ats_stages`` (block indices), ``ats_k`` (positions per clip: one int or one per stage) or
    ``ats_ratio`` (K_n = max(floor(ratio * N_n), ats_floor)); default K = all positions (the paper's default);
    ``ats_mode`` ``"dynamic"`` or ``"static"`` shapes (:func:`models.ats.set_ats_mode`).
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 400, num_frames: int = 8, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 ats_stages: Sequence[int] = (), ats_k: int | Sequence[int | None] | None = None,
                 ats_ratio: float | Sequence[float | None] | None = None, ats_floor: int = DEFAULT_K_FLOOR,
                 ats_mode: str = "dynamic") -> None:
        super().__init__()
        ats_stages = check_ats_stages(ats_stages, depth)
        self.init_geometry(img_size, patch_size, in_chans, num_frames, embed_dim, num_classes)  # patch_embed too
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # timm ViT's LayerNorm
        num_positions = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions + 1, embed_dim))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = calculate_drop_path_rates(drop_path_rate, depth)  # on the CPU: the model may be built on meta
        blocks = []
        for i in range(depth):
            kw = dict(dim=embed_dim, num_heads=num_heads, num_frames=num_frames, mlp_ratio=mlp_ratio,
                      qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                      norm_layer=norm_layer, stage=i)
            blocks.append(ATSDividedBlock(**kw) if i in ats_stages else DividedBlock(**kw))
        self.blocks = nn.ModuleList(blocks)
        configure_ats(self, ats_k, ats_ratio, ats_floor, ats_mode)  # validates K / ratio, one value or one per stage
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        self.init_vit_weights()
        for blk in self.blocks:
            # Zero temporal_fc: the temporal branch starts as an identity residual (release: blocks 1..).
            nn.init.zeros_(blk.temporal_fc.weight)
            nn.init.zeros_(blk.temporal_fc.bias)

    # timm contract (set_grad_checkpointing, group_matcher, get_classifier, reset_classifier, forward:
    # VideoViTMixin) ---------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "time_embed"}

    def forward_features(self, x: Tensor) -> Tensor:
        b, _, t = x.shape[:3]
        tok = self.patch_embed(self.frames(x)) + self.pos_embed[:, 1:]  # (B*T, S, D): per-frame patches + space pos
        s, d = tok.shape[1], tok.shape[2]
        tok = tok.view(b, t, s, d).transpose(1, 2) + self.time_embed.unsqueeze(1)  # (B, S, T, D) + time pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1)  # (B, 1, D)
        x = self.pos_drop(torch.cat([cls, tok.reshape(b, s * t, d)], dim=1))  # (B, 1+S*T, D), (s, t) order
        x, state = forward_video_blocks(self.blocks, x, initial_state(b, s, x.device), num_frames=t,
                                        checkpointing=self.grad_checkpointing, grid=self.grid_size)
        # (B, 1+S'*T, D), padding re-zeroed after the norm; the mask always applied (one multiply, no sync)
        return zero_padding(self.norm(x), _token_mask(state.mask, t), static=True)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(x[:, 0])  # (B, D) class token
        return x if pre_logits else self.head(x)


# ------------------------------------------------------------------------------------------- checkpoint


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: TimeSformer) -> dict[str, Tensor]:
    """Adapt a timm-format ImageNet ViT state dict (or a TimeSformer one) to ``model``.

    ViT -> TimeSformer inflation, as the release's ``load_pretrained`` does:
      * ``patch_embed``, every block's ``norm1`` / ``attn`` / ``norm2`` / ``mlp``, ``cls_token``, ``norm``
        and the classifier ``head`` keep their names (the per-frame patch embedding IS the image one; a
        head of another class count is the loader's matter: ``load_checkpoint(classifier=)``);
      * ``pos_embed`` resized bicubically to the model's patch grid (class row kept);
      * temporal attention initialised from the spatial one: ``temporal_norm1 <- norm1``,
        ``temporal_attn <- attn``; ``temporal_fc`` zero (every block, see module docstring);
        ``time_embed`` zero.
    A TimeSformer checkpoint passes through (position embedding resized if the grid differs). Keys the
    model does not have (e.g. DeiT's ``dist_token``) are left in, so strict loading names them.
    """
    out = resize_pos_embed(state_dict, model)
    if not is_video_checkpoint(out, ".temporal_attn."):
        for i in range(len(model.blocks)):
            p = f"blocks.{i}."
            for name in ("weight", "bias"):
                if p + "norm1." + name in out:
                    out[p + "temporal_norm1." + name] = out[p + "norm1." + name].clone()
            for sub in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
                if p + "attn." + sub in out:
                    out[p + "temporal_attn." + sub] = out[p + "attn." + sub].clone()
            out[p + "temporal_fc.weight"] = torch.zeros_like(model.blocks[i].temporal_fc.weight)
            out[p + "temporal_fc.bias"] = torch.zeros_like(model.blocks[i].temporal_fc.bias)
        out["time_embed"] = torch.zeros_like(model.time_embed)
    return out


# ---------------------------------------------------------------------------------------------- FLOPs


def analytic_flops(*, num_frames: int, img_size: int, patch_size: int = 16, embed_dim: int = 768, depth: int = 12,
                   mlp_ratio: float = 4.0, num_classes: int = 400, in_chans: int = 3,
                   ats: Mapping[int, int] | None = None) -> float:
    """FLOPs of one TimeSformer view, derived by hand (fvcore convention: 1 multiply-add = 1 FLOP;
    LayerNorm 5 per element; softmax, GELU, additions free), i.e. what :func:`models.flops.count_flops`
    must report. With S positions, T frames, D channels, M = mlp_ratio * D, per block:

      temporal (S tubes of T tokens):  LN 5STD + qkv 3STD^2 + attention 2ST^2 D + proj STD^2 + temporal_fc STD^2
      spatial (T frames of 1+S):       LN 5T(S+1)D + qkv 3T(S+1)D^2 + attention 2T(S+1)^2 D + proj T(S+1)D^2
      MLP (1 + ST tokens):             LN 5(1+ST)D + 2(1+ST)DM
    plus the patch embedding ST * C p^2 D, the final LN 5(1+ST)D and the head D * classes.

    ``ats`` maps an ATS block to its K (positions kept per clip, counted at the upper bound K' = K).
    That block's spatial attention computes all qkv, the class rows by hand T(S+1)D, the value norms
    TSD, the CDF S and the inverse-CDF search K ceil(log2 S), then the class + kept rows with SDPA
    2T(1+K)(1+S)D and their projection T(1+K)D^2; from its MLP on, S becomes K.
    """
    s = (img_size // patch_size) ** 2
    t, d = num_frames, embed_dim
    m = int(d * mlp_ratio)
    total = s * t * in_chans * patch_size ** 2 * d  # patch embedding
    for i in range(depth):
        n = s * t
        total += 5 * n * d + 3 * n * d * d + 2 * s * t * t * d + n * d * d + n * d * d  # temporal branch
        total += 5 * t * (s + 1) * d + 3 * t * (s + 1) * d * d  # spatial LN + qkv
        if ats is not None and i in ats:
            k = min(ats[i], s)
            total += t * (s + 1) * d + t * s * d + s + k * max(1, math.ceil(math.log2(max(s, 2))))  # ATS scoring
            total += 2 * t * (1 + k) * (1 + s) * d + t * (1 + k) * d * d  # kept rows (SDPA) + proj
            s = k
        else:
            total += 2 * t * (s + 1) ** 2 * d + t * (s + 1) * d * d  # full spatial attention + proj
        total += 5 * (1 + s * t) * d + 2 * (1 + s * t) * d * m  # MLP
    return float(total + 5 * (1 + s * t) * d + d * num_classes)


# -------------------------------------------------------------------------------------------- configs


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Video cfg: input_size is (C, T, H, W); mean/std of the release's Kinetics configs. Only timm
    # PretrainedCfg fields live here (timm's registry validates them); the data geometry is in data_cfgs.
    return {"num_classes": 400, "input_size": (3, 8, 224, 224), "mean": (0.45, 0.45, 0.45),
            "std": (0.225, 0.225, 0.225), "crop_pct": 1.0, "interpolation": "bilinear", "fixed_input_size": True,
            "first_conv": "patch_embed.proj", "classifier": "head",
            "paper_name": "Is Space-Time Attention All You Need for Video Understanding?", "paper_ids": "arXiv:2102.05095",
            **kwargs}


default_cfgs = {
    "timesformer_base": _cfg(),
    "timesformer_hr": _cfg(num_classes=600, input_size=(3, 16, 448, 448)),
    "timesformer_large": _cfg(input_size=(3, 96, 224, 224)),
}
for _name in list(default_cfgs):
    default_cfgs[_name + "_ats"] = {**default_cfgs[_name], "notes": ("ATS (Fayyaz et al., ECCV 2022) in blocks 3-5",)}

# Data geometry added to pretrained_cfg (models.registry): sampling_rate = frame stride of the release's
# configs (8x32, 16x16, 96x4); test_views = (temporal clips, spatial crops) of the papers' "1 x 3 views".
_STRIDES = {"timesformer_base": 32, "timesformer_hr": 16, "timesformer_large": 4}
data_cfgs = {name: {"sampling_rate": _STRIDES[name.removesuffix("_ats")], "test_views": (1, 3)}
             for name in default_cfgs}

# ATS paper, appendix E.5: "We integrate our ATS module into the stages 3 to 5 of the TimeSformer".
ATS_STAGES = (3, 4, 5)


def _create(variant: str, **kwargs: Any) -> TimeSformer:
    stages = ATS_STAGES if variant.endswith("_ats") else ()
    return create_video_vit(TimeSformer, default_cfgs[variant], stages, **kwargs)


@register_glimpse
def timesformer_base(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer (ViT-B/16, divided space-time), 8 frames x 224^2: 121M params, 196 GFLOPs per view."""
    return _create("timesformer_base", **kwargs)


@register_glimpse
def timesformer_hr(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-HR: 16 frames x 448^2 (Kinetics-600 head), 1703 GFLOPs per view."""
    return _create("timesformer_hr", **kwargs)


@register_glimpse
def timesformer_large(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-L: 96 frames x 224^2, 2380 GFLOPs per view."""
    return _create("timesformer_large", **kwargs)


@register_glimpse
def timesformer_base_ats(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer 8x224 with ATS in blocks 3-5 (K = all positions unless ``ats_k`` / ``ats_ratio``)."""
    return _create("timesformer_base_ats", **kwargs)


@register_glimpse
def timesformer_hr_ats(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-HR 16x448 with ATS in blocks 3-5."""
    return _create("timesformer_hr_ats", **kwargs)


@register_glimpse
def timesformer_large_ats(pretrained: bool = False, **kwargs: Any) -> TimeSformer:
    """TimeSformer-L 96x224 with ATS in blocks 3-5."""
    return _create("timesformer_large_ats", **kwargs)
