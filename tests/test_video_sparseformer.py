"""Tests for models.video_sparseformer: tubes, trilinear sampling, token inflation, 2D -> video checkpoints."""

from __future__ import annotations

import pytest
import torch

import models  # noqa: F401  (registers the variants)
from models.checkpoint import CheckpointMismatchError, load_checkpoint
from models.flops import count_flops
from models.registry import create_model
from models.sparseformer import analytic_gflops, grid_rois
from models.trace import record
from models.video_sparseformer import (
    VideoSparseFormer,
    temporal_offsets,
    tube_rois,
    video_sparseformer_tiny,
)
from tests.model_fixtures import SPARSEFORMER_SMALL, perturb_zero_inits


def sampled(model, x):
    """Logits and the SampledPoints records (one per sampling stage) of one forward."""
    with record() as trace:
        logits = model(x)
    return logits, trace.sampled_points()

# A reduced model for fast tests: same structure, small widths (the image model's, tests.model_fixtures).
SMALL = SPARSEFORMER_SMALL
VIDEO = dict(SMALL, num_frames=4, inflation=2)


def small_video(**overrides) -> VideoSparseFormer:
    torch.manual_seed(0)
    return create_model("video_sparseformer_tiny", **{**VIDEO, **overrides})


def small_image(**overrides):
    torch.manual_seed(1)
    return create_model("sparseformer_tiny", **{**SMALL, **overrides})


# ----------------------------------------------------------------------------------------------------------
# Geometry helpers
# ----------------------------------------------------------------------------------------------------------

def test_tube_rois_tile_time() -> None:
    rois = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.5, 0.5, 0.5]])
    tubes = tube_rois(rois, 4)
    assert tubes.shape == (8, 6)
    # Token k*N + i is copy k of token i: same spatial RoI, temporal centre (k+0.5)/4, length 1/4.
    torch.testing.assert_close(tubes[:, 2], torch.tensor([0.125, 0.125, 0.375, 0.375, 0.625, 0.625, 0.875, 0.875]))
    assert torch.all(tubes[:, 5] == 0.25)
    torch.testing.assert_close(tubes[4:6, [0, 1, 3, 4]], rois)
    starts, ends = tubes[::2, 2] - tubes[::2, 5] / 2, tubes[::2, 2] + tubes[::2, 5] / 2
    torch.testing.assert_close(starts, torch.tensor([0.0, 0.25, 0.5, 0.75]))  # contiguous, no overlap, [0, 1]
    torch.testing.assert_close(ends, torch.tensor([0.25, 0.5, 0.75, 1.0]))
    with pytest.raises(ValueError, match="got 0"):
        tube_rois(rois, 0)


def test_temporal_offsets_latin_square() -> None:
    t = temporal_offsets(36).reshape(6, 6)
    cells = (torch.arange(6) + 0.5) / 6 - 0.5
    for i in range(6):  # every row and every column of the spatial grid visits every temporal cell once
        torch.testing.assert_close(t[i].sort().values, cells)
        torch.testing.assert_close(t[:, i].sort().values, cells)
    odd = temporal_offsets(10)
    assert odd.shape == (10,) and odd.abs().max() < 0.5 and len(odd.unique()) == 3


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------

def test_shapes_and_cfg() -> None:
    model = small_video()
    x = torch.randn(2, 3, 4, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 18, 64)  # n_t * N = 2 * 9 tokens
    logits, trace = sampled(model, x)
    assert logits.shape == (2, 7)
    assert model.extract_features(x).shape == (2, 96, 4, 16, 16)  # per-frame early conv, T kept
    assert [r.points.shape for r in trace] == [(2, 18, 9, 3)] * 4
    assert [r.rois.shape for r in trace] == [(2, 18, 6)] * 4
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 4, 64, 64) and cfg["num_frames"] == 4 and cfg["num_classes"] == 400


def test_default_cfg_is_32_frames() -> None:
    with torch.device("meta"):
        model = create_model("video_sparseformer_small")
    assert model.pretrained_cfg["input_size"] == (3, 32, 224, 224)
    assert model.pretrained_cfg["num_frames"] == 32 and model.inflation == 8
    assert model.latent_rois.shape == (8 * 64, 6)


def test_fresh_tubes_tile_time_and_points_stay_in_their_segment() -> None:
    model = small_video(inflation=4, num_frames=8).eval()
    torch.testing.assert_close(model.latent_rois.detach(), tube_rois(grid_rois(9), 4))
    _, trace = sampled(model, torch.randn(1, 3, 8, 64, 64))
    for stage in trace:  # zero-initialised adjustment: tubes unchanged in every stage
        torch.testing.assert_close(stage.rois[0], tube_rois(grid_rois(9), 4))
    t = trace[0].points[0, :, :, 2]  # (n_t*N, P) temporal coordinates
    segment = torch.arange(4).repeat_interleave(9)[:, None]  # token k*N + i lives in segment k
    assert torch.all(t > segment / 4) and torch.all(t < (segment + 1) / 4)
    assert torch.all(t.std(dim=1) > 0)  # a fresh model spreads each token's points through its tube


def test_gradients_reach_tubes_temporal_offsets_and_every_parameter() -> None:
    model = small_video().train()
    x = torch.randn(2, 3, 4, 64, 64)
    model(x).logsumexp(-1).sum().backward()
    params = dict(model.named_parameters())
    assert params["latent_rois"].grad[:, 2].abs().sum() > 0  # tube centres in time
    weight = params["focus.sampler.offsets.proj.weight"].grad.reshape(9, 3, -1)
    assert weight[:, 2].abs().sum() > 0  # temporal offset rows
    assert params["focus.sampler.adjust.proj.weight"].grad[[2, 5]].abs().sum() > 0  # t and l deltas
    model.zero_grad()
    perturb_zero_inits(model)
    model(x).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------------------
# Inflation from an image checkpoint
# ----------------------------------------------------------------------------------------------------------

def _image_checkpoint(tmp_path, **overrides):
    image = small_image(**overrides).eval()
    perturb_zero_inits(image)  # so the test also covers trained-looking offset / adjustment weights
    path = tmp_path / "image.pth"
    torch.save({"model": image.state_dict()}, path)
    return image, path


def test_inflated_n_t_1_on_one_frame_reproduces_image_logits(tmp_path) -> None:
    image, path = _image_checkpoint(tmp_path)
    # create_model loads checkpoint_path through the family's adapter (an image checkpoint is inflated).
    video = create_model("video_sparseformer_tiny", **{**SMALL, "num_frames": 1, "inflation": 1},
                         checkpoint_path=str(path)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        video_logits, video_trace = sampled(video, x[:, :, None])
        image_logits, image_trace = sampled(image, x)
        torch.testing.assert_close(video_logits, image_logits, atol=1e-5, rtol=1e-4)
    for v, i in zip(video_trace, image_trace):  # same spatial geometry, t at the frame centre
        torch.testing.assert_close(v.points[..., :2], i.points)
        assert torch.all(v.points[..., 2] == 0.5)


def test_inflated_model_is_a_per_segment_image_model(tmp_path) -> None:
    image, path = _image_checkpoint(tmp_path)
    video = small_video(inflation=2, num_frames=2, num_classes=7).eval()
    load_checkpoint(video, path)
    x = torch.randn(1, 3, 64, 64)
    clip = x[:, :, None].expand(-1, -1, 2, -1, -1)  # two identical frames
    with torch.no_grad():
        # Each token samples exactly its own segment's centre (frame centres here): duplicated tokens see the
        # same features, and attention over duplicates equals attention over the originals.
        video_logits, trace = sampled(video, clip)
        torch.testing.assert_close(video_logits, image(x), atol=1e-5, rtol=1e-4)
    t = trace[0].points[0, :, :, 2]  # (2N, P)
    torch.testing.assert_close(t[:9], torch.full_like(t[:9], 0.25))
    torch.testing.assert_close(t[9:], torch.full_like(t[9:], 0.75))


def test_inflation_replaces_a_classifier_of_another_size(tmp_path) -> None:
    _, path = _image_checkpoint(tmp_path)
    video = small_video(num_classes=5)
    head = video.head.weight.detach().clone()
    report = load_checkpoint(video, path, classifier="reset")  # the loader's rule, not the family filter's
    assert report.adapted and report.reset_classifier_keys == ("head.bias", "head.weight")
    torch.testing.assert_close(video.head.weight.detach(), head)  # 7-class ImageNet-like head not forced in
    torch.testing.assert_close(video.latent_embed[:9], video.latent_embed[9:])  # replicated embeddings


def test_inflation_refuses_mismatched_checkpoints(tmp_path) -> None:
    _, path = _image_checkpoint(tmp_path, num_latent_tokens=16)
    with pytest.raises(CheckpointMismatchError, match="16 latent tokens.*num_latent_tokens=9"):
        load_checkpoint(small_video(), path)
    _, path = _image_checkpoint(tmp_path, dims=(32, 96))
    with pytest.raises(CheckpointMismatchError, match=r"bridge.0.weight: checkpoint \(96, 32\) vs model \(64, 32\)"):
        load_checkpoint(small_video(), path)
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointMismatchError, match="no latent_rois"):
        load_checkpoint(small_video(), tmp_path / "junk.pth")


def test_video_checkpoint_round_trip(tmp_path) -> None:
    model = small_video().eval()
    perturb_zero_inits(model)
    torch.save(model.state_dict(), tmp_path / "video.pth")
    loaded = video_sparseformer_tiny(**VIDEO, checkpoint_path=str(tmp_path / "video.pth")).eval()
    x = torch.randn(1, 3, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

def test_bad_inputs_name_the_value() -> None:
    model = small_video()
    with pytest.raises(ValueError, match="built for num_frames=4, got 8 frames"):
        model(torch.randn(1, 3, 8, 64, 64))
    with pytest.raises(ValueError, match="expects 3 input channels, got 2"):
        model(torch.randn(1, 2, 4, 64, 64))
    with pytest.raises(ValueError, match=r"clips \(B, C, T, H, W\), got shape \(1, 3, 64, 64\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="inflation must be >= 1, got 0"):
        small_video(inflation=0)
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        small_video(num_frames=0)


# ----------------------------------------------------------------------------------------------------------
# Parameters and GFLOPs (Tables 5-6)
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "target_m"), [("video_sparseformer_tiny", 31), ("video_sparseformer_small", 48),
                                                ("video_sparseformer_base", 81)])
def test_params_table_5(name: str, target_m: float) -> None:
    with torch.device("meta"):  # shapes only: fast
        model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(target_m, rel=0.03)


def test_flops_match_hand_count_at_reduced_size() -> None:
    model = small_video(inflation=3)
    report = count_flops(model, torch.randn(1, 3, 4, 64, 64))
    total, mix = analytic_gflops(model, (3, 4, 64, 64))
    assert report.gflops == pytest.approx(total, rel=1e-3)
    assert report.gflops - report.paper_gflops == pytest.approx(mix, rel=1e-6)


@pytest.mark.slow
def test_tiny_gflops_at_32x224_table_5() -> None:
    model = create_model("video_sparseformer_tiny")
    report = count_flops(model, torch.randn(1, 3, 32, 224, 224))
    assert report.paper_gflops == pytest.approx(22.0, rel=0.03)
    total, _ = analytic_gflops(model, (3, 32, 224, 224))
    assert report.gflops == pytest.approx(total, rel=1e-3)
