"""ToMe and EViT, the rival token reducers: their algorithms on hand-made inputs, their equality with plain
timm DeiT when nothing is reduced, fused/manual parity, static shapes (compile, export) and their GFLOPs."""

from __future__ import annotations

import math

import pytest
import timm
import torch

import models
from models.attention import set_model_fused_attn
from models.evit import (
    EViTVisionTransformer,
    apply_evit,
    evit_kept_counts,
    fuse_inattentive,
    keep_attentive,
    set_evit_keep_rate,
)
from models.flops import count_flops
from models.tome import (
    TokenMatch,
    ToMeVisionTransformer,
    apply_tome,
    bipartite_soft_matching,
    merge_weighted,
    set_tome_r,
    tome_schedule,
)

torch.set_num_threads(1)
SMALL = dict(img_size=64, embed_dim=48, num_heads=3, depth=6, num_classes=7)  # 16 patches + class token


def _deit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("deit_small_patch16_224", pretrained=False, **SMALL).eval()


def _reducer(name: str, **kwargs) -> torch.nn.Module:
    model = models.create_model(name, **SMALL, **kwargs).eval()
    model.load_state_dict(_deit().state_dict())  # same parameters as timm's ViT: strict load
    return model


# ------------------------------------------------------------------ ToMe: the algorithm


def test_matching_merges_the_most_similar_pair_and_protects_the_class_token():
    # Tokens 0..5 (A = 0, 2, 4; B = 1, 3, 5). Token 4 equals token 5; token 0 (class) equals token 1.
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.6, 0.8], [0.6, 0.8]]])
    match = bipartite_soft_matching(metric, r=1)
    assert match.src.flatten().tolist() == [2]  # A-position 2 = token 4 (the class token is never a source)
    assert match.dst.flatten().tolist() == [2]  # B-position 2 = token 5
    assert match.unmerged.flatten().tolist() == [0, 1]  # class token first, ascending


def test_weighted_merge_averages_by_size_and_conserves_it():
    x = torch.tensor([[[0.0], [10.0], [4.0], [20.0]]])  # A = tokens 0, 2; B = tokens 1, 3
    size = torch.tensor([[[1.0], [1.0], [3.0], [1.0]]])
    match = TokenMatch(src=torch.tensor([[[1]]]), dst=torch.tensor([[[0]]]), unmerged=torch.tensor([[[0]]]))
    merged, new_size = merge_weighted(x, size, match)  # token 2 (size 3, value 4) merges into token 1
    assert merged.flatten().tolist() == [0.0, (3 * 4.0 + 10.0) / 4, 20.0]
    assert new_size.flatten().tolist() == [1.0, 4.0, 1.0]


def test_schedule_is_clipped_to_half_of_the_mergeable_tokens():
    assert tome_schedule(13, depth=4, num_tokens=17) == [8, 4, 2, 1]
    assert tome_schedule([0, 3, 0], depth=3, num_tokens=197) == [0, 3, 0]
    with pytest.raises(ValueError, match="one per block"):
        tome_schedule([1, 2], depth=3, num_tokens=197)


def test_tome_token_counts_and_sizes_follow_the_schedule():
    model = _reducer("deit_small_tome", tome_r=3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model.forward_features(x)
    assert out.shape == (2, 17 - sum(model.merge_schedule()), 48)
    assert model.merge_schedule() == [3, 3, 3, 3, 2, 1]  # 17 -> 14 -> 11 -> 8 -> 5: then at most (5 - 1) // 2


# ------------------------------------------------------------------ EViT: the algorithm


def test_keep_attentive_and_fusion_follow_evit_eqs_3_4():
    x = torch.arange(5.0).reshape(1, 5, 1)  # class token 0, then tokens valued 1..4
    cls_attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])  # over tokens 1..4
    kept, idx = keep_attentive(x, cls_attn, keep=2)
    assert idx.tolist() == [[1, 3]]  # tokens 2 and 4, highest attention first
    assert kept.flatten().tolist() == [0.0, 2.0, 4.0]
    fused = fuse_inattentive(x, cls_attn, idx)  # tokens 1 and 3 weighted by 0.1 and 0.2
    assert fused.flatten().tolist() == pytest.approx([0.1 * 1.0 + 0.2 * 3.0])


def test_evit_kept_counts_match_ceil_of_the_keep_rate():
    assert evit_kept_counts([1.0, 0.7, 1.0, 0.7], 197) == [196, 138 + 1, 139, math.ceil(0.7 * 139) + 1]


def test_evit_token_count_after_forward():
    model = _reducer("deit_small_evit", evit_keep_rate=0.5)  # depth 6: location 3 only
    assert model.evit_locations == (3,)
    with torch.no_grad():
        out = model.forward_features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1 + 8 + 1, 48)  # class + ceil(0.5 * 16) kept + fused


def test_evit_refuses_bad_settings():
    model = _reducer("deit_small_evit")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        set_evit_keep_rate(model, 1.5)
    with pytest.raises(ValueError, match="locations"):
        apply_evit(_deit(), 0.7, locations=(9,))
    with pytest.raises(TypeError):
        set_tome_r(model, 4)


# ------------------------------------------------------------------ both: equal to timm when nothing is reduced


@pytest.mark.parametrize("name,knob", [("deit_small_tome", {"tome_r": 0}), ("deit_small_evit", {"evit_keep_rate": 1.0})])
def test_nothing_reduced_equals_timm_deit(name, knob):
    model, ref = _reducer(name, **knob), _deit()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["deit_small_tome", "deit_small_evit"])
def test_fused_and_manual_attention_agree(name):
    model, x, logits = _reducer(name), torch.randn(2, 3, 64, 64), {}
    for fused in (True, False):
        assert set_model_fused_attn(model, fused) == len(model.blocks)
        with torch.no_grad():
            logits[fused] = model(x)
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-5)


def test_apply_functions_convert_in_place_and_refuse_twice():
    tome = apply_tome(_deit(), r=2)
    assert isinstance(tome, ToMeVisionTransformer)
    with pytest.raises(ValueError, match="already"):
        apply_tome(tome)
    evit = apply_evit(_deit(), 0.7, locations=(1, 3))
    assert isinstance(evit, EViTVisionTransformer) and evit.keep_rates() == [1.0, 0.7, 1.0, 0.7, 1.0, 1.0]


# ------------------------------------------------------------------ static shapes: compile and export


@pytest.mark.slow
@pytest.mark.parametrize("name", ["deit_small_tome", "deit_small_evit"])
def test_compile_fullgraph_and_export_with_a_dynamic_batch(name):
    model = _reducer(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    with torch.no_grad():
        x5 = torch.randn(5, 3, 64, 64)
        torch.testing.assert_close(program.module()(x5), model(x5), rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ GFLOPs from the shared counter


def test_gflops_fall_with_the_knob_and_evit_matches_its_paper():
    tome = models.create_model("deit_small_tome")
    evit = models.create_model("deit_small_evit")
    x = torch.randn(1, 3, 224, 224)
    tome_g = [count_flops(set_tome_r(tome, r), x).gflops for r in (0, 8, 16)]
    evit_g = [count_flops(set_evit_keep_rate(evit, k), x).gflops for k in (1.0, 0.7, 0.5)]
    assert tome_g[0] == pytest.approx(4.6, rel=0.01) and tome_g[0] > tome_g[1] > tome_g[2]
    assert evit_g[0] == pytest.approx(4.6, rel=0.01) and evit_g[0] > evit_g[1] > evit_g[2]
    # EViT Table 1 (DeiT-S): keep rate 0.7 -> 3.0 GMACs, 0.5 -> 2.3
    assert evit_g[1] == pytest.approx(3.0, rel=0.03) and evit_g[2] == pytest.approx(2.3, rel=0.03)
