"""PS-ViT (models/psvit.py): geometry, sampling gradients, weight sharing, timm contract, checkpoints, figures."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

import models  # noqa: F401  (registers every family with timm)
from models.ats import ATSBlock, set_ats_k
from models.checkpoint import CheckpointMismatchError, load_checkpoint
from models.flops import count_flops, example_input, param_count
from models.point_sampling import sample_points
from models.psvit import (
    ProgressiveSampling,
    PSViT,
    apply_ats_to_psvit,
    checkpoint_filter_fn,
    initial_grid_points,
)
from models.trace import record

torch.set_num_threads(1)

PLAIN = ["psvit_ti_14", "psvit_b_10", "psvit_b_14", "psvit_b_18"]
SHARED = ["psvit_ti_14_shared", "psvit_b_10_shared", "psvit_b_14_shared", "psvit_b_18_shared"]

# A reduced PS-ViT for fast gradient / checkpoint tests: 64 px input -> 16 x 16 feature map.
SMALL = {"img_size": 64, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_points": 4, "num_iters": 3,
         "stem_widths": (32, 32), "num_classes": 10}


def small_model(**kwargs) -> PSViT:
    torch.manual_seed(0)
    return PSViT(**{**SMALL, **kwargs})


def traced(model, x, method: str = "forward"):
    """Output of ``model.<method>(x)``, the points p_1 .. p_N stacked (N, B, n*n, 2) and the ATS records."""
    with record() as trace:
        out = getattr(model, method)(x)
    points = torch.stack([r.points[:, :, 0] for r in trace.sampled_points()])  # (N, B, n*n, 2)
    return out, points, trace.kept_tokens()


# ------------------------------------------------------------------------------------------- geometry


def test_initial_grid_is_eq2_cell_centres():
    # n = 2: cells of half the map; PS-ViT eq. 2 gives their centres, row-major, as (x, y).
    expected = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]])
    assert torch.equal(initial_grid_points(2), expected)
    # n = 14 on a 56 x 56 map: step s = 4, point i at (4 * col + 2, 4 * row + 2) feature pixels.
    pts = initial_grid_points(14) * 56
    i = torch.arange(196)
    assert torch.allclose(pts[:, 0], 4 * (i % 14).float() + 2)
    assert torch.allclose(pts[:, 1], 4 * (i // 14).float() + 2)
    with pytest.raises(ValueError, match="0"):
        initial_grid_points(0)


def test_first_tokens_average_the_four_central_pixels_of_each_cell():
    # Continuous coordinate 4c + 2 lies halfway between the centres of pixels 4c + 1 and 4c + 2.
    feats = torch.randn(1, 3, 56, 56)
    tokens = sample_points(feats, initial_grid_points(14)[None])  # (1, 196, 3)
    # 2 x 2 windows starting at pixel (4 * row + 1, 4 * col + 1)
    expected = feats[:, :, 1:, 1:].unfold(2, 2, 4).unfold(3, 2, 4).mean(dim=(-1, -2))  # (1, 3, 14, 14)
    assert torch.allclose(tokens, expected.flatten(2).transpose(1, 2), atol=1e-5)


def test_offsets_start_at_zero_so_every_iteration_samples_the_grid():
    model = small_model().eval()
    with torch.no_grad():
        _, trace, _ = traced(model, torch.randn(2, 3, 64, 64))  # (N, B, n*n, 2)
    assert trace.shape == (3, 2, 16, 2)
    for t in range(3):
        assert torch.equal(trace[t], initial_grid_points(4).expand(2, -1, -1))
    for head in model.psm.offset_heads:
        assert not head.weight.any() and not head.bias.any()


def test_trained_offsets_move_points_by_feature_pixels():
    # o_t is predicted in feature pixels: a bias of (+2, -1) moves every point by (2/W_f, -1/H_f).
    model = small_model(num_iters=2, img_size=(64, 96)).eval()  # feature map 16 x 24 (H_f x W_f)
    with torch.no_grad():
        model.psm.offset_heads[0].bias.copy_(torch.tensor([2.0, -1.0]))
        _, points, _ = traced(model, torch.randn(1, 3, 64, 96))
    moved = points[1] - points[0]  # (1, 16, 2)
    assert torch.allclose(moved, torch.tensor([2.0 / 24, -1.0 / 16]).expand_as(moved))


# ------------------------------------------------------------------------------------------ gradients


def test_gradients_reach_offset_layers_through_sampling_only():
    psm = ProgressiveSampling(dim=8, num_heads=2, num_points=2, num_iters=3)
    psm.reset_offsets()
    # A spatially constant map: bilinear sampling has zero derivative w.r.t. interior points, and the
    # position embedding sees detached points, so the offset layers must get exactly zero gradient.
    flat = torch.ones(1, 8, 8, 8) * torch.randn(1, 8, 1, 1)
    psm(flat)[0].square().sum().backward()
    for head in psm.offset_heads:
        assert head.weight.grad is not None and not head.weight.grad.any()
    psm.zero_grad()
    psm(torch.randn(1, 8, 8, 8))[0].square().sum().backward()
    for head in psm.offset_heads:
        assert head.weight.grad.abs().sum() > 0  # PS-ViT eq. 9: through the bilinear kernel


def test_every_parameter_gets_a_gradient():
    model = small_model().train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(dim=1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


# ------------------------------------------------------------------------------------- weight sharing


def test_shared_variant_uses_one_layer_n_times():
    plain, shared = small_model(num_iters=4), small_model(num_iters=4, share_psm_weights=True)
    assert len(shared.psm.blocks) == 1 and len(shared.psm.offset_heads) == 1
    assert all(shared.psm.block_at(t) is shared.psm.blocks[0] for t in range(4))
    calls = []
    shared.psm.blocks[0].register_forward_hook(lambda *_: calls.append(1))
    shared(torch.randn(1, 3, 64, 64))
    assert len(calls) == 4
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # 3 fewer transformer layers and 2 fewer offset layers (C x 2 + 2) than the plain model.
    assert count(plain) - count(shared) == 3 * count(plain.psm.blocks[0]) + 2 * (32 * 2 + 2)


@pytest.mark.parametrize("name", SHARED)
def test_shared_names_build_shared_models(name):
    model = timm.create_model(name, num_classes=0)
    assert model.psm.share_weights and len(model.psm.blocks) == 1


# --------------------------------------------------------------------------------------- timm contract


@pytest.mark.parametrize("name", PLAIN + SHARED)
def test_full_size_forward_and_config(name):
    model = models.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["classifier"] == "head" and cfg["first_conv"] == "stem.conv1"
    n = int(name.split("_")[2])
    with torch.no_grad():
        feats, points, _ = traced(model, torch.randn(1, *cfg["input_size"]), "forward_features")
    assert feats.shape == (1, 1 + n * n, model.num_features)
    assert points.shape == (4, 1, n * n, 2)
    logits = model.forward_head(feats)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)


def test_reset_classifier_pooling_and_no_weight_decay():
    model = small_model()
    assert model.no_weight_decay() == {"cls_token"}
    model.reset_classifier(5, global_pool="avg")
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 32)
    with pytest.raises(ValueError, match="'max'"):
        model.reset_classifier(5, global_pool="max")


def test_sampling_points_parameters_and_table6_n1():
    model = small_model(num_points=5, num_iters=1)
    assert len(model.psm.offset_heads) == 0  # N = 1: the points never move (Table 6)
    logits, points, _ = traced(model, torch.randn(1, 3, 64, 64))
    assert logits.shape == (1, 10)
    assert points.shape == (1, 1, 25, 2)


# ----------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_value():
    model = small_model()  # channels and rank: tests/test_model_contract.py
    with pytest.raises(ValueError, match=r"\(48, 64\)"):
        model(torch.randn(1, 3, 48, 64))
    dynamic = small_model(dynamic_img_size=True)
    assert dynamic(torch.randn(1, 3, 48, 80)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"\(50, 64\)"):
        dynamic(torch.randn(1, 3, 50, 64))
    with pytest.raises(ValueError, match="0"):
        small_model(num_iters=0)
    with pytest.raises(ValueError, match="48"):
        small_model(stem_widths=(32, 48))
    with pytest.raises(ValueError, match="unknown model 'psvit_b_15'"):
        models.create_model("psvit_b_15")


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    model = small_model().eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "psvit.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    fresh = small_model(share_psm_weights=False)
    torch.manual_seed(1)
    fresh.init_weights()
    load_checkpoint(fresh.eval(), path)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-6)
    # A plain checkpoint does not fit the shared model: the extra sampling layers are named.
    with pytest.raises(CheckpointMismatchError, match="psm.blocks.1"):
        load_checkpoint(small_model(share_psm_weights=True), path)
    bad = {k: v for k, v in model.state_dict().items() if k != "cls_token"}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="cls_token"):
        load_checkpoint(small_model(), tmp_path / "bad.pth")


# ------------------------------------------------------------------------------- release checkpoints


def _release_state_dict(model: PSViT) -> dict[str, torch.Tensor]:
    """A state dict laid out as the official release's PSViT (random values, release key names)."""
    sd = {}
    for key, value in model.state_dict().items():
        key = (key.replace("stem.conv1.", "stem.0.").replace("stem.bn1.", "stem.1.")
               .replace("stem.layer1.0.", "stem.4.").replace("stem.layer1.1.", "stem.5."))
        if key.startswith("psm.blocks."):
            i, rest = key.split(".", 3)[2:]
            key = f"ps_layers.{i}.transformer_layer.{rest}"
        elif key.startswith("psm.offset_heads."):
            i, rest = key.split(".", 3)[2:]
            key = f"ps_layers.{i}.offset_layer.{rest}"
        elif key.startswith("psm.pos_embed."):
            key = "pos_layer." + key.rsplit(".", 1)[1]
        elif key.startswith("blocks."):
            key = "trans_layers." + key[len("blocks."):]
        sd[key] = torch.randn_like(value) if value.is_floating_point() else value
    for i in range(model.num_iters):  # the shared position layer appears once per iteration as well
        sd[f"ps_layers.{i}.position_layer.weight"] = sd["pos_layer.weight"]
        sd[f"ps_layers.{i}.position_layer.bias"] = sd["pos_layer.bias"]
    return sd


def test_release_conversion_preserves_geometry_and_attention():
    model = small_model(img_size=(64, 96))  # non-square so that x and y cannot be confused
    release = _release_state_dict(model)
    model.load_state_dict(checkpoint_filter_fn(release, model))
    feat_xy = torch.tensor([96 / 4, 64 / 4])
    # Position embedding: the release embeds (y, x) pixel indices / feat_size; pixel index = p * size - 0.5.
    p = torch.rand(5, 2)  # our normalised (x, y)
    idx_yx = ((p * feat_xy - 0.5) / feat_xy).flip(-1)
    ref = idx_yx @ release["pos_layer.weight"].T + release["pos_layer.bias"]
    assert torch.allclose(model.psm.pos_embed(p), ref, atol=1e-5)
    # Offsets: release predicts (dy, dx) pixels; ours (dx, dy) pixels.
    tok = torch.randn(5, 32)
    ref_off = tok @ release["ps_layers.0.offset_layer.weight"].T + release["ps_layers.0.offset_layer.bias"]
    assert torch.allclose(model.psm.offset_heads[0](tok), ref_off.flip(-1), atol=1e-5)
    # Attention with the release's qk_scale = C ** -0.5, written out by hand.
    x = torch.randn(1, 6, 32)
    pre = "trans_layers.0."
    h = nn.functional.layer_norm(x, (32,), release[pre + "norm1.weight"], release[pre + "norm1.bias"], 1e-5)
    q, k, v = (h @ release[pre + "attn.qkv.weight"].T).view(1, 6, 3, 2, 16).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-1, -2)) * 32 ** -0.5).softmax(-1)  # (1, heads, 6, 6)
    out = (attn @ v).transpose(1, 2).reshape(1, 6, 32) @ release[pre + "attn.proj.weight"].T
    out = out + release[pre + "attn.proj.bias"]
    block = model.blocks[0]
    assert torch.allclose(block.attn(block.norm1(x)), out, atol=1e-4)


# ------------------------------------------------------------------------------------------------ ATS


def test_ats_variant_converts_layers_1_to_9_and_keeps_state_dict_keys(tmp_path):
    ats = models.create_model("psvit_b_14_ats").eval()
    assert type(ats.blocks[0]) is Block
    assert all(isinstance(b, ATSBlock) for b in ats.blocks[1:]) and len(ats.blocks) == 10
    plain = models.create_model("psvit_b_14").eval()
    assert ats.state_dict().keys() == plain.state_dict().keys()
    torch.save(plain.state_dict(), tmp_path / "b14.pth")
    load_checkpoint(ats, tmp_path / "b14.pth")  # strict
    set_ats_k(ats, keep_all=True)  # nothing sampled away: exactly the plain model
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ats(x), plain(x), atol=1e-4)


def test_ats_keeps_at_most_k_tokens_and_stays_trainable():
    model = apply_ats_to_psvit(small_model(depth=4), k=5)  # 16 sampled tokens, K = 5 in layers 1-3
    model.train()
    logits, points, traces = traced(model, torch.randn(3, 3, 64, 64))
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    assert [t.stage for t in traces] == [1, 2, 3]
    previous = torch.full((3,), 16)
    for trace in traces:
        assert trace.grid is None and torch.equal(trace.candidates_xy, points[-1])  # the tokens sampled at p_N
        counts = trace.counts  # (B,) K' per image
        assert (counts >= 1).all() and (counts <= 5).all() and (counts <= previous).all()
        for pos in trace.kept_positions:  # indices into the n*n sampled tokens
            assert pos.min() >= 0 and pos.max() < 16
        previous = counts
    logits.logsumexp(dim=1).sum().backward()
    assert model.blocks[3].attn.qkv.weight.grad.abs().sum() > 0
    assert model.psm.offset_heads[0].weight.grad.abs().sum() > 0


def test_ats_default_k_is_the_stage_input_and_bad_k_is_refused():
    model = apply_ats_to_psvit(small_model(depth=3)).eval()
    with torch.no_grad():
        _, _, traces = traced(model, torch.randn(2, 3, 64, 64))
    assert all((t.counts <= 16).all() for t in traces)
    with pytest.raises(ValueError, match="k=0"):
        apply_ats_to_psvit(small_model(depth=3), k=0)
    with pytest.raises(ValueError, match="1.5"):
        apply_ats_to_psvit(small_model(depth=3), ratio=1.5)
    with pytest.raises(ValueError, match="stage 3"):
        apply_ats_to_psvit(small_model(depth=3), stages=[1, 3])
    # Average pooling ignores the padding of images that kept fewer tokens than the batch maximum.
    avg = apply_ats_to_psvit(small_model(depth=3, global_pool="avg"), k=12).eval()
    torch.manual_seed(0)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        for block in avg.blocks:  # peaky attention: repeated picks, so K' differs between images
            block.attn.qkv.weight.mul_(20)
        feats = avg.forward_features(x)  # (B, 1 + K'max, C), zero rows where padded
        same, mask = avg.forward_features_masked(x)  # (B, 1 + K'max): the mask forward() hands the head
        pooled = avg.forward_head(feats, pre_logits=True)  # no mask given: all-zero rows are the padding
        logits = avg.forward_head(feats)
        alone = [avg(x[i:i + 1]) for i in range(3)]
    assert torch.equal(same, feats) and torch.allclose(logits, avg(x), atol=1e-6)
    assert mask is not None and not mask.all() and not feats[~mask].any()
    live = mask[:, 1:, None].float()
    assert torch.allclose(pooled, (feats[:, 1:] * live).sum(1) / live.sum(1), atol=1e-6)
    assert torch.allclose(logits, torch.cat(alone), atol=1e-4)  # batch independence


# ---------------------------------------------------------------------------------------------- figures

# Paper figures (PS-ViT Tables 3 and 8): params (M) and GFLOPs at 224 x 224; targets within 3%.
PAPER = {"psvit_ti_14": (4.8, 1.6), "psvit_b_10": (21.3, 3.1), "psvit_b_14": (21.3, 5.4),
         "psvit_b_18": (21.3, 8.8), "psvit_ti_14_shared": (3.7, None), "psvit_b_14_shared": (16.9, None),
         "psvit_b_10_shared": (16.9, None), "psvit_b_18_shared": (16.9, None)}


@pytest.mark.parametrize("name", list(PAPER))
def test_params_and_gflops_match_the_paper(name):
    params, gflops = PAPER[name]
    model = models.create_model(name)
    if gflops is None:  # Table 8 gives parameters only; sharing does not change the cost
        assert param_count(model) / 1e6 == pytest.approx(params, rel=0.03)
        return
    report = count_flops(model, example_input(model))
    assert report.params_m == pytest.approx(params, rel=0.03)
    assert report.gflops == pytest.approx(gflops, rel=0.03)


def test_ats_gflops_fall_with_k_and_upper_bound_matches_plain():
    plain = count_flops(models.create_model("psvit_b_14"), torch.randn(1, 3, 224, 224)).gflops
    full = count_flops(models.create_model("psvit_b_14_ats"), torch.randn(1, 3, 224, 224)).gflops
    half = count_flops(models.create_model("psvit_b_14_ats", ats_k=98), torch.randn(1, 3, 224, 224)).gflops
    assert plain <= full <= plain * 1.01  # K' = K = all tokens: only ATS's own scoring work is added

    def layer(n_in: int, n_out: int, dim: int = 384) -> int:
        # qkv on the inputs, attention rows of the kept tokens, proj + FFN (ratio 3) on them, 2 LayerNorms
        return n_in * 3 * dim * dim + n_out * n_in * 2 * dim + n_out * 7 * dim * dim + 5 * dim * (n_in + n_out)

    # K = 98 at the upper bound: layer 1 keeps 1 + 98 of 197 rows, layers 2-9 run on 99 tokens;
    # the stem, the sampling module and layer 0 are unchanged.
    saved = 9 * layer(197, 197) - layer(197, 99) - 8 * layer(99, 99)
    assert plain - half == pytest.approx(saved / 1e9, rel=0.01)
