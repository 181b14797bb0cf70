"""Differentiable point sampling of feature maps: the operator shared by PS-ViT and SparseFormer.

PS-ViT (Yue et al., 2021; PS-ViT eq. 3) samples tokens at learned points by bilinear interpolation, and
SparseFormer (Gao et al., 2023, section 3.1; SparseFormer eq. 3) samples each latent token's points inside its RoI;
VideoSparseFormer (section 3.2) samples trilinearly inside tubes. The official PS-ViT relies on a
CUDA-only extension; here one fused ``torch.nn.functional.grid_sample`` call does the work on any device
and is differentiable with respect to both the features and the points (gradients w.r.t. the points
flow through the interpolation weights, PS-ViT eq. 9).

Coordinate convention (both families use it, and the tests pin it down):
    points are normalised to [0, 1] of the map; 0 is the outer edge of the first pixel, 1 the outer edge
    of the last one, and the centre of pixel ``i`` sits at ``(i + 0.5) / size`` (``align_corners=False``).
    Order of the last axis: (x, y) for images, (x, y, t) for videos; x runs along W, y along H, t along T.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sample_points", "PADDING_MODES"]

PADDING_MODES = ("zeros", "border", "reflection")


def sample_points(features: Tensor, points: Tensor, *, padding: str = "zeros") -> Tensor:
    """Bilinear / trilinear sampling of C-channel features at fractional points.

    Args:
        features: ``(B, C, H, W)`` image features, or ``(B, C, T, H, W)`` video features.
        points: ``(B, *P, 2)`` as (x, y) for 4-D features, or ``(B, *P, 3)`` as (x, y, t) for 5-D features;
            any number of point axes ``*P`` (e.g. ``(N, P)`` tokens x points). Coordinates are normalised to
            [0, 1] of the map (0 = outer edge of the first pixel, 1 = outer edge of the last; pixel centre
            ``i`` at ``(i + 0.5) / size``).
        padding: value outside the map: ``"zeros"`` (default; the interpolation blends towards zero near
            and beyond the edge), ``"border"`` or ``"reflection"`` (as in ``grid_sample``).

    Returns:
        ``(B, *P, C)`` sampled features, in the promoted dtype of ``features`` and ``points`` (bf16 features
        sampled at fp32 points are sampled in fp32: coordinates need more than bf16's 8 mantissa bits).

    Differentiable w.r.t. ``features`` and ``points``; one fused ``grid_sample`` call.
    """
    if padding not in PADDING_MODES:
        raise ValueError(f"padding must be one of {PADDING_MODES}, got {padding!r}")
    if features.dim() not in (4, 5):
        raise ValueError(f"features must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(features.shape)}")
    n_coords = features.dim() - 2  # 2 for (x, y), 3 for (x, y, t)
    if points.dim() < 2 or points.shape[-1] != n_coords:
        raise ValueError(f"points must be (B, *P, {n_coords}) for {features.dim()}-D features of shape "
                         f"{tuple(features.shape)}, got shape {tuple(points.shape)}")
    if points.shape[0] != features.shape[0]:
        raise ValueError(f"batch sizes differ: features {features.shape[0]} vs points {points.shape[0]}")
    if not points.is_floating_point():
        raise ValueError(f"points must be floating point, got dtype {points.dtype}")

    batch, channels = features.shape[:2]
    point_axes = points.shape[1:-1]  # *P
    n_points = math.prod(point_axes)
    # [0, 1] -> [-1, 1]: with align_corners=False, -1 / +1 are the outer edges of the first / last pixel,
    # exactly our convention, so no size-dependent correction is needed.
    dtype = torch.promote_types(features.dtype, points.dtype)
    features = features.to(dtype)
    grid = points.to(dtype) * 2.0 - 1.0  # (B, *P, n_coords)
    if n_coords == 2:
        grid = grid.reshape(batch, 1, n_points, 2)  # (B, 1, Np, 2) an H_out=1 x W_out=Np "image" of points
    else:
        grid = grid.reshape(batch, 1, 1, n_points, 3)  # (B, 1, 1, Np, 3); grid_sample reads (x, y, z=t)
    # mode="bilinear" is trilinear for 5-D input.
    out = F.grid_sample(features, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    out = out.reshape(batch, channels, n_points)  # (B, C, Np)
    return out.transpose(1, 2).reshape(batch, *point_axes, channels)  # (B, *P, C)
