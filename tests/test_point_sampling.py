"""Tests for models.point_sampling.sample_points against a direct interpolation formula."""

from __future__ import annotations

import math

import pytest
import torch

from models.point_sampling import sample_points


def _pixel(features: torch.Tensor, b: int, idx: tuple[int, ...]) -> torch.Tensor:
    """features[b, :, *idx] with zeros outside the map (zero padding)."""
    sizes = features.shape[2:]
    if any(i < 0 or i >= s for i, s in zip(idx, sizes)):
        return torch.zeros(features.shape[1], dtype=features.dtype)
    return features[(b, slice(None), *idx)]


def _reference(features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Direct bilinear / trilinear formula: a weighted sum over the 2^d neighbouring pixel centres.

    Continuous coordinate u in [0, 1] maps to pixel-index space as u * size - 0.5 (centre i at (i+0.5)/size).
    """
    batch = features.shape[0]
    spatial = features.shape[2:]  # (H, W) or (T, H, W)
    n_coords = len(spatial)
    flat = points.reshape(batch, -1, n_coords)
    out = torch.zeros(batch, flat.shape[1], features.shape[1], dtype=features.dtype)
    for b in range(batch):
        for p in range(flat.shape[1]):
            # points are (x, y[, t]); feature axes are ([T,] H, W): reverse the order.
            coords = [flat[b, p, k].item() * spatial[n_coords - 1 - k] - 0.5 for k in range(n_coords)][::-1]
            lows = [math.floor(c) for c in coords]
            fracs = [c - lo for c, lo in zip(coords, lows)]
            for corner in range(2 ** n_coords):
                bits = [(corner >> k) & 1 for k in range(n_coords)]
                weight = math.prod(f if bit else 1 - f for f, bit in zip(fracs, bits))
                idx = tuple(lo + bit for lo, bit in zip(lows, bits))
                out[b, p] += weight * _pixel(features, b, idx)
    return out.reshape(*points.shape[:-1], features.shape[1])


def test_bilinear_matches_direct_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 7, generator=gen, dtype=torch.float64)
    points = torch.rand(2, 4, 6, 2, generator=gen, dtype=torch.float64) * 1.4 - 0.2  # some outside [0, 1]
    out = sample_points(features, points)
    assert out.shape == (2, 4, 6, 3)
    torch.testing.assert_close(out, _reference(features, points))


def test_trilinear_matches_direct_formula() -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    points = torch.rand(2, 3, 5, 3, generator=gen, dtype=torch.float64) * 1.4 - 0.2
    out = sample_points(features, points)
    assert out.shape == (2, 3, 5, 3)
    torch.testing.assert_close(out, _reference(features, points))


def test_pixel_centre_convention() -> None:
    features = torch.arange(2 * 3 * 4, dtype=torch.float64).reshape(1, 2, 3, 4)
    ys, xs = torch.meshgrid(torch.arange(3), torch.arange(4), indexing="ij")
    centres = torch.stack([(xs + 0.5) / 4, (ys + 0.5) / 3], dim=-1)[None].double()  # (1, 3, 4, 2)
    out = sample_points(features, centres)  # (1, 3, 4, 2)
    torch.testing.assert_close(out.permute(0, 3, 1, 2), features)
    # Half-way between two centres along x: the mean of the two pixels.
    mid = sample_points(features, torch.tensor([[[1.0 / 4, 0.5 / 3]]], dtype=torch.float64))
    torch.testing.assert_close(mid[0, 0], (features[0, :, 0, 0] + features[0, :, 0, 1]) / 2)


def test_zero_padding_outside() -> None:
    features = torch.ones(1, 2, 4, 4)
    far = torch.tensor([[[-0.5, 0.5], [1.5, 0.5], [0.5, -1.0], [0.5, 2.0]]])
    assert torch.count_nonzero(sample_points(features, far)) == 0
    # On the outer edge of the map half of the weight falls on the (zero) padding.
    edge = sample_points(features, torch.tensor([[[0.0, 0.5]]]))
    torch.testing.assert_close(edge, torch.full((1, 1, 2), 0.5))
    # Border padding is available and clamps instead.
    torch.testing.assert_close(sample_points(features, far, padding="border"), torch.ones(1, 4, 2))


def test_2d_is_trilinear_with_one_frame() -> None:
    gen = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 6, 5, generator=gen)
    xy = torch.rand(2, 7, 2, generator=gen)
    # With T = 1 the only frame centre is at t = 0.5: trilinear sampling there equals bilinear sampling.
    xyt = torch.cat([xy, torch.full((2, 7, 1), 0.5)], dim=-1)
    torch.testing.assert_close(sample_points(features[:, :, None], xyt), sample_points(features, xy))


def test_gradcheck_features_and_points() -> None:
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    # Keep points away from pixel-centre lines, where bilinear interpolation is not differentiable.
    points = (torch.rand(1, 5, 2, generator=gen, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: sample_points(f, p), (features, points))
    video = torch.randn(1, 2, 3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    points3 = (torch.rand(1, 4, 3, generator=gen, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: sample_points(f, p), (video, points3))


@pytest.mark.parametrize(
    ("features", "points", "message"),
    [
        (torch.zeros(1, 2, 3), torch.zeros(1, 4, 2), r"\(1, 2, 3\)"),
        (torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3), r"\(B, \*P, 2\).*\(1, 4, 3\)"),
        (torch.zeros(1, 2, 2, 3, 3), torch.zeros(1, 4, 2), r"\(B, \*P, 3\)"),
        (torch.zeros(2, 2, 3, 3), torch.zeros(3, 4, 2), "features 2 vs points 3"),
        (torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 2, dtype=torch.long), "torch.int64"),
    ],
)
def test_bad_inputs_name_the_value(features: torch.Tensor, points: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample_points(features, points)


def test_bad_padding() -> None:
    with pytest.raises(ValueError, match="'mirror'"):
        sample_points(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2), padding="mirror")
