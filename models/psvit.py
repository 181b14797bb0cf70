"""PS-ViT: Vision Transformer with Progressive Sampling (Yue et al., ICCV 2021, ``papers/ps-vit.txt``).

Instead of cutting the image into a fixed patch grid, PS-ViT samples an ``n x n`` set of tokens from a
stride-4 CNN feature map at learned, fractional points and moves the points for ``N`` iterations
(section 3.1, Figure 3). The tokens then go through a plain pre-norm ViT (section 3.2, Figure 4).

    image (B, 3, H, W)
      -> feature extractor: ResNet-50 stem + first two bottlenecks of stage 1   F: (B, C, H/4, W/4)
      -> progressive sampling module, N iterations (PS-ViT eqs. 1-5)                   T_N: (B, n*n, C)
      -> [cls, T_N] -> N_v transformer layers (PS-ViT eq. 6), no extra position embedding
      -> LayerNorm -> classifier on the class token

Departures from / decisions over the paper and the official release (github.com/yuexy/PS-ViT):

* Sampling uses Glimpse's shared :func:`models.point_sampling.sample_points` (one fused ``grid_sample``,
  any device) instead of the release's CUDA-only extension. Points are (x, y) normalised to [0, 1] of the
  feature map, pixel centre ``i`` at ``(i + 0.5) / size``.
* PS-ViT eq. 2 is read in continuous coordinates: the initial points are the exact centres of the ``n x n``
  cells, ``((j + 0.5) / n, (i + 0.5) / n)``. (The release evaluates the same formula in pixel-index
  coordinates, which puts its grid half a feature pixel down-right of the cell centres.)
* Offsets ``o_t = M_t T_t`` (PS-ViT eq. 5) are predicted in feature-map pixels, as in the release, and divided
  by the map size before being added to the normalised points; ``M_t`` is zero-initialised, so all
  iterations start on the regular grid.
* Gradients reach ``o_t`` only through the features sampled at ``p_{t+1}`` (PS-ViT eq. 9): the position
  embedding and the base of the next update use the points with gradients stopped, as in the release.
* Table 8's weight-sharing variants (``*_shared``, not in the release) use ONE transformer layer and ONE
  offset layer ``M`` for all iterations; the position map ``W`` is shared by every variant (PS-ViT eq. 4).
* The feature extractor's width is matched to C by the second bottleneck's 1x1 expansion conv and a 1x1
  projection shortcut, as in the release: B uses ResNet-50's 256 channels after the first bottleneck,
  then 256 -> 384; Ti uses 64 -> 192 -> 192.

* Layers are timm ``Block`` s (pre-norm, FFN ratio 3, no qkv bias, LayerNorm eps 1e-5 as in the
  release), so timm tooling and ATS's block conversion apply unchanged.

ATS (Fayyaz et al., ECCV 2022, Table 1) plugs into the vision-transformer module's layers 1-9
(``psvit_b_14_ats``, ``psvit_b_18_ats``); see :func:`apply_ats_to_psvit`. The variants take the ATS
keywords of every family: ``ats_stages``, ``ats_k``, ``ats_ratio``, ``ats_floor``, ``ats_mode`` (``"static"``:
exactly 1 + K slots per layer, no host sync, the same logits; :mod:`models.ats`).

Trace (:mod:`models.trace`): every iteration emits :class:`models.trace.SampledPoints` (its points
``p_t``, one per token, no RoIs) and every ATS layer :class:`models.trace.KeptTokens` over the ``n*n``
sampled tokens, whose candidate points are ``p_N``. The points are normalised to the feature map, which
spans the input exactly (stride 4), so they are normalised input coordinates too, up to the stem's
receptive-field offset (the centre of map pixel ``i`` sits at image pixel ``4i + 0.5``, not ``4i + 2``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from timm.layers import calculate_drop_path_rates, register_notrace_function, trunc_normal_
from timm.models import build_model_with_cfg
from timm.models.vision_transformer import Block

from models.ats import DEFAULT_K_FLOOR, convert_blocks, forward_ats_blocks, masked_pool
from models.attention import full_mask_if_none, nonzero_token_mask, zero_padding
from models.point_sampling import sample_points
from models.registry import register_glimpse
from models.trace import SampledPoints, emit, recording

__all__ = ["PSViT", "ProgressiveSampling", "FeatureExtractor", "Bottleneck", "initial_grid_points",
           "apply_ats_to_psvit", "checkpoint_filter_fn"]

# The feature map F is the output of the ResNet-50 stem (stride 4), section 3.2.
FEATURE_STRIDE = 4

# FX leaves (STYLE #8): sampling at data-dependent points and the shape checks stay opaque to timm's FX tools.
register_notrace_function(sample_points)


# ---------------------------------------------------------------------------------------------- helpers


def initial_grid_points(n: int, device: torch.device | None = None) -> torch.Tensor:
    """The regular ``n x n`` sampling grid ``p_1`` of PS-ViT eq. 2, as normalised (x, y) points.

    Point ``i`` (row-major: ``row = i // n``, ``col = i % n``) is the centre of cell (row, col):
    ``x = (col + 0.5) / n``, ``y = (row + 0.5) / n``, i.e. PS-ViT eq. 2's ``pi * s + s / 2`` divided by the map size.

    Returns:
        ``(n * n, 2)`` float32 tensor of (x, y) in (0, 1).
    """
    if n < 1:
        raise ValueError(f"number of sampling points per axis n must be >= 1, got {n}")
    centres = (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n  # (n,)
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # (n, n) each, row-major
    return torch.stack([x.reshape(-1), y.reshape(-1)], dim=-1)  # (n*n, 2) as (x, y)


@register_notrace_function
def check_psvit_input(x: torch.Tensor, in_chans: int, img_size: tuple[int, int], dynamic_img_size: bool) -> None:
    """Refuse inputs PS-ViT cannot take, naming the offending value (an FX leaf: plain Python checks)."""
    if x.ndim != 4:
        raise ValueError(f"PS-ViT expects (B, C, H, W) images, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(f"PS-ViT expects {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)})")
    size = tuple(x.shape[-2:])
    if dynamic_img_size:
        if size[0] % FEATURE_STRIDE or size[1] % FEATURE_STRIDE or min(size) < 2 * FEATURE_STRIDE:
            raise ValueError(f"PS-ViT input size {size} must be divisible by {FEATURE_STRIDE} and at least "
                             f"{2 * FEATURE_STRIDE}")
    elif size != tuple(img_size):
        raise ValueError(f"PS-ViT built for {tuple(img_size)} inputs got size {size}; "
                         "build it with img_size=... or dynamic_img_size=True")


@register_notrace_function
def pixels_to_normalised(features: torch.Tensor) -> torch.Tensor:
    """(2,) factors that turn (x, y) offsets in feature pixels into normalised map units: (1 / W, 1 / H)."""
    height, width = features.shape[-2:]
    return features.new_tensor([1.0 / width, 1.0 / height])  # (2,) for (x, y)


# ----------------------------------------------------------------------------------------------- blocks


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, BN + ReLU) with free in/mid/out widths.

    torchvision's / timm's bottleneck fixes ``out = 4 * mid``; PS-ViT needs ``out = C`` (e.g. 384 with
    ``mid = 64``), so the widths are explicit. A 1x1 conv + BN projects the shortcut when widths differ.
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, mid_chs, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_chs)
        self.conv2 = nn.Conv2d(mid_chs, mid_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_chs)
        self.conv3 = nn.Conv2d(mid_chs, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.downsample = (nn.Sequential(nn.Conv2d(in_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs))
                           if in_chs != out_chs else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, out, H, W)
        x = self.act(self.bn1(self.conv1(x)))  # (B, mid, H, W)
        x = self.act(self.bn2(self.conv2(x)))  # (B, mid, H, W)
        x = self.bn3(self.conv3(x))  # (B, out, H, W)
        return self.act(x + shortcut)


class FeatureExtractor(nn.Module):
    """Section 3.2: ResNet-50's convolutional stem and the first two bottlenecks of its first stage.

    ``(B, in_chans, H, W) -> (B, widths[-1], H/4, W/4)``: 7x7/2 conv (64) + BN + ReLU, 3x3/2 max-pool,
    then ``Bottleneck(64, mid, widths[0])`` and ``Bottleneck(widths[0], mid, widths[1])``.
    """

    def __init__(self, in_chans: int = 3, widths: tuple[int, int] = (256, 384), mid_chs: int = 64,
                 stem_chs: int = 64) -> None:
        super().__init__()
        if len(widths) != 2:
            raise ValueError(f"feature extractor takes two bottleneck widths, got {widths!r}")
        self.conv1 = nn.Conv2d(in_chans, stem_chs, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = nn.Sequential(Bottleneck(stem_chs, mid_chs, widths[0]),
                                    Bottleneck(widths[0], mid_chs, widths[1]))
        self.out_chs = widths[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.bn1(self.conv1(x))))  # (B, 64, H/4, W/4)
        return self.layer1(x)  # (B, C, H/4, W/4)


class ProgressiveSampling(nn.Module):
    """The progressive sampling module of section 3.1 (Figure 3, PS-ViT eqs. 1-5).

    For ``t = 1..N``::

        T'_t = F(p_t)                    bilinear sampling at fractional points       (PS-ViT eq. 3)
        P_t  = W p_t                     one linear map shared by all iterations      (PS-ViT eq. 4)
        T_t  = Transformer_t(T'_t + P_t + T_{t-1}),   T_0 = 0                         (PS-ViT eq. 4)
        o_t  = M_t T_t,  p_{t+1} = p_t + o_t          (t < N)                          (PS-ViT eqs. 5, 1)

    Args:
        dim: token width C (= channels of F).
        num_heads: attention heads M.
        num_points: points per axis n (``n * n`` tokens).
        num_iters: iterations N (>= 1; N = 1 never moves the points, Table 6).
        share_weights: one transformer layer and one offset layer for every iteration (Table 8, dagger).
        block_fn: transformer layer class with timm ``Block``'s signature.
        drop_path: stochastic-depth rate per iteration (``len == num_iters``; the shared layer uses the first).
    """

    def __init__(self, dim: int, num_heads: int, num_points: int = 14, num_iters: int = 4,
                 share_weights: bool = False, mlp_ratio: float = 3.0, qkv_bias: bool = False,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: Sequence[float] | None = None,
                 block_fn: Callable[..., nn.Module] = Block,
                 norm_layer: Callable[..., nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        if num_iters < 1:
            raise ValueError(f"number of sampling iterations N must be >= 1, got {num_iters}")
        self.num_points = num_points
        self.num_iters = num_iters
        self.share_weights = share_weights
        drop_path = list(drop_path) if drop_path is not None else [0.0] * num_iters
        if len(drop_path) != num_iters:
            raise ValueError(f"drop_path needs {num_iters} rates (one per iteration), got {len(drop_path)}")
        n_layers = 1 if share_weights else num_iters
        n_offsets = min(1, num_iters - 1) if share_weights else num_iters - 1  # no offsets after the last iteration
        self.pos_embed = nn.Linear(2, dim)  # W of PS-ViT eq. 4, shared by all iterations in every variant
        self.blocks = nn.ModuleList([
            block_fn(dim=dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_drop=proj_drop,
                     attn_drop=attn_drop, drop_path=drop_path[i], norm_layer=norm_layer)
            for i in range(n_layers)])
        # M_t of PS-ViT eq. 5; offsets are in feature-map pixels (release convention), see forward().
        self.offset_heads = nn.ModuleList([nn.Linear(dim, 2) for _ in range(n_offsets)])
        self.register_buffer("initial_points", initial_grid_points(num_points), persistent=False)

    def reset_offsets(self) -> None:
        """Zero every M_t, so that all iterations sample on the initial grid until training moves them."""
        for head in self.offset_heads:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def block_at(self, t: int) -> nn.Module:
        """The transformer layer used at iteration ``t`` (0-based); the same object for every t if shared."""
        return self.blocks[0 if self.share_weights else t]

    def offset_head_at(self, t: int) -> nn.Module:
        """M_t for iteration ``t`` (0-based, ``t < N - 1``)."""
        return self.offset_heads[0 if self.share_weights else t]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Sample tokens from ``features`` (B, C, H, W).

        Returns:
            ``T_N`` as ``(B, n*n, C)`` and the sampling points ``[p_1, ..., p_N]``, each ``(B, n*n, 2)``
            normalised (x, y), detached (Figure 5's arrows run from ``p_1`` to ``p_N``).
        """
        batch = features.shape[0]
        points = self.initial_points.to(features.dtype).expand(batch, -1, -1)  # (B, n*n, 2) p_1, PS-ViT eq. 2
        # Offsets come out in feature pixels; dividing by the map size keeps their scale independent of n.
        to_normalised = pixels_to_normalised(features)  # (2,) for (x, y)
        tokens: torch.Tensor | None = None  # T_0 = 0
        trace: list[torch.Tensor] = []
        for t in range(self.num_iters):
            sampled = sample_points(features, points)  # (B, n*n, C) T'_t, PS-ViT eq. 3; grads flow to o_{t-1}
            fixed = points.detach()  # (B, n*n, 2) PS-ViT eq. 9: o_{t-1} learns through the sampling only
            x = sampled + self.pos_embed(fixed)  # (B, n*n, C) T'_t + P_t
            if tokens is not None:
                x = x + tokens  # (B, n*n, C) + T_{t-1}
            tokens = self.block_at(t)(x)  # (B, n*n, C) T_t
            trace.append(fixed)
            if t < self.num_iters - 1:
                offsets = self.offset_head_at(t)(tokens) * to_normalised  # (B, n*n, 2) o_t, PS-ViT eq. 5
                points = fixed + offsets  # (B, n*n, 2) p_{t+1}, PS-ViT eq. 1
        assert tokens is not None
        return tokens, trace


# ---------------------------------------------------------------------------------------------- model


class PSViT(nn.Module):
    """PS-ViT classifier: feature extractor, progressive sampling, vision transformer module, head.

    Keeps timm's contract: ``forward_features(x) -> (B, 1 + n*n, C)`` (after the final norm;
    ``(B, 1 + K'max, C)`` with ATS, padded rows exactly zero), ``forward_head(x, pre_logits=False)``
    (without ``token_mask`` all-zero rows are the padding, so ``forward_head(forward_features(x))``
    equals ``forward(x)``), ``num_classes``, ``num_features``, ``reset_classifier``, ``no_weight_decay``.
    The sampling points and ATS picks of a forward are emitted as trace records (module docstring).

    Args:
        img_size: expected input size (square int or (H, W)); see ``dynamic_img_size``.
        num_points: n, points per axis (the "/14" of PS-ViT-B/14).
        num_iters: N, sampling iterations (Table 2: 4).
        depth: N_v, layers of the vision transformer module (Table 2: Ti 8, B 10).
        embed_dim, num_heads, mlp_ratio: C, M and the FFN ratio (3, section 3.3).
        share_psm_weights: one transformer layer for all sampling iterations (Table 8).
        stem_widths: output widths of the two bottlenecks (the second must equal ``embed_dim``).
        block_fn: layer class for the vision transformer module (timm ``Block`` signature). ATS is
            applied afterwards by :func:`apply_ats_to_psvit`, which converts timm ``Block`` s in place.
        dynamic_img_size: accept any input size divisible by 4 (the points are normalised, so the model
            is size-agnostic); otherwise inputs must be exactly ``img_size``.
    """

    def __init__(self, img_size: int | tuple[int, int] = 224, in_chans: int = 3, num_classes: int = 1000,
                 global_pool: str = "token", embed_dim: int = 384, depth: int = 10, num_heads: int = 6,
                 mlp_ratio: float = 3.0, qkv_bias: bool = False, num_points: int = 14, num_iters: int = 4,
                 share_psm_weights: bool = False, stem_widths: tuple[int, int] = (256, 384), stem_mid_chs: int = 64,
                 drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, dynamic_img_size: bool = False,
                 block_fn: Callable[..., nn.Module] = Block,
                 norm_layer: Callable[..., nn.Module] | None = None) -> None:
        super().__init__()
        if global_pool not in ("token", "avg"):
            raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
        if stem_widths[-1] != embed_dim:
            raise ValueError(f"the feature extractor's last width {stem_widths[-1]} must equal embed_dim {embed_dim}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_points < 1:
            raise ValueError(f"number of sampling points per axis must be >= 1, got {num_points}")
        norm_layer = norm_layer or nn.LayerNorm  # eps 1e-5 as in the release (timm's ViT uses 1e-6)
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_points = num_points
        self.num_iters = num_iters
        self.dynamic_img_size = dynamic_img_size
        self.num_prefix_tokens = 1
        self.grad_checkpointing = False

        # Stochastic depth grows linearly over all N + N_v layers, sampling layers first (as in the release).
        dpr = calculate_drop_path_rates(drop_path_rate, num_iters + depth)  # on the CPU: may be built on meta
        self.stem = FeatureExtractor(in_chans, stem_widths, stem_mid_chs)
        self.psm = ProgressiveSampling(embed_dim, num_heads, num_points, num_iters, share_psm_weights, mlp_ratio,
                                       qkv_bias, proj_drop_rate, attn_drop_rate, dpr[:num_iters],
                                       norm_layer=norm_layer)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.blocks = nn.Sequential(*[
            block_fn(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                   proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[num_iters + i],
                   norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    # -- initialisation and timm plumbing ------------------------------------------------------------

    def init_weights(self) -> None:
        """Release init: trunc-normal(0.02) linears and class token, Kaiming convs, zero offset layers."""
        trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.psm.reset_offsets()  # o_t = 0 at the start: sampling begins on the regular grid

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^cls_token|^stem|^psm", "blocks": [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("token", "avg"):
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        dd = {"device": self.cls_token.device, "dtype": self.cls_token.dtype}  # where the model lives (meta too)
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    # -- forward ---------------------------------------------------------------------------------------

    def forward_sampling(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature extractor + progressive sampling.

        Returns:
            tokens ``T_N`` ``(B, n*n, C)`` and points ``(N, B, n*n, 2)`` (normalised (x, y), detached).
        """
        check_psvit_input(x, self.in_chans, self.img_size, self.dynamic_img_size)
        features = self.stem(x)  # (B, C, H/4, W/4) F
        tokens, trace = self.psm(features)  # (B, n*n, C), N x (B, n*n, 2)
        return tokens, torch.stack(trace)  # (N, B, n*n, 2)

    def forward_features_masked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) -> tokens (B, 1 + n*n | 1 + K'max, C) after the final norm (padded rows zero) and
        their mask (B, 1 + K'max), or None without ATS."""
        tokens, points = self.forward_sampling(x)  # (B, n*n, C), (N, B, n*n, 2)
        if recording():
            for t in range(points.shape[0]):
                emit(SampledPoints(t + 1, f"iteration {t + 1}", points[t][:, :, None, :]))  # (B, n*n, 1, 2) p_t
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, C)
        x = torch.cat([cls, tokens], dim=1)  # (B, 1 + n*n, C), PS-ViT eq. 6; position is already in T_N
        # Plain blocks run as a Sequential would; ATS blocks (after apply_ats) shrink the sequence to
        # (B, 1 + K'max, C) and pass a token mask on; ATS picks index the n*n tokens sampled at p_N.
        checkpoint = self.grad_checkpointing and self.training and not torch.jit.is_scripting()
        x, mask = forward_ats_blocks(self.blocks, x, checkpoint=checkpoint, candidates_xy=points[-1])
        # the norm maps zero padding to its bias: re-zero, the mask always applied (one multiply, no sync)
        return zero_padding(self.norm(x), mask, static=True), mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features_masked(x)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False,
                     token_mask: torch.Tensor | None = None) -> torch.Tensor:
        if token_mask is None and self.global_pool == "avg":
            token_mask = nonzero_token_mask(x)  # (B, N): padded rows of forward_features are exactly zero
        x = masked_pool(x, token_mask, self.global_pool, self.num_prefix_tokens)  # (B, C) class token or live mean
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, mask = self.forward_features_masked(x)
        return self.forward_head(x, token_mask=full_mask_if_none(mask, x))


def apply_ats_to_psvit(model: PSViT, stages: Sequence[int] | None = None, k: int | Sequence[int | None] | None = None,
                       ratio: float | Sequence[float | None] | None = None, floor: int = DEFAULT_K_FLOOR,
                       mode: str = "dynamic") -> PSViT:
    """Put ATS into PS-ViT's vision transformer module in place (ATS paper, section 4 and Table 1).

    ``stages`` are 0-based indices into ``model.blocks``; the default is the paper's "stages 1-9 of the
    transformer module", read with the ATS paper's own 0-based block numbering (its DeiT-S "3-11" are
    the last nine of blocks 0-11): every layer but the first, whose class attention is the noisiest
    (ATS appendix, Table A.4). ``k`` / ``ratio`` (one for all layers or one per layer) bound the kept
    tokens; neither means the paper's training setting K = the stage's input tokens. Parameters and
    state-dict keys are unchanged, so a PS-ViT checkpoint loads into the ATS model strictly.
    ``models.ats.set_ats_k`` changes K later without touching weights, ``models.ats.set_ats_mode`` the
    ``mode`` (``dynamic`` or ``static`` shapes).
    """
    stages = list(range(1, len(model.blocks))) if stages is None else list(stages)
    convert_blocks(model.blocks, stages, k=k, ratio=ratio, floor=floor, mode=mode)
    return model


# ----------------------------------------------------------------------------------- checkpoint adapter

# Release (github.com/yuexy/PS-ViT) module paths -> Glimpse's.
_RELEASE_STEM = {"stem.0.": "stem.conv1.", "stem.1.": "stem.bn1.", "stem.4.": "stem.layer1.0.",
                 "stem.5.": "stem.layer1.1."}


def _is_release_format(state_dict: dict[str, torch.Tensor]) -> bool:
    return "pos_layer.weight" in state_dict or any(k.startswith("ps_layers.") for k in state_dict)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: PSViT, *,
                         release_qk_scale: bool = True) -> dict[str, torch.Tensor]:
    """Adapt a PS-ViT state dict to ``model``: Glimpse's own pass through, the official release is converted.

    Release conversion (one place for every format difference, STYLE #9):

    * key paths: ``stem.{0,1,4,5}`` -> ``stem.{conv1,bn1,layer1.0,layer1.1}``, ``ps_layers.i.transformer_layer``
      -> ``psm.blocks.i``, ``ps_layers.i.offset_layer`` -> ``psm.offset_heads.i``, ``pos_layer`` -> ``psm.pos_embed``
      (the per-layer copies of the shared position layer are dropped), ``trans_layers.i`` -> ``blocks.i``;
    * coordinates: the release orders points (y, x) in pixel-index units (pixel centre at the integer);
      Glimpse uses normalised (x, y) with pixel centres at ``(i + 0.5) / size``. The position map's columns
      are swapped and its bias absorbs the half-pixel shift; the offset layers' output rows are swapped
      (both predict feature pixels). Only the initial grid differs (PS-ViT eq. 2 read as cell centres: half a
      feature pixel up-left of the release's), which the weights cannot absorb;
    * attention scale: the released weights were trained with ``qk_scale = C ** -0.5`` (the ``pretrained``
      branch of its variant functions) where timm's ``Block`` uses ``head_dim ** -0.5``; with
      ``release_qk_scale`` the query rows of ``qkv`` are rescaled by ``sqrt(head_dim / C)`` to compensate.

    Shared-weight models (Table 8) have no released weights; a non-shared checkpoint does not fit them
    and ``models.checkpoint.check_state_dict`` reports the extra layers.
    """
    if not _is_release_format(state_dict):
        return dict(state_dict)
    feat_h, feat_w = (s // FEATURE_STRIDE for s in model.img_size)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        new = key
        for old_prefix, new_prefix in _RELEASE_STEM.items():
            if key.startswith(old_prefix):
                new = new_prefix + key[len(old_prefix):]
        parts = key.split(".")
        if parts[0] == "ps_layers":
            idx, sub, rest = parts[1], parts[2], ".".join(parts[3:])
            if sub == "position_layer":
                continue  # the same tensor as pos_layer, registered once per iteration in the release
            if sub == "offset_layer":
                value = value.flip(0)  # (2, C) / (2,) rows (dy, dx) -> (dx, dy)
                new = f"psm.offset_heads.{idx}.{rest}"
            elif sub == "transformer_layer":
                new = f"psm.blocks.{idx}.{rest}"
            else:
                raise ValueError(f"unknown key {key!r} in a PS-ViT release checkpoint")
        elif parts[0] == "trans_layers":
            new = "blocks." + ".".join(parts[1:])
        elif parts[0] == "pos_layer":
            new = "psm.pos_embed." + parts[1]
            if parts[1] == "weight":
                value = value.flip(1)  # (C, 2): columns (y, x) -> (x, y)
        out[new] = value
    if "pos_layer.weight" in state_dict and "pos_layer.bias" in state_dict:
        # release: P = W_r (p_y - 0.5/H_f, p_x - 0.5/W_f) + b_r in our normalised coordinates.
        w_r = state_dict["pos_layer.weight"]  # (C, 2) columns (y, x)
        out["psm.pos_embed.bias"] = state_dict["pos_layer.bias"] - 0.5 * (w_r[:, 0] / feat_h + w_r[:, 1] / feat_w)
    if release_qk_scale:
        for key in [k for k in out if k.endswith("attn.qkv.weight")]:
            qkv = out[key].clone()  # (3C, C)
            dim = qkv.shape[1]
            num_heads = model.psm.blocks[0].attn.num_heads
            qkv[:dim] *= (1.0 / num_heads) ** 0.5  # sqrt(head_dim / C)
            out[key] = qkv
    return out


# -------------------------------------------------------------------------------------------- configs


def _cfg(**kwargs) -> dict:
    # Evaluation as in section 4.1: resize to 256, centre crop 224 (crop_pct 0.875).
    return {"num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
            "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
            "fixed_input_size": True,  # inputs must be img_size unless built with dynamic_img_size=True
            "first_conv": "stem.conv1", "classifier": "head", "paper_ids": "arXiv:2108.01684",
            "origin_url": "https://github.com/yuexy/PS-ViT",
            **kwargs}


default_cfgs = {name: _cfg() for name in (
    "psvit_ti_14", "psvit_b_10", "psvit_b_14", "psvit_b_18",
    "psvit_ti_14_shared", "psvit_b_10_shared", "psvit_b_14_shared", "psvit_b_18_shared",
    "psvit_b_14_ats", "psvit_b_18_ats")}


def _create_psvit(variant: str, pretrained: bool = False, *, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None, **kwargs) -> PSViT:
    # timm's factory passes device= / dtype=: build on that device (meta: no memory) and cast once.
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = build_model_with_cfg(PSViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)
    return model if dtype is None else model.to(dtype=dtype)


# Table 2: N = 4 sampling iterations; Ti: N_v = 8, C = 192, M = 3; B: N_v = 10, C = 384, M = 6.
_TI = {"embed_dim": 192, "depth": 8, "num_heads": 3, "num_iters": 4, "stem_widths": (192, 192)}
_B = {"embed_dim": 384, "depth": 10, "num_heads": 6, "num_iters": 4, "stem_widths": (256, 384)}


@register_glimpse
def psvit_ti_14(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-Ti/14 (Table 3): 14 x 14 points, 4.8M params, 1.6 GFLOPs."""
    return _create_psvit("psvit_ti_14", pretrained, **{**_TI, "num_points": 14, **kwargs})


@register_glimpse
def psvit_b_10(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/10 (Table 3): 10 x 10 points, 21.3M params, 3.1 GFLOPs."""
    return _create_psvit("psvit_b_10", pretrained, **{**_B, "num_points": 10, **kwargs})


@register_glimpse
def psvit_b_14(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/14 (Table 3): 14 x 14 points, 21.3M params, 5.4 GFLOPs."""
    return _create_psvit("psvit_b_14", pretrained, **{**_B, "num_points": 14, **kwargs})


@register_glimpse
def psvit_b_18(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/18 (Table 3): 18 x 18 points, 21.3M params, 8.8 GFLOPs."""
    return _create_psvit("psvit_b_18", pretrained, **{**_B, "num_points": 18, **kwargs})


@register_glimpse
def psvit_ti_14_shared(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-Ti-dagger/14 (Table 8): one sampling layer shared by the 4 iterations, 3.7M params."""
    return _create_psvit("psvit_ti_14_shared", pretrained,
                         **{**_TI, "num_points": 14, "share_psm_weights": True, **kwargs})


@register_glimpse
def psvit_b_10_shared(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B-dagger/10 (Table 8): 16.9M params."""
    return _create_psvit("psvit_b_10_shared", pretrained,
                         **{**_B, "num_points": 10, "share_psm_weights": True, **kwargs})


@register_glimpse
def psvit_b_14_shared(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B-dagger/14 (Table 8): 16.9M params."""
    return _create_psvit("psvit_b_14_shared", pretrained,
                         **{**_B, "num_points": 14, "share_psm_weights": True, **kwargs})


@register_glimpse
def psvit_b_18_shared(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B-dagger/18 (Table 2's B-dagger with n = 18): 16.9M params."""
    return _create_psvit("psvit_b_18_shared", pretrained,
                         **{**_B, "num_points": 18, "share_psm_weights": True, **kwargs})


def _create_psvit_ats(variant: str, pretrained: bool = False, *, ats_stages: Sequence[int] | None = None,
                      ats_k: int | Sequence[int | None] | None = None,
                      ats_ratio: float | Sequence[float | None] | None = None, ats_floor: int = DEFAULT_K_FLOOR,
                      ats_mode: str = "dynamic", **kwargs) -> PSViT:
    model = _create_psvit(variant, pretrained, **kwargs)
    return apply_ats_to_psvit(model, ats_stages, k=ats_k, ratio=ats_ratio, floor=ats_floor, mode=ats_mode)


@register_glimpse
def psvit_b_14_ats(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/14 + ATS in layers 1-9 of the vision transformer module (ATS Table 1: 3.7 GFLOPs on
    average over ImageNet with fine-tuned weights; ``ats_stages`` / ``ats_k`` / ``ats_ratio`` / ``ats_floor``)."""
    return _create_psvit_ats("psvit_b_14_ats", pretrained, **{**_B, "num_points": 14, **kwargs})


@register_glimpse
def psvit_b_18_ats(pretrained: bool = False, **kwargs) -> PSViT:
    """PS-ViT-B/18 + ATS in layers 1-9 of the vision transformer module (ATS Table 1: 5.6 GFLOPs average)."""
    return _create_psvit_ats("psvit_b_18_ats", pretrained, **{**_B, "num_points": 18, **kwargs})
