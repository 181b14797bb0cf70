"""TimeSformer (models/timesformer.py) and the shared video-ATS pieces (models/video_vit_common.py):
shapes and the timm contract, divided attention structure, ViT -> TimeSformer inflation and strict
loading, ATS across time (K, shared positions, batch independence, gradients), GFLOPs vs the formula."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import models
from models.ats import set_ats_k
from models.flops import count_flops, example_input, param_count
from models.timesformer import (
    ATS_STAGES,
    ATSDividedBlock,
    DividedBlock,
    TimeSformer,
    analytic_flops,
    timesformer_base,
    timesformer_base_ats,
)
from models.video_vit_common import sample_clip_positions, vit_pos_embed_to_grid
from tests.model_fixtures import VIDEO_VIT_SMALL as SMALL
from tests.model_fixtures import D, S, T, clips, kept_tokens, loaded, peaky, small_video_vit, vit_file

torch.set_num_threads(1)


def small(name: str = "timesformer_base", seed: int = 0, **kwargs) -> TimeSformer:
    return small_video_vit(name, seed, **kwargs)


# --------------------------------------------------------------------------------------- shapes, contract


def test_registered_variants_and_cfgs():
    names = models.list_models("timesformer")
    assert names == sorted(["timesformer_base", "timesformer_hr", "timesformer_large", "timesformer_base_ats",
                            "timesformer_hr_ats", "timesformer_large_ats"])
    cfgs = {n: timm.models.get_pretrained_cfg(n).to_dict() for n in names}
    assert cfgs["timesformer_base"]["input_size"] == (3, 8, 224, 224)
    assert cfgs["timesformer_hr"]["input_size"] == (3, 16, 448, 448)
    assert cfgs["timesformer_large"]["input_size"] == (3, 96, 224, 224)
    m = small()
    assert m.pretrained_cfg["input_size"] == (3, T, 64, 64) and m.pretrained_cfg["num_frames"] == T
    assert m.pretrained_cfg["first_conv"] == "patch_embed.proj" and m.pretrained_cfg["classifier"] == "head"


def test_shapes_and_timm_contract():
    m = small(num_classes=7).eval()
    x = torch.randn(2, 3, T, 64, 64)
    feats = m.forward_features(x)
    assert feats.shape == (2, 1 + S * T, D)
    assert m.forward_head(feats, pre_logits=True).shape == (2, D) and m.num_features == D
    assert m(x).shape == (2, 7) and torch.isfinite(m(x)).all()
    m.reset_classifier(3)
    assert m(x).shape == (2, 3) and m.get_classifier().out_features == 3
    assert {"pos_embed", "cls_token", "time_embed"} <= m.no_weight_decay()


def test_bad_input_names_the_value():
    m = small().eval()
    with pytest.raises(ValueError, match="C=1"):
        m(torch.randn(1, 1, T, 64, 64))
    with pytest.raises(ValueError, match="T=5"):
        m(torch.randn(1, 3, 5, 64, 64))
    with pytest.raises(ValueError, match="80 x 64"):
        m(torch.randn(1, 3, T, 80, 64))
    with pytest.raises(ValueError, match="4-D"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="img_size"):
        small(img_size=60)
    with pytest.raises(ValueError, match="12"):
        small(ats_stages=(12,))
    with pytest.raises(ValueError, match="k=0"):
        small("timesformer_base_ats", ats_k=0)
    with pytest.raises(ValueError, match="ratio=1.5"):
        small("timesformer_base_ats", ats_ratio=1.5)
    with pytest.raises(ValueError, match="no ATS stage"):
        small(ats_k=4)
    with pytest.raises(ValueError, match="unknown model 'timesformer_tiny'"):
        models.create_model("timesformer_tiny")


# ------------------------------------------------------------------------------- divided attention


def _changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().amax(dim=-1) > 1e-6


def test_temporal_attention_mixes_only_the_same_position():
    torch.manual_seed(0)
    blk = DividedBlock(D, 4, num_frames=T).eval()
    nn.init.normal_(blk.temporal_fc.weight, std=0.2)  # non-zero: the temporal branch is active
    x = torch.randn(1, 1 + S * T, D)
    s0, t0 = 5, 1
    y = x.clone()
    y[0, 1 + s0 * T + t0] += torch.randn(D)  # perturb one patch: position s0 in frame t0 (not a constant: LN)
    with torch.no_grad():
        changed = _changed(blk._temporal(x), blk._temporal(y)).view(S, T)  # (S, T)
    assert changed[s0].all()  # its whole tube (all frames at s0) changes ...
    assert not changed[torch.arange(S) != s0].any()  # ... and no other position


def test_spatial_attention_mixes_only_the_same_frame():
    torch.manual_seed(0)
    blk = DividedBlock(D, 4, num_frames=T).eval()
    x = torch.randn(1, 1 + S * T, D)
    s0, t0 = 5, 2
    y = x.clone()
    y[0, 1 + s0 * T + t0] += torch.randn(D)
    with torch.no_grad():
        out = [blk.attn(blk.norm1(blk._frames(z[:, :1], z[:, 1:]))) for z in (x, y)]  # (T, 1+S, D) each
    changed = _changed(*out)  # (T, 1+S): frame t0's class row and all its patches
    assert changed[t0].all() and not changed[torch.arange(T) != t0].any()


def test_fresh_model_temporal_branch_is_identity():
    m = small()
    assert all(not b.temporal_fc.weight.any() and not b.temporal_fc.bias.any() for b in m.blocks)
    assert not m.time_embed.any()


# -------------------------------------------------------------------------------------------- weights


def test_inflated_vit_reproduces_image_logits(tmp_path):
    vit, path = vit_file(tmp_path)
    img = torch.randn(2, 3, 64, 64)
    ref = vit(img)
    for t in (1, 3):  # one frame, or T identical frames: the image model's prediction
        m = timesformer_base(img_size=64, num_frames=t, embed_dim=64, num_heads=4, depth=2, num_classes=1000,
                             checkpoint_path=str(path)).eval()
        clip = img[:, :, None].expand(-1, -1, t, -1, -1)
        assert torch.allclose(m(clip), ref, atol=1e-5), t


def test_inflation_follows_the_paper(tmp_path):
    vit, path = vit_file(tmp_path)
    m = loaded(small(depth=2), path).eval()
    sd, ref = m.state_dict(), vit.state_dict()
    for i in range(2):
        p = f"blocks.{i}."
        for sub in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias"):
            assert torch.equal(sd[p + "temporal_attn." + sub], ref[p + "attn." + sub])  # temporal <- spatial
            assert torch.equal(sd[p + "attn." + sub], ref[p + "attn." + sub])
        assert torch.equal(sd[p + "temporal_norm1.weight"], ref[p + "norm1.weight"])
        assert not sd[p + "temporal_fc.weight"].any() and not sd[p + "temporal_fc.bias"].any()
    assert torch.equal(sd["patch_embed.proj.weight"], ref["patch_embed.proj.weight"])
    assert not sd["time_embed"].any() and sd["head.weight"].shape == (400, 64)  # Kinetics head, fresh
    # Different clip size: the 4x4 position grid is resized bicubically to 6x6 (class row kept).
    m96 = loaded(small(depth=2, img_size=96), path)
    pe = m96.state_dict()["pos_embed"]
    assert pe.shape == (1, 37, 64) and torch.equal(pe[:, 0], ref["pos_embed"][:, 0])
    assert torch.allclose(pe, vit_pos_embed_to_grid(ref["pos_embed"], (6, 6)))
    flat = torch.cat([ref["pos_embed"][:, :1], torch.ones(1, 16, 64)], dim=1)  # a constant grid stays constant
    assert torch.allclose(vit_pos_embed_to_grid(flat, (6, 6))[:, 1:], torch.ones(1, 36, 64), atol=1e-5)


def test_ats_variant_loads_the_same_checkpoint_strictly(tmp_path):
    _, path = vit_file(tmp_path, depth=6)
    m = timesformer_base_ats(checkpoint_path=str(path), **SMALL)  # builder -> family filter -> strict load
    assert [type(b) for b in m.blocks].count(ATSDividedBlock) == len(ATS_STAGES) == 3
    assert [i for i, b in enumerate(m.blocks) if isinstance(b, ATSDividedBlock)] == [3, 4, 5]


# ------------------------------------------------------------------------------------------------ ATS


def test_clip_positions_pool_the_frames_scores():
    """Frame 0's class token looks at position 2, frame 1's at position 5: with K = 2 the clip keeps
    {2, 5} in both frames (the mean of per-frame ATS eq. 3 scores is 1/2 each)."""
    t, h, s, dh = 2, 1, 8, 4
    k = torch.zeros(t, h, 1 + s, dh)
    v = torch.ones(t, h, 1 + s, dh)
    q_cls = torch.zeros(t, h, dh)
    q_cls[:, :, 0] = 1.0
    k[0, :, 1 + 2, 0] = 50.0  # frame 0: class attention ~1 on position 2
    k[1, :, 1 + 5, 0] = 50.0  # frame 1: on position 5
    idx, valid = sample_clip_positions(q_cls, k, v, num_frames=t, pos_mask=None, budget=torch.tensor([2]),
                                       scale=1.0)
    assert idx[valid].tolist() == [2, 5]
    # K = 1: a single position for the whole clip (the first half of the CDF: position 2).
    idx, valid = sample_clip_positions(q_cls, k, v, num_frames=t, pos_mask=None, budget=torch.tensor([1]),
                                       scale=1.0)
    assert idx[valid].tolist() == [2]


def test_k_bound_and_positions_shared_by_frames():
    m = peaky(small("timesformer_base_ats")).eval()
    set_ats_k(m, 6)
    x = clips()
    with torch.no_grad():
        feats, traces = kept_tokens(m, x, "forward_features")
    assert [tr.stage for tr in traces] == [3, 4, 5]
    assert all(tr.grid == (4, 4) and tr.num_frames == T for tr in traces)  # positions of the frame grid
    prev = [torch.arange(S)] * x.shape[0]
    for tr in traces:
        assert (tr.counts >= 1).all() and (tr.counts <= 6).all()  # K' <= K, never collapsed
        for kept, before in zip(tr.kept_positions, prev):
            assert kept.tolist() == sorted(set(kept.tolist()))  # unique, ascending
            assert set(kept.tolist()) <= set(before.tolist())  # a later stage keeps a subset
        prev = tr.kept_positions
    kmax = int(traces[-1].counts.max())
    assert feats.shape == (4, 1 + kmax * T, D)  # K'max positions, each with all T frames
    live = feats[:, 1:].abs().amax(-1).view(4, kmax, T) > 0  # (B, K'max, T): a position is live in all frames
    assert torch.equal(live, traces[-1].valid[:, :, None].expand(-1, -1, T))


def test_keep_all_equals_the_plain_model():
    plain = small().eval()
    ats = small("timesformer_base_ats").eval()
    ats.load_state_dict(plain.state_dict(), strict=True)
    set_ats_k(ats, keep_all=True)
    x = clips(2)
    with torch.no_grad():
        assert torch.allclose(ats(x), plain(x), atol=1e-5)


def test_ratio_with_floor():
    m = peaky(small("timesformer_base_ats", ats_ratio=0.25, ats_floor=2)).eval()  # K = max(floor(.25 * 17), 2) = 4
    with torch.no_grad():
        _, traces = kept_tokens(m, clips(2))
    assert int(traces[0].counts.max()) <= 4
    set_ats_k(m, ratio=0.25)  # default floor 8: K = 8
    with torch.no_grad():
        _, traces = kept_tokens(m, clips(2))
    assert 4 < int(traces[0].counts.max()) <= 8


def test_grad_checkpointing_gives_the_same_gradients():
    x = clips(2)
    grads = []
    for enable in (False, True):
        m = peaky(small("timesformer_base_ats")).train()
        set_ats_k(m, 5)
        m.set_grad_checkpointing(enable)
        m(x).logsumexp(-1).sum().backward()
        grads.append(m.blocks[1].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---------------------------------------------------------------------------------------------- FLOPs


def test_flops_match_the_formula_at_reduced_size():
    geom = {"num_frames": T, "img_size": 64, "embed_dim": D, "depth": 6}
    plain = small()
    assert count_flops(plain, example_input(plain)).gflops * 1e9 == pytest.approx(analytic_flops(**geom), rel=1e-9)
    m = small("timesformer_base_ats")
    last = None
    for k in (16, 8, 4):  # upper bound K' = K: cost falls with K and is exactly the formula
        set_ats_k(m, k)
        g = count_flops(m, example_input(m)).gflops * 1e9
        assert g == pytest.approx(analytic_flops(**geom, ats={i: k for i in ATS_STAGES}), rel=1e-9)
        assert last is None or g < last
        last = g


@pytest.mark.parametrize("frames, size, classes, target", [(8, 224, 400, 196), (16, 448, 600, 1703),
                                                            (96, 224, 400, 2380)])
def test_full_size_gflops_within_3_percent(frames, size, classes, target):
    g = analytic_flops(num_frames=frames, img_size=size, num_classes=classes) / 1e9
    assert g == pytest.approx(target, rel=0.03)
    # ATS at its upper bound with the paper's default K = all positions: + the sampling work only.
    g_ats = analytic_flops(num_frames=frames, img_size=size, num_classes=classes,
                           ats={i: (size // 16) ** 2 for i in ATS_STAGES}) / 1e9
    assert g < g_ats <= g * 1.01


def test_full_size_params():
    m = models.create_model("timesformer_base")
    assert param_count(m) / 1e6 == pytest.approx(121, rel=0.03)


@pytest.mark.slow
def test_full_size_count_matches_the_formula():
    m = models.create_model("timesformer_base")
    report = count_flops(m, example_input(m))
    assert report.gflops * 1e9 == pytest.approx(analytic_flops(num_frames=8, img_size=224), rel=1e-9)
    assert report.gflops == pytest.approx(196, rel=0.03)
