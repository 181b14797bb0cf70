"""SparseFormer: Sparse Visual Recognition via Limited Latent Tokens (Gao, Tong, Wang, Shou; ICLR 2024).

Paper: ``/work/shared/papers/sparseformer.txt``. An image is represented by N latent tokens, each an
embedding ``t`` (d) and an RoI ``b = (x, y, w, h)`` normalised to the image (SparseFormer eq. 1). A lightweight early
convolution makes a stride-4 feature map; every *sampling stage* then

1. adjusts each token's RoI with detector-style deltas from the token (SparseFormer eqs. 7-9),
2. generates P sampling offsets per token from a linear layer (SparseFormer eq. 2), normalises them per token by three
   standard deviations and places them in the RoI (SparseFormer eq. 3),
3. samples the feature map bilinearly at those points (``models.point_sampling.sample_points``),
4. decodes the P x C samples with *adaptive mixing* (SparseFormer eqs. 4-6: channel mixing then spatial mixing, both
   with weights generated from the token), a linear map to d, and a residual add.

The *focusing transformer* is one such stage plus self-attention and an FFN, repeated L_f = 4 times with
shared weights; a linear bridge widens the tokens from d_f to d_c; the *cortex transformer* has L_c standard
layers, the first of which also adjusts RoIs and samples. The head averages the tokens, applies LayerNorm
and a linear classifier (section 3.2, Table 1).

Details the paper leaves open follow the authors' ImageNet release (showlab/sparseformer), so that its
checkpoints convert exactly (``checkpoint_filter_fn``):

* layer order inside a sampling layer: self-attention, RoI adjustment, sampling + mixing, FFN;
* 64 attention heads at every width (the paper states no head count);
* SparseFormer eq. 3 is applied without its 0.5 factor (``x + dx * w`` with ``dx`` normalised by 3 std): the release
  does so, and only then does the initial 6 x 6 grid of points span the RoI (with the factor it would cover
  its central 45 %);
* RoI deltas and sampling-offset layers carry a LayerNorm whose weight starts at ``1/sqrt(d)``; the
  gradient reaching each sampling coordinate is clamped to one feature pixel (``point_grad_limit``).

Inside :func:`models.trace.record` every sampling stage emits its geometry as a
:class:`models.trace.SampledPoints` (RoIs and points, Figures 3-4); nothing is stored on the model.
VideoSparseFormer (section 3.2) lives in ``models/video_sparseformer.py`` and reuses these blocks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention, Mlp, drop_path, trunc_normal_
from timm.models import build_model_with_cfg
from torch import Tensor

from models.checkpoint import CheckpointMismatchError
from models.point_sampling import sample_points
from models.registry import register_glimpse
from models.trace import SampledPoints, emit, recording
from models.weight_init import init_linear_and_norm_

__all__ = [
    "SparseFormer", "SparseFormerBlock", "SparseSampler", "AdaptiveMixing", "MixingMatmuls", "SamplingOffsets",
    "RoIAdjust", "EarlyConv", "adjust_rois", "offsets_to_points", "grid_rois",
    "grid_offsets", "channel_normalize", "checkpoint_filter_fn", "analytic_gflops",
]

LN_EPS = 1e-6  # as in the release


# ----------------------------------------------------------------------------------------------------------
# Helpers: geometry (pure functions on tensors)
# ----------------------------------------------------------------------------------------------------------

def channel_normalize(x: Tensor, dim: int = 1, eps: float = 1e-5) -> Tensor:
    """Parameter-free normalisation over channels (the early convolution's last step): zero mean, unit variance."""
    var, mean = torch.var_mean(x, dim=dim, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def adjust_rois(rois: Tensor, deltas: Tensor) -> Tensor:
    """RoI adjustment, SparseFormer eqs. 7-8, for any number of axes A (2: x, y; 3: x, y, t).

    Args:
        rois: ``(..., 2A)`` as (centre_1..A, size_1..A), normalised to [0, 1] of the input.
        deltas: ``(..., 2A)`` as (t_x, t_y[, t_t], t_w, t_h[, t_l]).
    Returns:
        ``(..., 2A)``: centre + delta * size, size * exp(delta).
    """
    axes = rois.shape[-1] // 2
    centre, size = rois[..., :axes], rois[..., axes:]  # (..., A) each
    centre = centre + deltas[..., :axes] * size  # SparseFormer eq. 7
    size = size * torch.exp(deltas[..., axes:])  # SparseFormer eq. 8
    return torch.cat([centre, size], dim=-1)


def offsets_to_points(rois: Tensor, offsets: Tensor, eps: float = 1e-5) -> Tensor:
    """Absolute sampling points from per-token offsets (SparseFormer eq. 3 with the per-token normalisation).

    Args:
        rois: ``(B, N, 2A)`` RoIs (centre, size).
        offsets: ``(B, N, P, A)`` raw offsets from SparseFormer eq. 2.
    Returns:
        ``(B, N, P, A)`` points normalised to [0, 1] of the feature map / clip.

    Each axis of each token's offsets is standardised over its P points and divided by 3 (so ~87 % of
    Gaussian offsets fall inside the RoI, and a uniform grid spans +-0.45 of its size), then scaled by the
    RoI size and added to the RoI centre. The release omits SparseFormer eq. 3's factor 0.5; we follow it (module doc).
    """
    axes = offsets.shape[-1]
    mean = offsets.mean(dim=-2, keepdim=True)  # (B, N, 1, A)
    std = offsets.std(dim=-2, keepdim=True) + eps  # (B, N, 1, A) eps: all-equal offsets map to the centre
    normed = (offsets - mean) / (3.0 * std)  # (B, N, P, A)
    centre, size = rois[..., None, :axes], rois[..., None, axes:]  # (B, N, 1, A) each
    return centre + normed * size  # (B, N, P, A)


def grid_rois(num_tokens: int, size: float = 0.5) -> Tensor:
    """Initial RoIs (appendix A.3): centres on a grid, width and height ``size`` of the image.

    ``(N, 4)`` as (x, y, w, h), row-major over a ``rows x cols`` grid with ``cols = ceil(sqrt(N))``. As in
    the release, the grid keeps every RoI inside the image: the centres run from ``size/2`` to ``1 - size/2``
    (7 x 7 tokens: 0.25, 0.333, ..., 0.75). A single row or column sits at the middle.
    """
    if num_tokens < 1:
        raise ValueError(f"num_latent_tokens must be >= 1, got {num_tokens}")
    cols = math.ceil(math.sqrt(num_tokens))
    rows = math.ceil(num_tokens / cols)

    def axis(n: int) -> Tensor:
        if n == 1:
            return torch.full((1,), 0.5)
        return size / 2 + torch.arange(n, dtype=torch.float32) / (n - 1) * (1 - size)

    ys, xs = torch.meshgrid(axis(rows), axis(cols), indexing="ij")  # (rows, cols) each
    centres = torch.stack([xs, ys], dim=-1).reshape(-1, 2)[:num_tokens]  # (N, 2)
    return torch.cat([centres, torch.full_like(centres, size)], dim=-1)  # (N, 4)


def grid_offsets(num_points: int, generator: torch.Generator | None = None) -> Tensor:
    """Initial sampling offsets (appendix A.3): a ``sqrt(P) x sqrt(P)`` grid of cell centres minus 0.5.

    ``(P, 2)`` as (x, y) in [-0.5, 0.5]. A P that is not a square gets uniform random offsets (release).
    """
    root = math.isqrt(num_points)
    if root * root != num_points:
        return torch.rand(num_points, 2, generator=generator) - 0.5
    centres = (torch.arange(root, dtype=torch.float32) + 0.5) / root - 0.5  # (root,)
    ys, xs = torch.meshgrid(centres, centres, indexing="ij")
    return torch.stack([xs, ys], dim=-1).reshape(num_points, 2)  # (P, 2) row-major


class _ClampGrad(torch.autograd.Function):
    """Identity forward; backward clamps the gradient per last-axis entry to +-limit (release's RestrictGradNorm)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, limit: Tensor) -> Tensor:
        ctx.save_for_backward(limit)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (limit,) = ctx.saved_tensors
        return torch.maximum(torch.minimum(grad, limit), -limit), None


def clamp_point_grad(points: Tensor, feature_sizes: Sequence[int], pixels: float | None) -> Tensor:
    """Clamp the gradient reaching sampling points to ``pixels`` feature pixels per axis (None: no clamp).

    Bilinear interpolation gives gradients that only see the 2^A nearest pixels; the release bounds them to
    one pixel so that a single noisy gradient cannot throw a point across the map. ``feature_sizes`` are in
    point-axis order (W, H[, T]). With a fp16 ``GradScaler`` the clamp acts on scaled gradients: pass
    ``point_grad_limit=None`` (or the scaled limit) there; bf16 / fp32 training is unaffected.
    """
    if pixels is None or not points.requires_grad:
        return points
    limit = torch.tensor([pixels / s for s in feature_sizes], dtype=points.dtype, device=points.device)
    return _ClampGrad.apply(points, limit)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------

def _init_unit_norm(norm: nn.LayerNorm) -> None:
    # Release: LayerNorms in front of generated weights / geometry start with weight 1/sqrt(d), so the
    # normalised token has unit norm rather than unit variance and the generated values start small.
    nn.init.constant_(norm.weight, norm.normalized_shape[0] ** -0.5)
    nn.init.zeros_(norm.bias)


class EarlyConv(nn.Module):
    """Early convolution (section 4): 7x7 stride-2 conv to ``dim`` channels, ReLU, 3x3 stride-2 max-pool,
    then a parameter-free normalisation over channels. ``(B, 3, H, W) -> (B, dim, H/4, W/4)``."""

    def __init__(self, in_chans: int = 3, dim: int = 96) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chans, dim, kernel_size=7, stride=2, padding=3, bias=True)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(F.relu(self.conv(x)))  # (B, dim, H/4, W/4)
        return channel_normalize(x, dim=1)


class RoIAdjust(nn.Module):
    """SparseFormer eq. 9: deltas ``(t_x, t_y[, t_t], t_w, t_h[, t_l]) = Linear(LN(t))``, zero-initialised (no move at start)."""

    def __init__(self, dim: int, num_axes: int = 2) -> None:
        super().__init__()
        self.num_axes = num_axes
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj = nn.Linear(dim, 2 * num_axes, bias=False)

    def init_weights(self) -> None:
        _init_unit_norm(self.norm)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))  # (B, N, 2A)


class SamplingOffsets(nn.Module):
    """SparseFormer eq. 2: P offsets per token from ``Linear(LN(t)) + bias``; weight zero, bias on a grid at start (A.3).

    ``bias`` is ``(P, A)``; for videos (A = 3) its temporal column is set by the video model.
    """

    def __init__(self, dim: int, num_points: int, num_axes: int = 2) -> None:
        super().__init__()
        self.num_points, self.num_axes = num_points, num_axes
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)
        self.proj = nn.Linear(dim, num_points * num_axes, bias=False)
        self.bias = nn.Parameter(torch.zeros(num_points, num_axes))

    def init_weights(self) -> None:
        _init_unit_norm(self.norm)
        nn.init.zeros_(self.proj.weight)
        with torch.no_grad():
            self.bias.zero_()
            self.bias[:, :2] = grid_offsets(self.num_points)

    def forward(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        offsets = self.proj(self.norm(x)).reshape(b, n, self.num_points, self.num_axes)  # (B, N, P, A)
        return offsets + self.bias  # (B, N, P, A)


class MixingMatmuls(nn.Module):
    """The two per-token matmuls of adaptive mixing (SparseFormer eqs. 5-6), with their biases and GELUs.

    A separate parameter-free module so that FLOP counters can report them apart: the paper's GFLOPs leave
    them out (fvcore had no rule for them), so ``exclude_from_paper_flops`` marks them.
    """

    exclude_from_paper_flops = True

    def forward(self, x: Tensor, channel_w: Tensor, spatial_w: Tensor, channel_b: Tensor, spatial_b: Tensor) -> Tensor:
        # x (BN, P, C); channel_w (BN, C, C); spatial_w (BN, P, P); channel_b (C,); spatial_b (P,)
        x = F.gelu(torch.bmm(x, channel_w) + channel_b)  # (BN, P, C)  SparseFormer eq. 5: x M_c
        return F.gelu(torch.bmm(spatial_w, x) + spatial_b[:, None])  # (BN, P, C)  SparseFormer eq. 6: M_s x


class AdaptiveMixing(nn.Module):
    """Adaptive feature decoding (SparseFormer eqs. 4-6) followed by the linear map to d.

    ``F: d -> C*C + P*P`` is two linear layers with hidden width d/4 (after a LayerNorm); its last layer
    starts at zero weight and Xavier-initialised bias, so at first the mixing is a static (token-independent)
    convolution (appendix A.3).
    """

    def __init__(self, dim: int, feat_dim: int, num_points: int) -> None:
        super().__init__()
        self.feat_dim, self.num_points = feat_dim, num_points
        self.generator = nn.Sequential(
            nn.LayerNorm(dim, eps=LN_EPS),
            nn.Linear(dim, dim // 4),
            nn.Linear(dim // 4, feat_dim * feat_dim + num_points * num_points),
        )
        self.channel_bias = nn.Parameter(torch.zeros(feat_dim))
        self.spatial_bias = nn.Parameter(torch.zeros(num_points))
        self.mixing = MixingMatmuls()
        self.out_proj = nn.Linear(num_points * feat_dim, dim)

    def init_weights(self) -> None:
        _init_unit_norm(self.generator[0])
        last = self.generator[-1]
        nn.init.zeros_(last.weight)
        c2 = self.feat_dim * self.feat_dim
        with torch.no_grad():
            nn.init.xavier_uniform_(last.bias[:c2].view(self.feat_dim, self.feat_dim))
            nn.init.xavier_uniform_(last.bias[c2:].view(self.num_points, self.num_points))
            self.channel_bias.zero_()
            self.spatial_bias.zero_()

    def forward(self, sampled: Tensor, x: Tensor) -> Tensor:
        b, n, p, c = sampled.shape  # (B, N, P, C)
        params = self.generator(x).reshape(b * n, -1)  # (BN, C*C + P*P)  SparseFormer eq. 4
        channel_w, spatial_w = params.split([c * c, p * p], dim=-1)
        channel_w = channel_w.reshape(b * n, c, c)  # (BN, C, C)
        spatial_w = spatial_w.reshape(b * n, p, p)  # (BN, P, P)
        out = self.mixing(sampled.reshape(b * n, p, c).to(params.dtype), channel_w, spatial_w,
                          self.channel_bias.to(params.dtype), self.spatial_bias.to(params.dtype))  # (BN, P, C)
        return self.out_proj(out.reshape(b, n, p * c))  # (B, N, d)


class SparseSampler(nn.Module):
    """One sampling stage's "cross attention": RoI adjustment, point generation, sampling, adaptive mixing.

    ``forward(x, rois, features, drop_prob) -> (update, rois, points)``; ``update`` (B, N, d) is to be added
    to the tokens; ``rois`` are the adjusted RoIs; ``points`` the absolute sampling points (B, N, P, A).
    """

    def __init__(self, dim: int, feat_dim: int, num_points: int, num_axes: int = 2,
                 point_grad_limit: float | None = 1.0) -> None:
        super().__init__()
        self.num_axes = num_axes
        self.point_grad_limit = point_grad_limit
        self.adjust = RoIAdjust(dim, num_axes)
        self.offsets = SamplingOffsets(dim, num_points, num_axes)
        self.mixing = AdaptiveMixing(dim, feat_dim, num_points)

    def init_weights(self) -> None:
        self.adjust.init_weights()
        self.offsets.init_weights()
        self.mixing.init_weights()

    def forward(self, x: Tensor, rois: Tensor, features: Tensor, drop_prob: float = 0.0
                ) -> tuple[Tensor, Tensor, Tensor]:
        # Geometry in float32 whatever the autocast dtype: coordinates need more than bf16's 8 bits.
        deltas = drop_path(self.adjust(x).float(), drop_prob, self.training)  # (B, N, 2A)
        rois = adjust_rois(rois.float(), deltas)  # (B, N, 2A)
        points = offsets_to_points(rois, self.offsets(x).float())  # (B, N, P, A)
        # Feature sizes in point-axis order: (W, H) or (W, H, T).
        sizes = list(reversed(features.shape[2:]))
        sampled = sample_points(features, clamp_point_grad(points, sizes, self.point_grad_limit))  # (B, N, P, C)
        update = self.mixing(sampled, x)  # (B, N, d)
        return drop_path(update, drop_prob, self.training), rois, points


class SparseFormerBlock(nn.Module):
    """A latent transformer layer: self-attention, [sampling stage], FFN; pre-norm residuals.

    With ``sampler=None`` it is a standard transformer layer (cortex layers 2..L_c). The drop-path rate is an
    argument of ``forward`` because the focusing block runs L_f times with different rates.
    """

    def __init__(self, dim: int, num_heads: int = 64, mlp_ratio: float = 4.0, sampler: SparseSampler | None = None
                 ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.sampler = sampler
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, rois: Tensor, features: Tensor, drop_prob: float = 0.0
                ) -> tuple[Tensor, Tensor, Tensor | None]:
        x = x + drop_path(self.attn(self.norm1(x)), drop_prob, self.training)  # (B, N, d)
        points = None
        if self.sampler is not None:
            update, rois, points = self.sampler(x, rois, features, drop_prob)
            x = x + update.to(x.dtype)  # (B, N, d)
        x = x + drop_path(self.mlp(self.norm2(x)), drop_prob, self.training)  # (B, N, d)
        return x, rois, points


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

class SparseFormer(nn.Module):
    """SparseFormer for images (timm contract: ``forward_features -> (B, N, d_c)``, ``forward_head``).

    Args:
        num_classes: classifier outputs (0: no classifier).
        in_chans: input channels.
        img_size: nominal input size (pretrained cfg, FLOPs); any size >= ``min_input_size`` runs, because
            tokens sample normalised coordinates (Table 4 fine-tunes the same model at 384 and 512).
        num_latent_tokens: N.
        dims: ``(d_f, d_c)`` focusing and cortex widths.
        depths: ``(L_f, L_c)``: repeats of the shared focusing layer and cortex layers.
        num_points: P sampling points per token and stage.
        stem_dim: C, channels of the early convolution (96).
        num_heads: attention heads (64 in the release at every width).
        mlp_ratio: FFN expansion.
        roi_size: initial RoI width/height (0.5, appendix A.3 / Table 9).
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth, linear over the L_f + L_c layer applications.
        point_grad_limit: clamp of sampling-point gradients in feature pixels (None: off).
    """

    num_axes = 2  # (x, y); the video subclass samples (x, y, t)
    min_input_size = 16  # smaller inputs leave a feature map under 4 x 4

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, img_size: int | tuple[int, int] = 224,
                 num_latent_tokens: int = 49, dims: tuple[int, int] = (256, 512), depths: tuple[int, int] = (4, 8),
                 num_points: int = 36, stem_dim: int = 96, num_heads: int = 64, mlp_ratio: float = 4.0,
                 roi_size: float = 0.5, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 point_grad_limit: float | None = 1.0, global_pool: str = "avg") -> None:
        super().__init__()
        if len(dims) != 2 or len(depths) != 2:
            raise ValueError(f"dims and depths must be (focusing, cortex) pairs, got dims={dims}, depths={depths}")
        if depths[0] < 1 or depths[1] < 1:
            raise ValueError(f"depths must be >= 1 (the first cortex layer samples), got {depths}")
        if num_points < 2:
            raise ValueError(f"num_points must be >= 2 (offsets are standardised over the points), got {num_points}")
        if global_pool != "avg":
            raise ValueError(f"SparseFormer pools by averaging tokens; global_pool={global_pool!r} is not supported")
        if not 0.0 < roi_size <= 1.0:
            raise ValueError(f"roi_size is a fraction of the image in (0, 1], got {roi_size}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.num_latent_tokens = num_latent_tokens
        self.num_points = num_points
        self.roi_size = roi_size
        self.focus_repeats, cortex_depth = depths
        d_f, d_c = dims
        self.num_features = self.head_hidden_size = self.embed_dim = d_c
        self.global_pool = global_pool

        self.stem = EarlyConv(in_chans, stem_dim)
        num_tokens = self.total_latent_tokens
        self.latent_embed = nn.Parameter(torch.zeros(num_tokens, d_f))  # (N, d_f)
        self.latent_rois = nn.Parameter(torch.zeros(num_tokens, 2 * self.num_axes))  # (N, 2A)

        def sampler(dim: int) -> SparseSampler:
            return SparseSampler(dim, stem_dim, num_points, self.num_axes, point_grad_limit)

        # One set of parameters applied L_f times (the focusing transformer shares weights across repeats).
        self.focus = SparseFormerBlock(d_f, num_heads, mlp_ratio, sampler(d_f))
        self.bridge = nn.Sequential(nn.Linear(d_f, d_c), nn.LayerNorm(d_c, eps=LN_EPS))
        self.cortex = nn.ModuleList(
            [SparseFormerBlock(d_c, num_heads, mlp_ratio, sampler(d_c) if i == 0 else None) for i in range(cortex_depth)])
        self.norm = nn.LayerNorm(d_c, eps=LN_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(d_c, num_classes) if num_classes > 0 else nn.Identity()

        steps = self.focus_repeats + cortex_depth  # linear stochastic depth over every layer application
        rates = [drop_path_rate * i / max(steps - 1, 1) for i in range(steps)]
        self.focus_drop_path, self.cortex_drop_path = rates[:self.focus_repeats], rates[self.focus_repeats:]
        self.init_weights()

    # -- construction ---------------------------------------------------------------------------------------
    @property
    def total_latent_tokens(self) -> int:
        """Number of latent tokens the model carries (N; the video model multiplies by its inflation)."""
        return self.num_latent_tokens

    def init_weights(self) -> None:
        """Appendix A.3: linear layers trunc-normal(0.02) with zero bias, then the geometry-specific inits."""
        init_linear_and_norm_(self)
        for m in self.modules():
            if isinstance(m, SparseSampler):
                m.init_weights()
        trunc_normal_(self.latent_embed, std=1.0, a=-2.0, b=2.0)  # release: unit-scale token embeddings
        with torch.no_grad():
            self.latent_rois.copy_(self.initial_rois())

    def initial_rois(self) -> Tensor:
        """``(N, 4)`` grid RoIs of half the image (appendix A.3)."""
        return grid_rois(self.num_latent_tokens, self.roi_size)

    # -- timm contract ----------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # Decay would pull RoI centres and sizes towards 0 (the release exempts them, and only them).
        return {"latent_rois"}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"SparseFormer pools by averaging tokens; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def check_input(self, x: Tensor) -> None:
        """Refuse inputs the model cannot take, naming the offending value."""
        if x.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects images (B, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(f"{type(self).__name__} expects {self.in_chans} input channels, got {x.shape[1]} "
                             f"(shape {tuple(x.shape)})")
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} is below the minimum {self.min_input_size} px")

    def extract_features(self, x: Tensor) -> Tensor:
        """Early convolution: ``(B, 3, H, W) -> (B, C, H/4, W/4)``."""
        return self.stem(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W) -> (B, N, d_c)`` latent tokens.

        Inside :func:`models.trace.record` each sampling stage emits a :class:`models.trace.SampledPoints`:
        stage 1..L_f the focusing repeats ("focusing i"), then the first cortex layer ("cortex 1"), with
        its RoIs ``(B, N, 2A)`` after the adjustment and points ``(B, N, P, A)``, normalised to the input.
        """
        self.check_input(x)
        features = self.extract_features(x)  # (B, C, H/4, W/4) or (B, C, T, H/4, W/4)
        b = x.shape[0]
        tokens = self.latent_embed[None].expand(b, -1, -1)  # (B, N, d_f)
        rois = self.latent_rois[None].expand(b, -1, -1)  # (B, N, 2A)
        traced, stage = recording(), 0
        for i in range(self.focus_repeats):
            tokens, rois, points = self.focus(tokens, rois, features, self.focus_drop_path[i])
            stage += 1
            if traced:
                emit(SampledPoints(stage, f"focusing {i + 1}", points, rois))
        tokens = self.bridge(tokens)  # (B, N, d_c)
        for i, block in enumerate(self.cortex):
            tokens, rois, points = block(tokens, rois, features, self.cortex_drop_path[i])
            if points is not None:
                stage += 1
                if traced:
                    emit(SampledPoints(stage, f"cortex {i + 1}", points, rois))
        return tokens

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(x.mean(dim=1))  # (B, d_c) mean over tokens, then LayerNorm
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def analytic_gflops(model: SparseFormer, input_size: Sequence[int]) -> tuple[float, float]:
    """Closed-form GFLOPs of a (Video)SparseFormer, in fvcore's convention: ``(all, adaptive-mixing matmuls)``.

    ``input_size`` is ``(C, H, W)`` or ``(C, T, H, W)``. One multiply-add = 1; LayerNorm 5 per element and
    grid sampling 4 per output element (fvcore's rules); element-wise ops 0. The paper-comparable figure is
    ``all - mixing``. Useful to see where the cost goes (e.g. the quadratic attention term ``2 N^2 d`` that
    dominates at large inflation) without tracing; the tests check it against ``models.flops.count_flops``.
    """
    *lead, h, w = input_size
    frames = lead[1] if len(lead) == 2 else 1
    n, p = model.total_latent_tokens, model.num_points
    c = model.stem.conv.out_channels
    d_f, d_c = model.focus.norm1.normalized_shape[0], model.num_features
    stem = frames * c * lead[0] * 49 * ((h + 1) // 2) * ((w + 1) // 2)  # 7x7 stride-2 conv, per frame

    def layer(block: SparseFormerBlock, d: int) -> tuple[int, int]:
        hidden = block.mlp.fc1.out_features
        macs = n * (4 * d * d + 2 * d * hidden) + 2 * n * n * d + 2 * 5 * n * d  # qkv+proj, FFN, attention, 2 LN
        mix = 0
        if block.sampler is not None:
            a = model.num_axes
            macs += n * d * (2 * a + p * a) + 2 * 5 * n * d  # RoI deltas and offsets, with their LayerNorms
            macs += 5 * n * d + n * (d * (d // 4) + (d // 4) * (c * c + p * p))  # weight generator F (SparseFormer eq. 4)
            macs += n * p * c * 4 + n * p * c * d  # sampling, linear map to d
            mix = n * (p * c * c + p * p * c)  # SparseFormer eqs. 5-6
        return macs + mix, mix

    focus, focus_mix = layer(model.focus, d_f)
    cortex = [layer(block, d_c) for block in model.cortex]
    head = 5 * d_c + (d_c * model.num_classes if model.num_classes > 0 else 0)
    total = stem + model.focus_repeats * focus + n * d_f * d_c + 5 * n * d_c + sum(t for t, _ in cortex) + head
    mix = model.focus_repeats * focus_mix + sum(m for _, m in cortex)
    return total / 1e9, mix / 1e9


# ----------------------------------------------------------------------------------------------------------
# Checkpoint adapter
# ----------------------------------------------------------------------------------------------------------

def _convert_release(state_dict: dict[str, Tensor], model: SparseFormer) -> dict[str, Tensor]:
    """Map the authors' ImageNet release (``imagenet/models/sparseformer.py`` layout) to ours.

    Release layout: ``layers.0`` = focusing unit, ``layers.1`` = bridge (Linear, LN), ``layers.2..`` =
    cortex; RoIs stored as corners (x1, y1, x2, y2); attention as ``nn.MultiheadAttention``.
    """
    cortex_depth = len(model.cortex)
    unit_map = {
        "ln_attn.": "norm1.", "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
        "attn.out_proj.": "attn.proj.", "ffn.0.": "norm2.", "ffn.1.": "mlp.fc1.", "ffn.3.": "mlp.fc2.",
        "roi_offset_module.0.": "sampler.offsets.norm.", "roi_offset_module.1.": "sampler.offsets.proj.",
        "roi_offset_bias": "sampler.offsets.bias", "roi_adjust_module.0.": "sampler.adjust.norm.",
        "roi_adjust_module.1.": "sampler.adjust.proj.",
        "adaptive_mixing.parameter_generator.": "sampler.mixing.generator.",
        "adaptive_mixing.m_beta": "sampler.mixing.channel_bias", "adaptive_mixing.s_beta": "sampler.mixing.spatial_bias",
        "adaptive_mixing.out_proj.": "sampler.mixing.out_proj.",
    }
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key == "initial_roi.weight":  # corners -> (x, y, w, h)
            xy = (value[:, :2] + value[:, 2:]) / 2
            out["latent_rois"] = torch.cat([xy, (value[:, 2:] - value[:, :2]).abs()], dim=1)
        elif key == "initial_embedding.weight":
            out["latent_embed"] = value
        elif key.startswith("feat_extractor.conv1."):
            out["stem.conv." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("head.norm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("head.classifier."):
            out["head." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            index = int(index)
            if index == 1:
                out["bridge." + rest] = value
                continue
            prefix = "focus." if index == 0 else f"cortex.{index - 2}."
            if index - 2 >= cortex_depth:
                raise CheckpointMismatchError(f"checkpoint has cortex layer {index - 2} ({key}); the model has "
                                              f"{cortex_depth} cortex layers")
            for old, new in unit_map.items():
                if rest.startswith(old):
                    rest = new + rest[len(old):]
                    break
            else:
                raise CheckpointMismatchError(f"unrecognised key {key!r} in a SparseFormer release checkpoint")
            if rest == "sampler.offsets.bias":
                value = value.reshape(-1, 2)  # (P*2,) -> (P, 2)
            out[prefix + rest] = value
        else:
            raise CheckpointMismatchError(f"unrecognised key {key!r} in a SparseFormer release checkpoint")
    return out


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Adapt an image SparseFormer checkpoint to ``model``.

    Glimpse's own checkpoints pass through; the authors' ImageNet release (keys ``initial_roi.weight``,
    ``layers.N...``) is converted. Keys or shapes that still do not fit are reported by the loader.
    """
    if "initial_roi.weight" in state_dict:
        return _convert_release(state_dict, model)
    return dict(state_dict)


# ----------------------------------------------------------------------------------------------------------
# Configs and variants
# ----------------------------------------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv", "classifier": "head", "paper_ids": "arXiv:2304.03768", **kwargs,
    }


default_cfgs = {
    "sparseformer_tiny": _cfg(),
    "sparseformer_small": _cfg(),
    "sparseformer_base": _cfg(),
}


def _create_sparseformer(variant: str, pretrained: bool = False, **kwargs: Any) -> SparseFormer:
    # The cfg comes from timm's registry (``default_cfgs`` below) unless create_model passes another.
    return build_model_with_cfg(SparseFormer, variant, pretrained, **kwargs)


@register_glimpse
def sparseformer_tiny(pretrained: bool = False, **kwargs: Any) -> SparseFormer:
    """SparseFormer-T (Table 1): N=49, d_f=256, d_c=512, L_c=8, P=36; 32M params, 2.0 GFLOPs."""
    args = {"num_latent_tokens": 49, "dims": (256, 512), "depths": (4, 8), **kwargs}
    return _create_sparseformer("sparseformer_tiny", pretrained=pretrained, **args)


@register_glimpse
def sparseformer_small(pretrained: bool = False, **kwargs: Any) -> SparseFormer:
    """SparseFormer-S (Table 1): N=64, d_f=320, d_c=640, L_c=8, P=36; 48M params, 3.8 GFLOPs."""
    args = {"num_latent_tokens": 64, "dims": (320, 640), "depths": (4, 8), **kwargs}
    return _create_sparseformer("sparseformer_small", pretrained=pretrained, **args)


@register_glimpse
def sparseformer_base(pretrained: bool = False, **kwargs: Any) -> SparseFormer:
    """SparseFormer-B (Table 1): N=81, d_f=384, d_c=768, L_c=10, P=36; 81M params, 7.8 GFLOPs."""
    args = {"num_latent_tokens": 81, "dims": (384, 768), "depths": (4, 10), **kwargs}
    return _create_sparseformer("sparseformer_base", pretrained=pretrained, **args)
