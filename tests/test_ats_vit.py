"""ATS on timm DeiT/ViT (models/ats_vit.py): conversion, strict timm checkpoints, K at every stage,
batch independence, no collapse, gradients, set_ats_k, bad inputs, registered variants."""

from __future__ import annotations

import pytest
import timm
import torch

import models
from models import ats
from models.ats import ATSAttention, ATSBlock, MaskedBlock, set_ats_k
from models.ats_vit import MULTI_STAGES, SINGLE_STAGE, ATSVisionTransformer, apply_ats
from models.attention import set_model_fused_attn
from models.checkpoint import CheckpointMismatchError, load_checkpoint
from models.trace import record

torch.set_num_threads(1)

# A small DeiT: 64x64 images, 16 patches, 6 blocks; ATS at blocks 1, 2 and 4.
SMALL = dict(img_size=64, embed_dim=64, num_heads=4, depth=6)


def small_ats(stages=(1, 2, 4), peaky: float = 4.0, **kw):
    """A small ATS DeiT with sharpened attention (random weights are nearly uniform: K' ~ K)."""
    torch.manual_seed(0)
    model = models.create_model("deit_small_ats", **SMALL, ats_stages=stages, **kw).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight[: 2 * 64].mul_(peaky)  # q and k rows only
    return model


def images(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def kept(model, x):
    """Logits and the KeptTokens records (one per ATS stage) of one forward."""
    with record() as trace:
        logits = model(x)
    return logits, trace.kept_tokens()


# ---------------------------------------------------------------------------------------------
# Registered variants and conversion
# ---------------------------------------------------------------------------------------------

def test_registered_variants_have_the_paper_settings():
    expected = {"deit_small_ats_k108": 108, "deit_small_ats_k78": 78, "deit_small_ats_k48": 48}
    for name, k in expected.items():
        m = models.create_model(name)
        kinds = [type(b) for b in m.blocks]
        assert kinds[:3] == [timm.models.vision_transformer.Block] * 3
        assert kinds[3] is ATSBlock and all(t is MaskedBlock for t in kinds[4:])
        assert m.blocks[3].attn.ats_k == k
    m = models.create_model("deit_small_ats")
    assert [i for i, b in enumerate(m.blocks) if isinstance(b, ATSBlock)] == list(MULTI_STAGES) == list(range(3, 12))
    assert all(b.attn.ats_ratio == 1.0 for b in m.blocks[3:])
    m = models.create_model("deit_tiny_ats", single_stage=True)
    assert [i for i, b in enumerate(m.blocks) if isinstance(b, ATSBlock)] == list(SINGLE_STAGE)
    assert m.embed_dim == 192 and models.create_model("deit_base_ats").embed_dim == 768
    assert set(expected) | {"deit_tiny_ats", "deit_small_ats", "deit_base_ats"} <= set(models.list_models("ats"))


def test_state_dict_is_timms_and_a_timm_checkpoint_loads_strictly(tmp_path):
    torch.manual_seed(0)
    timm_model = timm.create_model("deit_small_patch16_224").eval()
    path = tmp_path / "deit_small.pth"
    torch.save(timm_model.state_dict(), path)
    ats_model = models.create_model("deit_small_ats").eval()
    own = {k: v.shape for k, v in ats_model.state_dict().items()}
    assert own == {k: v.shape for k, v in timm_model.state_dict().items()}
    load_checkpoint(ats_model, path)  # strict: every key, the classifier included
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        set_ats_k(ats_model, keep_all=True)  # nothing dropped: exactly timm's network
        torch.testing.assert_close(ats_model(x), timm_model(x), atol=1e-5, rtol=1e-4)


def test_checkpoint_with_wrong_shape_is_refused_by_key(tmp_path):
    model = small_ats()
    sd = model.state_dict()
    sd["blocks.2.attn.qkv.weight"] = torch.zeros(5, 64)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.2\.attn\.qkv\.weight"):
        load_checkpoint(small_ats(), path)


def test_apply_ats_converts_any_timm_vit_in_place_and_keeps_parameters():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", img_size=64, depth=4, global_pool="avg").eval()
    params = {k: v.clone() for k, v in vit.state_dict().items()}
    x = images(2)
    with torch.no_grad():
        ref = vit(x)
    out = apply_ats(vit, stages=[1], k=5)
    assert out is vit and isinstance(vit, ATSVisionTransformer)
    assert all(torch.equal(params[k], v) for k, v in vit.state_dict().items())
    with torch.no_grad():
        y, traces = kept(vit, x)
        assert traces[0].counts.max() <= 5
        set_ats_k(vit, keep_all=True)
        torch.testing.assert_close(vit(x), ref, atol=1e-5, rtol=1e-4)  # masked avg pool == timm's avg
    assert y.shape == ref.shape


def test_fused_and_manual_attention_give_the_same_logits():
    model = small_ats(ats_k=5)
    x = images(3)
    with torch.no_grad():
        fused, traces = kept(model, x)
        kept_fused = [t.kept_positions for t in traces]
        assert set_model_fused_attn(model, False) == len(model.blocks)
        manual, traces = kept(model, x)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for s1, s2 in zip(kept_fused, [t.kept_positions for t in traces])
               for a, b in zip(s1, s2))


# ---------------------------------------------------------------------------------------------
# K, batches, collapse
# ---------------------------------------------------------------------------------------------

def test_k_is_honoured_at_every_stage_as_count_and_as_ratio():
    model = small_ats(ats_k=6)
    with torch.no_grad():
        _, traces = kept(model, images(4))
    assert [t.stage for t in traces] == [1, 2, 4]
    for t in traces:
        assert ((t.counts >= 1) & (t.counts <= 6)).all()
    set_ats_k(model, ratio=0.5, floor=3)
    with torch.no_grad():
        _, traces = kept(model, images(4))
    n_in = torch.full((4,), 17)  # live tokens entering stage 1, class token included
    for t in traces:
        k = torch.clamp(torch.maximum(torch.floor(n_in * 0.5).long(), torch.tensor(3)), max=n_in - 1)
        assert (t.counts <= k).all(), (t.stage, t.counts, k)
        n_in = t.counts + 1
    # the upper bound is exact: every stage keeps K' = K
    with torch.no_grad(), ats.upper_bound_sampling():
        set_ats_k(model, k=[10, 7, 3])
        _, traces = kept(model, images(2))
    assert [t.counts.tolist() for t in traces] == [[10, 10], [7, 7], [3, 3]]


@pytest.mark.parametrize("pack", [0.0, 1.0])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_a_samples_tokens_and_logits_do_not_depend_on_its_batch(pack, pool, monkeypatch):
    monkeypatch.setattr(ats, "PACK_MIN_PADDING", pack)  # packed and padded FC paths
    model = small_ats(peaky=6.0, ats_ratio=0.9, global_pool=pool)
    x = images(5, seed=3)
    with torch.no_grad():
        batch_logits, traces = kept(model, x)
        batch_kept = [t.kept_positions for t in traces]
        counts = torch.stack([t.counts for t in traces])
        assert (counts.max(1).values > counts.min(1).values).any()  # K' differs: padding is exercised
        order = [3, 0, 4, 1, 2]
        shuffled = model(x[order])
        for i in range(5):
            alone, traces = kept(model, x[i:i + 1])
            torch.testing.assert_close(alone[0], batch_logits[i], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(shuffled[order.index(i)], batch_logits[i], atol=1e-5, rtol=1e-4)
            for s, t in enumerate(traces):
                assert torch.equal(t.kept_positions[0], batch_kept[s][i])


def test_no_collapse_even_with_one_dominant_patch():
    model = small_ats(peaky=30.0, ats_k=12)
    x = images(3)
    x[:, :, :16, :16] = 50.0  # one saturated patch attracts the class token's attention
    with torch.no_grad():
        logits, traces = kept(model, x)
    assert torch.isfinite(logits).all()
    for t in traces:
        assert (t.counts >= 1).all()


def test_trace_holds_original_patch_positions():
    model = small_ats(ats_k=6)
    with torch.no_grad():
        _, traces = kept(model, images(2))
    prev = [torch.arange(16)] * 2
    for t in traces:
        assert t.grid == (4, 4) and t.candidates_xy is None and t.num_frames is None  # patch cells of the image
        for b, pos in enumerate(t.kept_positions):
            assert len(pos) == t.counts[b]
            assert (pos[1:] > pos[:-1]).all() and set(pos.tolist()) <= set(prev[b].tolist())
        prev = t.kept_positions
    set_ats_k(model, keep_all=True)
    with torch.no_grad():
        _, traces = kept(model, images(2))
    assert all(torch.equal(p, torch.arange(16)) for t in traces for p in t.kept_positions)


def test_set_ats_k_changes_k_at_inference_without_touching_weights():
    model = small_ats()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = images(2)
    with torch.no_grad():
        set_ats_k(model, k=2)
        _, traces = kept(model, x)
        assert all((t.counts <= 2).all() for t in traces)
        set_ats_k(model, k=[15, 8, 4])
        _, traces = kept(model, x)
        assert [int(t.counts.max()) <= k for t, k in zip(traces, (15, 8, 4))] == [True] * 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="3 stages"):
        set_ats_k(model, k=[4, 4])
    with pytest.raises(ValueError, match="k=0"):
        set_ats_k(model, k=0)


def test_gradients_reach_every_parameter():
    model = small_ats(ats_k=6).train()
    logits = model(images(2))
    torch.nn.functional.cross_entropy(logits, torch.tensor([1, 2])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    for blk in model.blocks:
        if isinstance(blk.attn, ATSAttention):
            assert blk.attn.qkv.weight.grad.abs().sum() > 0
    # activation checkpointing recomputes the same blocks: identical gradients
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    torch.nn.functional.cross_entropy(model(images(2)), torch.tensor([1, 2])).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-6, rtol=1e-5)


def test_fx_feature_extraction_traces_through_ats():
    from timm.layers._fx import create_feature_extractor

    model = small_ats(ats_k=6)
    x = images(2)
    extractor = create_feature_extractor(model, ["head"])
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["head"], model(x))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs_are_refused_naming_the_value():
    model = small_ats()  # channels and rank: tests/test_model_contract.py
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="stage 6"):
        models.create_model("deit_small_ats", **SMALL, ats_stages=(2, 6))
    with pytest.raises(ValueError, match="ratio=1.5"):
        models.create_model("deit_small_ats", **SMALL, ats_stages=(1, 2), ats_ratio=1.5)
    with pytest.raises(ValueError, match="k=0"):
        models.create_model("deit_small_ats_k48", **SMALL, ats_stages=(1,), ats_k=0)
    with pytest.raises(ValueError, match="already has ATS"):
        apply_ats(model, [1])
    with pytest.raises(ValueError, match="num_prefix_tokens=2"):
        apply_ats(timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, depth=2), [1])
    with pytest.raises(ValueError, match="global_pool='map'"):
        apply_ats(timm.create_model("vit_small_patch16_224", img_size=64, depth=2, global_pool="map"), [1])
    with pytest.raises(TypeError, match="VisionTransformer"):
        apply_ats(torch.nn.Linear(2, 2), [1])
    with pytest.raises(ValueError, match="unknown model 'deit_small_atz'"):
        models.create_model("deit_small_atz")
