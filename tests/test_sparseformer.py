"""Tests for models.sparseformer: geometry (SparseFormer eqs. 3, 7-9, appendix A.3), blocks, the model, checkpoints, cost."""

from __future__ import annotations

import math

import pytest
import torch

import models  # noqa: F401  (registers the variants)
from models.checkpoint import CheckpointMismatchError, load_checkpoint
from models.flops import count_flops
from models.registry import create_model
from models.sparseformer import (
    MixingMatmuls,
    SparseFormer,
    adjust_rois,
    analytic_gflops,
    checkpoint_filter_fn,
    clamp_point_grad,
    grid_offsets,
    grid_rois,
    offsets_to_points,
    sparseformer_tiny,
)
from models.trace import record
from tests.model_fixtures import SPARSEFORMER_SMALL, perturb_zero_inits

# A reduced SparseFormer for fast tests (tests.model_fixtures): same structure, small widths.
SMALL = SPARSEFORMER_SMALL


def small_model(**overrides) -> SparseFormer:
    torch.manual_seed(0)
    return create_model("sparseformer_tiny", **{**SMALL, **overrides})


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------

def test_adjust_rois_eqs_7_8_by_hand() -> None:
    rois = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    deltas = torch.tensor([[0.5, -0.25, math.log(2.0), 0.0]])
    # x' = 0.5 + 0.5*0.2, y' = 0.5 - 0.25*0.4, w' = 0.2*2, h' = 0.4
    torch.testing.assert_close(adjust_rois(rois, deltas), torch.tensor([[0.6, 0.4, 0.4, 0.4]]))
    tube = torch.tensor([[0.5, 0.5, 0.25, 0.2, 0.4, 0.5]])
    moved = adjust_rois(tube, torch.tensor([[0.0, 0.0, 0.5, 0.0, 0.0, math.log(0.5)]]))
    torch.testing.assert_close(moved, torch.tensor([[0.5, 0.5, 0.5, 0.2, 0.4, 0.25]]))


def test_offsets_to_points_normalises_by_three_std() -> None:
    rois = torch.tensor([[[0.4, 0.6, 0.2, 0.5]]])  # (B=1, N=1, 4)
    offsets = torch.tensor([[[[-1.0, 10.0], [1.0, 30.0]]]])  # (1, 1, P=2, 2)
    # Per axis: mean removed, divided by 3 * (unbiased) std = 3 * sqrt(2) for x, 3 * sqrt(200) for y.
    d = 1.0 / (3.0 * math.sqrt(2.0))
    expected = torch.tensor([[[[0.4 - d * 0.2, 0.6 - d * 0.5], [0.4 + d * 0.2, 0.6 + d * 0.5]]]])
    torch.testing.assert_close(offsets_to_points(rois, offsets), expected, atol=1e-5, rtol=0)
    # Scale invariance: the spread of the points depends on the RoI, not on the raw offsets' magnitude.
    torch.testing.assert_close(offsets_to_points(rois, offsets * 7.0), offsets_to_points(rois, offsets))


def test_grid_rois_centres_and_half_size() -> None:
    rois = grid_rois(49)
    assert rois.shape == (49, 4)
    steps = 0.25 + torch.arange(7) / 6 * 0.5  # centres keep the half-size RoIs inside the image
    torch.testing.assert_close(rois[:7, 0], steps)  # first row: x varies
    torch.testing.assert_close(rois[::7, 1], steps)  # first column: y varies
    assert torch.all(rois[:, 2:] == 0.5)
    assert torch.all(rois[:, :2] - rois[:, 2:] / 2 >= 0) and torch.all(rois[:, :2] + rois[:, 2:] / 2 <= 1 + 1e-6)
    torch.testing.assert_close(grid_rois(1), torch.tensor([[0.5, 0.5, 0.5, 0.5]]))
    assert grid_rois(8).shape == (8, 4)  # not a square: first 8 cells of a 3 x 3 grid
    with pytest.raises(ValueError, match="got 0"):
        grid_rois(0)


def test_grid_offsets_cell_centres() -> None:
    off = grid_offsets(36)
    centres = (torch.arange(6) + 0.5) / 6 - 0.5
    torch.testing.assert_close(off[:6, 0], centres)
    torch.testing.assert_close(off[::6, 1], centres)
    assert grid_offsets(10).shape == (10, 2) and grid_offsets(10).abs().max() <= 0.5


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

def test_shapes_and_timm_contract() -> None:
    model = small_model()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 9, 64)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    logits = model(x)
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert model.num_features == 64 and model.num_classes == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 64)
    assert model.no_weight_decay() == {"latent_rois"}
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 64, 64) and cfg["first_conv"] == "stem.conv" and cfg["classifier"] == "head"
    # Any resolution runs (tokens sample normalised coordinates; Table 4).
    assert model(torch.randn(1, 3, 96, 80)).shape == (1, 64)


def test_geometry_initialisation_and_trace() -> None:
    model = small_model().eval()
    torch.testing.assert_close(model.latent_rois.detach(), grid_rois(9))
    x = torch.randn(2, 3, 64, 64)
    with record() as records:
        model(x)
    trace = records.sampled_points()
    assert [r.name for r in trace] == ["focusing 1", "focusing 2", "focusing 3", "cortex 1"]
    assert [r.stage for r in trace] == [1, 2, 3, 4]
    for stage in trace:
        assert stage.rois.shape == (2, 9, 4) and stage.points.shape == (2, 9, 9, 2)
        assert not stage.rois.requires_grad and not stage.points.requires_grad
        # Zero-initialised adjustment: RoIs do not move; zero offset weights: every stage samples the grid.
        torch.testing.assert_close(stage.rois, grid_rois(9).expand(2, -1, -1))
    # The 3 x 3 grid of points spans +-0.5/sqrt(3)... exactly: offsets +-1/3 standardised by 3 std.
    pts = trace[0].points[0, 0]  # token 0: RoI centre (0.25, 0.25), size 0.5
    spread = (1 / 3) / (3 * grid_offsets(9)[:, 0].std())
    torch.testing.assert_close(pts[:, 0].unique(), torch.tensor([0.25 - 0.5 * spread, 0.25, 0.25 + 0.5 * spread]))
    assert torch.all((pts >= 0) & (pts <= 0.5))  # inside the token's RoI


def test_gradients_reach_geometry_and_every_parameter() -> None:
    model = small_model(drop_path_rate=0.0).train()
    x = torch.randn(2, 3, 64, 64)
    model(x).logsumexp(-1).sum().backward()
    # At initialisation already: through the bilinear interpolation into the RoIs and the offset / delta layers.
    for name in ("latent_rois", "focus.sampler.offsets.proj.weight", "focus.sampler.offsets.bias",
                 "focus.sampler.adjust.proj.weight", "cortex.0.sampler.adjust.proj.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    # Once the zero-initialised layers are off zero, every parameter gets a gradient.
    model.zero_grad()
    perturb_zero_inits(model)
    model(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_point_gradient_clamp() -> None:
    points = torch.full((1, 2, 3, 2), 0.5, requires_grad=True)
    upstream = torch.tensor([1.0, -0.2]).expand(1, 2, 3, 2) * torch.tensor([[[[1.0], [0.001], [-3.0]]]])
    # One feature pixel per axis: 1/W along x (W = 10), 1/H along y (H = 4).
    (clamp_point_grad(points, [10, 4], 1.0) * upstream).sum().backward()
    expected = torch.tensor([[0.1, -0.2], [0.001, -0.0002], [-0.1, 0.25]]).expand(1, 2, 3, 2)
    torch.testing.assert_close(points.grad, expected)
    free = points.detach().requires_grad_()
    (clamp_point_grad(free, [10, 4], None) * upstream).sum().backward()
    torch.testing.assert_close(free.grad, upstream)


def test_focusing_weights_are_shared() -> None:
    model = small_model()
    deeper = small_model(depths=(6, 2))
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in deeper.parameters())  # L_f adds no parameters
    calls = []
    model.focus.register_forward_hook(lambda *_: calls.append(1))
    model(torch.randn(1, 3, 64, 64))
    assert len(calls) == 3  # one module, applied L_f = 3 times
    assert model.focus_drop_path == [0.0, 0.0, 0.0]
    dp = small_model(drop_path_rate=0.4)
    assert dp.focus_drop_path[0] == 0.0 and dp.focus_drop_path[1] > 0  # each repeat its own stochastic depth


def test_mixing_flagged_for_paper_flops() -> None:
    model = small_model()
    flagged = [n for n, m in model.named_modules() if getattr(m, "exclude_from_paper_flops", False)]
    assert flagged == ["focus.sampler.mixing.mixing", "cortex.0.sampler.mixing.mixing"]
    assert all(isinstance(model.get_submodule(n), MixingMatmuls) for n in flagged)


def test_batch_independence_and_eval_determinism() -> None:
    model = small_model().eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path) -> None:
    model = small_model().eval()
    perturb_zero_inits(model)
    path = tmp_path / "sf.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    # Through the variant function (timm.create_model would load ``checkpoint_path`` itself, without the adapter).
    loaded = sparseformer_tiny(**SMALL, checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def _to_release_format(model: SparseFormer) -> dict[str, torch.Tensor]:
    """Write ``model`` in the authors' release layout (corner RoIs, nn.MultiheadAttention names, layers.N)."""
    inverse = {
        "norm1.": "ln_attn.", "attn.qkv.weight": "attn.in_proj_weight", "attn.qkv.bias": "attn.in_proj_bias",
        "attn.proj.": "attn.out_proj.", "norm2.": "ffn.0.", "mlp.fc1.": "ffn.1.", "mlp.fc2.": "ffn.3.",
        "sampler.offsets.norm.": "roi_offset_module.0.", "sampler.offsets.proj.": "roi_offset_module.1.",
        "sampler.offsets.bias": "roi_offset_bias", "sampler.adjust.norm.": "roi_adjust_module.0.",
        "sampler.adjust.proj.": "roi_adjust_module.1.",
        "sampler.mixing.generator.": "adaptive_mixing.parameter_generator.",
        "sampler.mixing.channel_bias": "adaptive_mixing.m_beta", "sampler.mixing.spatial_bias": "adaptive_mixing.s_beta",
        "sampler.mixing.out_proj.": "adaptive_mixing.out_proj.",
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if key == "latent_rois":
            xy, wh = value[:, :2], value[:, 2:]
            out["initial_roi.weight"] = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
            continue
        if key == "latent_embed":
            out["initial_embedding.weight"] = value
            continue
        if key.startswith("stem.conv."):
            out["feat_extractor.conv1." + key.split(".")[-1]] = value
            continue
        if key.startswith(("norm.", "head.")):
            out[("head.norm." if key.startswith("norm.") else "head.classifier.") + key.split(".")[-1]] = value
            continue
        if key.startswith("bridge."):
            out["layers.1." + key[len("bridge."):]] = value
            continue
        prefix, rest = ("layers.0.", key[len("focus."):]) if key.startswith("focus.") else (
            f"layers.{int(key.split('.')[1]) + 2}.", key.split(".", 2)[2])
        for new, old in inverse.items():
            if rest.startswith(new):
                rest = old + rest[len(new):]
                break
        out[prefix + rest] = value.flatten() if rest == "roi_offset_bias" else value
    return out


def test_release_checkpoint_converts_exactly(tmp_path) -> None:
    model = small_model().eval()
    perturb_zero_inits(model)
    with torch.no_grad():
        model.latent_rois.add_(torch.randn_like(model.latent_rois) * 0.02)
    path = tmp_path / "release.pth"
    torch.save({"model": _to_release_format(model)}, path)
    fresh = small_model().eval()
    load_checkpoint(fresh, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), atol=1e-5, rtol=1e-5)


def test_bad_checkpoints_are_refused(tmp_path) -> None:
    model = small_model()
    sd = model.state_dict()
    bad_shape = dict(sd, latent_embed=torch.zeros(16, 32))
    torch.save(bad_shape, tmp_path / "shape.pth")
    with pytest.raises(CheckpointMismatchError, match=r"latent_embed: checkpoint \(16, 32\) vs model \(9, 32\)"):
        load_checkpoint(small_model(), tmp_path / "shape.pth")
    extra = dict(sd, **{"focus.sampler.extra": torch.zeros(1)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match="focus.sampler.extra"):
        load_checkpoint(small_model(), tmp_path / "extra.pth")
    release = {"initial_roi.weight": torch.zeros(9, 4), "layers.0.mystery": torch.zeros(1)}
    with pytest.raises(CheckpointMismatchError, match="layers.0.mystery"):
        checkpoint_filter_fn(release, model)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_value() -> None:
    model = small_model()
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 64, 64\)"):
        model(torch.randn(1, 3, 2, 64, 64))
    with pytest.raises(ValueError, match=r"\(8, 8\) is below the minimum 16"):
        model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="width 30 is not divisible by num_heads=4"):
        small_model(dims=(30, 64))
    with pytest.raises(ValueError, match="sparseformer_tinyy.*sparseformer_tiny"):
        create_model("sparseformer_tinyy")
    with pytest.raises(ValueError, match=r"got \(0, 2\)"):
        small_model(depths=(0, 2))
    with pytest.raises(ValueError, match="roi_size .* got 1.5"):
        small_model(roi_size=1.5)
    with pytest.raises(ValueError, match="num_latent_tokens must be >= 1, got 0"):
        small_model(num_latent_tokens=0)


# ----------------------------------------------------------------------------------------------------------
# Parameters and GFLOPs (Table 1, Table 4)
# ----------------------------------------------------------------------------------------------------------

def test_flops_match_hand_count_at_reduced_size() -> None:
    model = small_model()
    report = count_flops(model, torch.randn(1, 3, 64, 64))
    total, mix = analytic_gflops(model, (3, 64, 64))
    assert report.gflops == pytest.approx(total, rel=1e-3)
    assert report.gflops - report.paper_gflops == pytest.approx(mix, rel=1e-6)


@pytest.mark.parametrize(("name", "target_m"), [("sparseformer_tiny", 32), ("sparseformer_small", 48),
                                                ("sparseformer_base", 81)])
def test_params_table_1(name: str, target_m: float) -> None:
    with torch.device("meta"):  # shapes only: fast
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(target_m, rel=0.03)


@pytest.mark.parametrize(("n", "paper"), [(9, 0.5), (16, 0.8), (25, 1.1), (36, 1.6), (64, 2.7), (81, 3.3)])
def test_paper_comparable_gflops_reproduce_table_3a(n: int, paper: float) -> None:
    """Table 3a (SparseFormer-T with N latent tokens): our paper-comparable count rounds to the paper's
    figure for every N but 49, where it gives 2.07 against Table 1's 2.0 (see the test below)."""
    with torch.device("meta"):  # the hand count needs shapes only
        model = create_model("sparseformer_tiny", num_latent_tokens=n)
    total, mix = analytic_gflops(model, (3, 224, 224))
    assert round(total - mix, 1) == pytest.approx(paper)


def test_tiny_gflops_at_224_and_resolution_trend() -> None:
    torch.manual_seed(0)
    model = create_model("sparseformer_tiny")
    r224 = count_flops(model, torch.randn(1, 3, 224, 224))
    # Table 1 says 2.0; our count is 2.07 (the paper's own Table 3a gives 2.0 for N=49 but 2.7 for N=64,
    # which no linear-in-N model fits: the 2.0 is rounded down). Within 4 %, and equal to the hand count.
    assert r224.paper_gflops == pytest.approx(2.0, rel=0.04)
    total, mix = analytic_gflops(model, (3, 224, 224))
    assert r224.gflops == pytest.approx(total, rel=1e-3) and r224.gflops - r224.paper_gflops == pytest.approx(mix)
    # Table 4 trend: only the early convolution grows with the input; the latent transformers cost the same.
    r384 = count_flops(model, torch.randn(1, 3, 384, 384))
    conv = 96 * 3 * 49 * (192 * 192 - 112 * 112) / 1e9
    assert r384.paper_gflops - r224.paper_gflops == pytest.approx(conv, rel=1e-3)
