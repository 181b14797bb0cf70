"""CvT: Convolutional vision Transformer (Wu et al., ICCV 2021, arXiv:2103.15808), and CvT + ATS
(Fayyaz et al., ECCV 2022, ``/work/shared/papers/ats.txt``, Table 1 and appendix E.2).

Three stages of a convolutional token embedding (conv 7x7/4, 3x3/2, 3x3/2 + LayerNorm; C = 64, 192, 384)
and transformer blocks (CvT-13: 1, 2, 10; CvT-21: 1, 4, 16) whose attention projects q / k / v with a
depth-wise conv + BN (CvT section 3.2, eq. 2; keys and values at stride 2, the "squeezed" projection).
No position embedding; the class token joins in stage 3 only and feeds the classifier.

Departures from the official release (github.com/microsoft/CvT, ``lib/models/cls_cvt.py``), all
converted by :func:`checkpoint_filter_fn`:

* keys ``stage{i}`` -> ``stages.{i}``, ``conv_proj_{q,k,v}`` -> ``conv_{q,k,v}``; ``proj_{q,k,v}`` -> one
  ``qkv`` (timm's name, so stage 3 can be timm ``Block`` s); the class token is ``stages.2.cls_token``;
* attention scale ``head_dim ** -0.5`` (CvT eq. 1, timm) where the release uses ``dim ** -0.5``: the
  filter multiplies the query rows (weight and bias) by ``num_heads ** -0.5`` (the same logits);
* the final norm runs on every token (``forward_features`` -> ``(B, 1 + N, C)``, timm's contract), the
  release's on the class token only; stochastic depth in the last stage only, as every release config.

CvT + ATS (``cvt_*_ats``, ATS appendix E.2): stage 3 uses linear q / k / v (timm ``Block``; "we do not use
any convolutional projection layers in the transformer blocks of stage 3": dropped tokens leave no grid
to convolve) and ATS samples in its blocks 1-9, counted from 0 within the stage as the ATS paper counts
DeiT's "3-11" and ``models.psvit`` reads PS-ViT's "1-9": every block but the first (CvT-21: 10-15 are
mask-aware). Sampler, masked attention and trace are ``models.ats`` / ``models.attention`` /
``models.trace``'s; K is an inference-time knob (:func:`models.ats.set_ats_k`), ``ats_mode="static"``
keeps exactly 1 + K slots (``models.ats``); each ATS block emits a :class:`models.trace.KeptTokens`
over stage 3's grid ``(H/16, W/16)``. A CvT checkpoint initialises
CvT + ATS: the filter drops stage 3's convolutional projections (E.2's fine-tuning).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, QuickGELU, register_notrace_function, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import Block
from torch import Tensor

from models.ats import DEFAULT_K_FLOOR, convert_blocks, forward_ats_blocks, masked_pool
from models.attention import full_mask_if_none, masked_attention, nonzero_token_mask, zero_padding
from models.registry import register_glimpse

__all__ = ["ATS_STAGES", "ConvAttention", "ConvBlock", "ConvEmbed", "CvT", "CvTStage", "apply_ats_to_cvt",
           "checkpoint_filter_fn", "conv_projection"]

ATS_STAGES: tuple[int, ...] = tuple(range(1, 10))  # appendix E.2: blocks 1-9 of stage 3 (0-based in the stage)


# ---------------------------------------------------------------------------------------------- helpers


@register_notrace_function
def check_cvt_input(x: Tensor, in_chans: int) -> None:
    """Refuse inputs CvT cannot take, naming the shape (an FX leaf: plain Python checks). Any size works."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(f"expected images (B, {in_chans}, H, W), got shape {tuple(x.shape)}")


def check_pool(global_pool: str) -> str:
    if global_pool not in ("token", "avg"):
        raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
    return global_pool


def tokens_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, H*W, C) row-major tokens -> (B, C, H, W) feature map."""
    B, N, C = x.shape
    torch._assert(N == grid[0] * grid[1], "tokens_to_map: token count does not match the grid")
    return x.transpose(1, 2).reshape(B, C, grid[0], grid[1])  # (B, C, H, W)


# ----------------------------------------------------------------------------------------------- blocks


class ConvEmbed(nn.Module):
    """Convolutional token embedding (CvT section 3.1): strided conv, then LayerNorm over channels."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int,
                 norm_layer: Callable[..., nn.Module]) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = norm_layer(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(B, C_in, H, W) -> tokens (B, H'*W', C) and their grid (H', W')."""
        x = self.proj(x)  # (B, C, H', W')
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        return self.norm(x.flatten(2).transpose(1, 2)), grid  # (B, H'*W', C)


def conv_projection(dim: int, kernel_size: int, stride: int) -> nn.Sequential:
    """Depth-wise conv + BatchNorm (CvT eq. 2, before the point-wise linear): (B, C, H, W) -> (B, C, H', W')."""
    conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(dim)))


class ConvAttention(nn.Module):
    """Attention with convolutional projection (CvT section 3.2, Fig. 3(c)): queries at stride 1, keys /
    values at ``stride_kv``; prefix tokens (the class token) bypass the convs. One ``qkv`` parameter (timm's
    layout) is applied in thirds to the three maps. ``forward(x (B, P+H*W, C), grid (H, W)) -> (B, P+H*W, C)``.
    """

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool = True, kernel_size: int = 3,
                 stride_kv: int = 2, num_prefix_tokens: int = 0, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.fused_attn = use_fused_attn()
        self.conv_q = conv_projection(dim, kernel_size, 1)
        self.conv_k = conv_projection(dim, kernel_size, stride_kv)
        self.conv_v = conv_projection(dim, kernel_size, stride_kv)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, fmap: Tensor, prefix: Tensor, part: int) -> Tensor:
        """Prefix + convolved map (B, C, H', W') through the ``part``-th third of ``qkv`` -> (B, h, P+H'W', Dh)."""
        x = torch.cat([prefix, fmap.flatten(2).transpose(1, 2)], dim=1)  # (B, P+H'*W', C)
        b = None if self.qkv.bias is None else self.qkv.bias.chunk(3)[part]
        B, L, _ = x.shape
        return F.linear(x, self.qkv.weight.chunk(3)[part], b).reshape(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, P+L, Dh)

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        B, N, C = x.shape
        prefix, tokens = x[:, :self.num_prefix_tokens], x[:, self.num_prefix_tokens:]  # (B, P, C), (B, H*W, C)
        fmap = tokens_to_map(tokens, grid)  # (B, C, H, W)
        q = self._heads(self.conv_q(fmap), prefix, 0)  # (B, h, P+H*W, Dh)
        k = self._heads(self.conv_k(fmap), prefix, 1)  # (B, h, P+H'*W', Dh) squeezed keys
        v = self._heads(self.conv_v(fmap), prefix, 2)  # (B, h, P+H'*W', Dh)
        o = masked_attention(q, k, v, None, scale=self.scale, fused=self.fused_attn,
                             dropout_p=self.attn_drop.p if self.training else 0.0)  # (B, h, N, Dh) CvT eq. 1
        o = o.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj_drop(self.proj(o))


class ConvBlock(nn.Module):
    """Convolutional transformer block (CvT Fig. 2(b)): timm ``Block``'s layout and parameter names with
    :class:`ConvAttention`. ``forward(x (B, N, C), grid) -> (B, N, C)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 act_layer: Callable[..., nn.Module] = QuickGELU, norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
                 *, kernel_size: int = 3, stride_kv: int = 2, num_prefix_tokens: int = 0) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = ConvAttention(dim, num_heads, qkv_bias=qkv_bias, kernel_size=kernel_size, stride_kv=stride_kv,
                                  num_prefix_tokens=num_prefix_tokens, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x), grid))  # (B, N, C)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class CvTStage(nn.Module):
    """One CvT stage: :class:`ConvEmbed`, an optional class token, then ``depth`` blocks.

    ``block_fn`` builds :class:`ConvBlock` s (convolutional projection) or timm ``Block`` s (linear q / k / v,
    which ATS converts in place). ``forward(x (B, C_in, H, W)) -> (tokens (B, P+N', C), mask | None, grid)``.
    """

    def __init__(self, in_chans: int, dim: int, depth: int, num_heads: int, *, patch_size: int, stride: int,
                 padding: int, class_token: bool, block_fn: Callable[..., nn.Module], drop_path: Sequence[float],
                 norm_layer: Callable[..., nn.Module], **block_kwargs) -> None:
        super().__init__()
        self.patch_embed = ConvEmbed(in_chans, dim, patch_size, stride, padding, norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if class_token else None
        self.blocks = nn.Sequential(*[block_fn(dim, num_heads, drop_path=drop_path[i], norm_layer=norm_layer,
                                               **block_kwargs) for i in range(depth)])
        self.conv_projection = isinstance(self.blocks[0], ConvBlock)
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, tuple[int, int]]:
        x, grid = self.patch_embed(x)  # (B, N, C), (H', W')
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 1+N, C)
        checkpoint = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        if not self.conv_projection:  # linear q / k / v: ATS blocks may shrink the sequence and pad it
            x, mask = forward_ats_blocks(self.blocks, x, checkpoint=checkpoint, grid=grid)  # (B, 1+K, C), (B, 1+K)
            return x, mask, grid
        for blk in self.blocks:  # convolutional projection: every block needs the full token grid
            x = torch.utils.checkpoint.checkpoint(blk, x, grid, use_reentrant=False) if checkpoint else blk(x, grid)
        return x, None, grid


# ------------------------------------------------------------------------------------------------ model


class CvT(nn.Module):
    """CvT classifier, timm's contract: ``forward_features(x) -> (B, 1 + N, C)`` after the final norm
    (``(B, 1 + K'max, C)`` with ATS, padded rows exactly zero), ``forward_head``, ``reset_classifier``, ...

    ``img_size`` is data geometry only (no position embedding: any input size works). ``embed_dims``,
    ``depths``, ``num_heads``, ``patch_*``: per stage (CvT Table 2); ``kernel_size`` / ``stride_kv``: the
    convolutional projection; ``linear_projection_stages``: 0-based stages built of timm ``Block`` s with
    linear q / k / v (ATS appendix E.2: ``(2,)``); ``act_layer``: QuickGELU, as the release.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dims: Sequence[int] = (64, 192, 384),
                 depths: Sequence[int] = (1, 2, 10), num_heads: Sequence[int] = (1, 3, 6),
                 patch_sizes: Sequence[int] = (7, 3, 3), patch_strides: Sequence[int] = (4, 2, 2),
                 patch_paddings: Sequence[int] = (2, 1, 1), mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 kernel_size: int = 3, stride_kv: int = 2, linear_projection_stages: Sequence[int] = (),
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, act_layer: Callable[..., nn.Module] = QuickGELU,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        n = len(embed_dims)
        if not all(len(v) == n for v in (depths, num_heads, patch_sizes, patch_strides, patch_paddings)):
            raise ValueError("embed_dims, depths, num_heads and patch_* need one value per stage")
        if any(s not in range(n) for s in linear_projection_stages):
            raise ValueError(f"linear_projection_stages {tuple(linear_projection_stages)} are not stages of 0..{n - 1}")
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans, self.num_classes, self.global_pool = in_chans, num_classes, check_pool(global_pool)
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dims[-1]
        self.num_prefix_tokens = 1  # the class token, stage 3 only (CvT section 3)
        stages, prev = [], in_chans
        for i in range(n):
            last = i == n - 1  # stochastic depth and the class token: last stage only (release configs)
            stages.append(CvTStage(
                prev, embed_dims[i], depths[i], num_heads[i], patch_size=patch_sizes[i], stride=patch_strides[i],
                padding=patch_paddings[i], class_token=last,
                block_fn=Block if i in linear_projection_stages else partial(
                    ConvBlock, kernel_size=kernel_size, stride_kv=stride_kv, num_prefix_tokens=int(last)),
                drop_path=torch.linspace(0, drop_path_rate if last else 0.0, depths[i], device="cpu").tolist(),
                norm_layer=norm_layer,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                act_layer=act_layer))
            prev = embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.norm = norm_layer(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()
        self.to(device=device, dtype=dtype)  # timm's factory kwargs (e.g. its tests build on "meta")

    def init_weights(self) -> None:
        """Release init: trunc-normal(0.02) linears and class token, zero biases; norms and convs at torch's."""
        trunc_normal_(self.stages[-1].cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"stages.{len(self.stages) - 1}.cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stages\.0\.patch_embed",
                "blocks": r"^stages\.(\d+)" if coarse else [
                    (r"^stages\.(\d+)\.(?:patch_embed|cls_token)", (0,)),
                    (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            self.global_pool = check_pool(global_pool)
        self.num_classes = num_classes
        dd = {"device": self.norm.weight.device, "dtype": self.norm.weight.dtype}  # the new head joins the model's
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_features_masked(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, C, H, W) -> normed stage-3 tokens (B, 1+N | 1+K'max, C) and their mask, or None if unpadded."""
        check_cvt_input(x, self.in_chans)
        for stage in self.stages[:-1]:
            tokens, _, grid = stage(x)  # (B, N_i, C_i): no class token, never padded before the last stage
            x = tokens_to_map(tokens, grid)  # (B, C_i, H_i, W_i)
        x, mask, _ = self.stages[-1](x)  # (B, 1+N, C), (B, 1+N) | None
        # the final norm maps zero padding to its bias: re-zero, the mask always applied (one multiply, no sync)
        return zero_padding(self.norm(x), mask, static=True), mask

    def forward_features(self, x: Tensor) -> Tensor:
        return self.forward_features_masked(x)[0]

    def forward_head(self, x: Tensor, pre_logits: bool = False, token_mask: Tensor | None = None) -> Tensor:
        if token_mask is None and self.global_pool == "avg":
            token_mask = nonzero_token_mask(x)  # (B, N): padded rows of forward_features are exactly zero
        x = self.head_drop(masked_pool(x, token_mask, self.global_pool, self.num_prefix_tokens))  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x, mask = self.forward_features_masked(x)
        return self.forward_head(x, token_mask=full_mask_if_none(mask, x))


def apply_ats_to_cvt(model: CvT, stages: Sequence[int] | None = None, k: int | Sequence[int | None] | None = None,
                     ratio: float | Sequence[float | None] | None = None, floor: int = DEFAULT_K_FLOOR,
                     mode: str = "dynamic") -> CvT:
    """Put ATS into the last stage of ``model`` in place (ATS appendix E.2) and return it. ``stages``: 0-based
    blocks of that stage (default :data:`ATS_STAGES`, cut to its depth); ``k`` / ``ratio`` as
    :func:`models.ats.convert_blocks` (neither: K = the input tokens), ``mode`` its ``"dynamic"`` / ``"static"``
    shapes. The stage must have linear q / k / v."""
    last = model.stages[-1]
    if last.conv_projection:
        raise ValueError("ATS needs linear q/k/v in CvT's last stage (ATS appendix E.2): build the model with "
                         f"linear_projection_stages=({len(model.stages) - 1},)")
    stages = [s for s in ATS_STAGES if s < len(last.blocks)] if stages is None else list(stages)
    convert_blocks(last.blocks, stages, k=k, ratio=ratio, floor=floor, mode=mode)
    return model


# ----------------------------------------------------------------------------------- checkpoint adapter


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: CvT) -> dict[str, Tensor]:
    """Adapt a CvT state dict to ``model`` (the one place for format differences, STYLE #9).

    * Official release (``stage{i}.`` keys): ``stage{i}`` -> ``stages.{i}``, ``attn.conv_proj_{q,k,v}`` ->
      ``attn.conv_{q,k,v}``, ``attn.proj_{q,k,v}`` fused into ``attn.qkv`` with the query rows (weight and
      bias) times ``num_heads ** -0.5``: the release scales logits by ``dim ** -0.5``, we by ``head_dim ** -0.5``.
    * Convolutional projections the model does not have (CvT + ATS's last stage, ATS appendix E.2) are
      dropped, so a CvT checkpoint initialises CvT + ATS. Everything else passes unchanged.
    """
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0].startswith("stage") and parts[0][5:].isdigit():
            parts = ["stages", parts[0][5:], *parts[1:]]
        out[".".join(parts).replace(".attn.conv_proj_", ".attn.conv_")] = value
    for key in [k for k in out if k.endswith(".attn.proj_q.weight")]:
        prefix = key[: -len("proj_q.weight")]  # stages.{i}.blocks.{j}.attn.
        heads = model.stages[int(prefix.split(".")[1])].blocks[0].attn.num_heads
        for kind in ("weight", "bias"):
            q, k, v = (out.pop(f"{prefix}proj_{p}.{kind}", None) for p in "qkv")
            if q is not None:
                out[f"{prefix}qkv.{kind}"] = torch.cat([q * heads ** -0.5, k, v])  # (3C, C) | (3C,)
    own = model.state_dict()
    return {k: v for k, v in out.items() if ".attn.conv_" not in k or k in own}


# -------------------------------------------------------------------------------------------- configs


def _cfg(size: int = 224, **kwargs) -> dict:
    # Evaluation as the release: 224 resizes to 256 and centre-crops; 384 resizes to 384 (no crop).
    return {"url": "", "num_classes": 1000, "input_size": (3, size, size), "pool_size": None,
            "crop_pct": 0.875 if size == 224 else 1.0, "crop_mode": "center" if size == 224 else "squash",
            "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "stages.0.patch_embed.proj", "classifier": "head", "license": "mit",
            "paper_ids": "arXiv:2103.15808", "origin_url": "https://github.com/microsoft/CvT", **kwargs}


default_cfgs = {f"cvt_{d}_{s}{a}": _cfg(s) for d in (13, 21) for s in (224, 384) for a in ("", "_ats")}

# CvT Table 2: CvT-13 depths 1-2-10, CvT-21 1-4-16; widths 64-192-384, heads 1-3-6 for both.
_CVT_13 = dict(embed_dims=(64, 192, 384), depths=(1, 2, 10), num_heads=(1, 3, 6))
_CVT_21 = dict(embed_dims=(64, 192, 384), depths=(1, 4, 16), num_heads=(1, 3, 6))


def _create_cvt(variant: str, pretrained: bool = False, **kwargs) -> CvT:
    return build_model_with_cfg(CvT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


def _create_cvt_ats(variant: str, pretrained: bool = False, *, ats_stages: Sequence[int] | None = None,
                    ats_k: int | Sequence[int | None] | None = None, ats_ratio: float | Sequence[float | None] | None = None,
                    ats_floor: int = DEFAULT_K_FLOOR, ats_mode: str = "dynamic", **kwargs) -> CvT:
    kwargs.setdefault("linear_projection_stages", (len(kwargs["depths"]) - 1,))  # appendix E.2: stage 3 linear
    model = _create_cvt(variant, pretrained, **kwargs)
    return apply_ats_to_cvt(model, ats_stages, k=ats_k, ratio=ats_ratio, floor=ats_floor, mode=ats_mode)


@register_glimpse
def cvt_13_224(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-13 at 224 (CvT Table 2/3: 20M params, 4.5 GFLOPs)."""
    return _create_cvt("cvt_13_224", pretrained, **{**_CVT_13, "img_size": 224, **kwargs})


@register_glimpse
def cvt_13_384(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-13 at 384 (20M params, 16.3 GFLOPs)."""
    return _create_cvt("cvt_13_384", pretrained, **{**_CVT_13, "img_size": 384, **kwargs})


@register_glimpse
def cvt_21_224(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-21 at 224 (32M params, 7.1 GFLOPs)."""
    return _create_cvt("cvt_21_224", pretrained, **{**_CVT_21, "img_size": 224, **kwargs})


@register_glimpse
def cvt_21_384(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-21 at 384 (32M params, 24.9 GFLOPs)."""
    return _create_cvt("cvt_21_384", pretrained, **{**_CVT_21, "img_size": 384, **kwargs})


@register_glimpse
def cvt_13_224_ats(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-13 + ATS in stage 3's blocks 1-9 (ATS Table 1: 3.2 GFLOPs, an ImageNet average with trained weights)."""
    return _create_cvt_ats("cvt_13_224_ats", pretrained, **{**_CVT_13, "img_size": 224, **kwargs})


@register_glimpse
def cvt_13_384_ats(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-13 at 384 + ATS (ATS Table 1: 11.7 GFLOPs average)."""
    return _create_cvt_ats("cvt_13_384_ats", pretrained, **{**_CVT_13, "img_size": 384, **kwargs})


@register_glimpse
def cvt_21_224_ats(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-21 + ATS in stage 3's blocks 1-9 (ATS Table 1: 5.1 GFLOPs average)."""
    return _create_cvt_ats("cvt_21_224_ats", pretrained, **{**_CVT_21, "img_size": 224, **kwargs})


@register_glimpse
def cvt_21_384_ats(pretrained: bool = False, **kwargs) -> CvT:
    """CvT-21 at 384 + ATS (ATS Table 1: 17.4 GFLOPs average)."""
    return _create_cvt_ats("cvt_21_384_ats", pretrained, **{**_CVT_21, "img_size": 384, **kwargs})
