"""XViT (models/xvit.py): shapes and the timm contract, the space-time mixing window, ViT -> XViT
weights and strict loading, ATS across time (K, shared positions, batch independence, gradients),
GFLOPs vs the formula."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from models.ats import set_ats_k
from models.flops import count_flops, example_input
from models.xvit import (
    ATSXViTBlock,
    XViT,
    XViTBlock,
    analytic_flops,
    mix_time,
    xvit_8,
    xvit_8_ats,
)
from tests.model_fixtures import VIDEO_VIT_SMALL as SMALL
from tests.model_fixtures import D, S, T, clips, kept_tokens, loaded, peaky, small_video_vit, vit_file

torch.set_num_threads(1)

# Reduced geometry (tests.model_fixtures): 64 px frames -> 16 positions, 3 frames, 64 channels; ATS in blocks 3-5 of 6.


def small(name: str = "xvit_8", seed: int = 0, **kwargs) -> XViT:
    return small_video_vit(name, seed, **kwargs)


# --------------------------------------------------------------------------------------- shapes, contract


def test_registered_variants_and_cfgs():
    assert models.list_models("xvit") == ["xvit_16", "xvit_16_ats", "xvit_8", "xvit_8_ats"]
    assert timm.models.get_pretrained_cfg("xvit_8").input_size == (3, 8, 224, 224)
    assert timm.models.get_pretrained_cfg("xvit_16").input_size == (3, 16, 224, 224)
    m = small()
    assert m.pretrained_cfg["input_size"] == (3, T, 64, 64) and m.pretrained_cfg["num_frames"] == T
    assert m.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)


def test_shapes_and_timm_contract():
    m = small(num_classes=7).eval()
    x = torch.randn(2, 3, T, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, T * (1 + S), D)  # frame-major, a class token per frame
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    assert m(x).shape == (2, 7) and torch.isfinite(m(x)).all()
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    assert {"pos_embed", "cls_token", "time_embed", "temporal_head.cls_token"} <= m.no_weight_decay()


def test_bad_input_names_the_value():
    m = small().eval()
    with pytest.raises(ValueError, match="C=4"):
        m(torch.randn(1, 4, T, 64, 64))
    with pytest.raises(ValueError, match="T=8"):
        m(torch.randn(1, 3, 8, 64, 64))
    with pytest.raises(ValueError, match="64 x 48"):
        m(torch.randn(1, 3, T, 64, 48))
    with pytest.raises(ValueError, match="shift_div=64"):
        small(shift_div=64)  # 64-channel heads of a 4-head, 64-dim model: 16 channels, 0 to mix
    with pytest.raises(ValueError, match="-1"):
        small(ats_stages=(-1,))
    with pytest.raises(ValueError, match="ratio=0"):
        small("xvit_8_ats", ats_ratio=0.0)


# ---------------------------------------------------------------------------------------------- mixing


def test_mix_time_takes_channels_from_the_neighbouring_frames():
    b, t, h, n, dh, fold = 1, 3, 2, 1, 8, 2
    x = torch.arange(1, t + 1, dtype=torch.float).view(1, t, 1, 1, 1).expand(b, t, h, n, dh)  # value = frame + 1
    y = mix_time(x.reshape(b * t, h, n, dh), t, fold).view(t, h, dh)[:, 0]  # (T, Dh) head 0
    assert y[1].tolist() == [1, 1, 2, 2, 2, 2, 3, 3]  # middle frame: t-1 | t | t+1 channels (every head)
    assert y[0].tolist() == [0, 0, 1, 1, 1, 1, 2, 2]  # nothing before the clip
    assert y[2].tolist() == [2, 2, 3, 3, 3, 3, 0, 0]  # nothing after it
    assert torch.equal(mix_time(x.reshape(b * t, h, n, dh), t, 0), x.reshape(b * t, h, n, dh))


@pytest.mark.parametrize("shift_div, depth, frame, expected", [
    (8, 1, 2, {1, 2, 3}),  # one layer: the local window t-1 .. t+1
    (8, 1, 0, {0, 1}),  # at the clip border
    (8, 2, 2, {0, 1, 2, 3, 4}),  # two layers: +-2 (depth extends the temporal reach)
    (0, 2, 2, {2}),  # no mixing: the spatial-only baseline keeps frames apart
])
def test_mixing_window(shift_div, depth, frame, expected):
    torch.manual_seed(0)
    t = 5
    blocks = [XViTBlock(D, 4, num_frames=t, shift_div=shift_div).eval() for _ in range(depth)]
    x = torch.randn(1, t, 1 + S, D)
    y = x.clone()
    y[0, frame] += torch.randn(1 + S, D)  # perturb one whole frame
    with torch.no_grad():
        outs = []
        for z in (x, y):
            state = models.video_vit_common.initial_state(1, S, z.device)
            for blk in blocks:
                z, state = blk(z, state)
            outs.append(z)
    changed = (outs[0] - outs[1]).abs().amax(dim=(-1, -2))[0] > 1e-6  # (T,)
    assert set(changed.nonzero().flatten().tolist()) == expected


# -------------------------------------------------------------------------------------------- weights


def test_backbone_is_the_image_vit(tmp_path):
    vit, path = vit_file(tmp_path)
    ref = vit.state_dict()
    m = loaded(small(depth=2), path).eval()
    sd = m.state_dict()
    for key, value in ref.items():
        if not key.startswith("head."):
            assert torch.equal(sd[key], value), key  # every backbone weight is the ViT's
    assert not sd["time_embed"].any() and sd["head.weight"].shape == (400, 64)  # p_t zero, fresh Kinetics head
    frames = torch.randn(2, 3, 64, 64)
    image_tokens = vit.forward_features(frames)  # (2, 1+S, D)
    t = 5
    clip = frames[:, :, None].expand(-1, -1, t, -1, -1)  # 5 identical frames
    m5 = loaded(small(depth=2, num_frames=t), path).eval()
    with torch.no_grad():
        tokens = m5.forward_features(clip).view(2, t, 1 + S, D)
        # Identical frames: mixing a frame with identical neighbours changes nothing, so after 2 layers the
        # frames 2 away from the clip's borders ARE the image model; border frames miss a neighbour (zeros).
        assert torch.allclose(tokens[:, 2], image_tokens, atol=1e-5)
        assert not torch.allclose(tokens[:, 0], image_tokens, atol=1e-3)
        # Without mixing (the spatial-only baseline) every frame is the image model.
        flat = loaded(small(depth=2, num_frames=t, shift_div=0), path).eval()
        assert torch.allclose(flat.forward_features(clip).view(2, t, 1 + S, D),
                              image_tokens[:, None].expand(-1, t, -1, -1), atol=1e-5)


def test_builder_loads_strictly_and_resizes_pos_embed(tmp_path):
    vit, path = vit_file(tmp_path, depth=6)
    m = xvit_8_ats(checkpoint_path=str(path), **SMALL)  # builder -> family filter -> strict load
    assert [i for i, b in enumerate(m.blocks) if isinstance(b, ATSXViTBlock)] == [3, 4, 5]
    big = xvit_8(checkpoint_path=str(path), **{**SMALL, "img_size": 96})  # 4x4 grid -> 6x6, bicubic
    assert big.pos_embed.shape == (1, 37, 64) and torch.equal(big.pos_embed[:, 0], vit.pos_embed[:, 0])


def test_xvit_checkpoint_round_trip(tmp_path):
    m = small("xvit_8_ats")
    path = tmp_path / "xvit.pth"
    torch.save(m.state_dict(), path)
    other = loaded(small("xvit_8", seed=1), path, classifier="strict").eval()
    with torch.no_grad():
        set_ats_k(m.eval(), keep_all=True)
        x = clips(2)
        assert torch.allclose(other(x), m(x), atol=1e-5)  # ATS keeping everything == the plain model


# ------------------------------------------------------------------------------------------------ ATS


def test_k_bound_and_positions_shared_by_frames():
    m = peaky(small("xvit_8_ats")).eval()
    set_ats_k(m, 6)
    x = clips()
    with torch.no_grad():
        feats, traces = kept_tokens(m, x, "forward_features")
    assert [tr.stage for tr in traces] == [3, 4, 5]
    assert all(tr.grid == (4, 4) and tr.num_frames == T for tr in traces)  # positions of the frame grid
    for tr in traces:
        assert (tr.counts >= 1).all() and (tr.counts <= 6).all()
    kmax = int(traces[-1].counts.max())
    assert feats.shape == (4, T * (1 + kmax), D)
    live = feats.view(4, T, 1 + kmax, D)[:, :, 1:].abs().amax(-1) > 0  # (B, T, K'max)
    assert torch.equal(live, traces[-1].valid[:, None].expand(-1, T, -1))  # same slots live in every frame


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_match_the_formula_and_fall_with_k():
    geom = {"num_frames": T, "img_size": 64, "embed_dim": D, "depth": 6}
    plain = small()
    assert count_flops(plain, example_input(plain)).gflops * 1e9 == pytest.approx(analytic_flops(**geom), rel=1e-9)
    m = small("xvit_8_ats")
    last = None
    for k in (16, 8, 4):
        set_ats_k(m, k)
        g = count_flops(m, example_input(m)).gflops * 1e9
        assert g == pytest.approx(analytic_flops(**geom, ats={i: k for i in (3, 4, 5)}), rel=1e-9)
        assert last is None or g < last
        last = g


@pytest.mark.parametrize("frames, target", [(8, 142), (16, 283)])
def test_full_size_gflops_within_3_percent(frames, target):
    g = analytic_flops(num_frames=frames, img_size=224) / 1e9
    assert g == pytest.approx(target, rel=0.03)
    # ~T x one ViT-B/16 frame (timm's 17.6 GFLOPs figure) + the temporal aggregation (< 1%)
    per_frame = analytic_flops(num_frames=1, img_size=224, temporal_depth=0) / 1e9
    assert frames * per_frame < g < frames * per_frame * 1.01
    g_ats = analytic_flops(num_frames=frames, img_size=224, ats={i: 196 for i in range(3, 12)}) / 1e9
    assert g < g_ats <= g * 1.02  # ATS at K = N: the sampling work only


@pytest.mark.slow
def test_full_size_count_matches_the_formula():
    m = models.create_model("xvit_8")
    report = count_flops(m, example_input(m))
    assert report.gflops * 1e9 == pytest.approx(analytic_flops(num_frames=8, img_size=224), rel=1e-9)
    assert report.gflops == pytest.approx(142, rel=0.03)
