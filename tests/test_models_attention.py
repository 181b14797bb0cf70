"""The one masked-attention module (models/attention.py): fused SDPA vs the manual softmax vs a plain
reference, for the function and for every family that attends through it (image ATS on DeiT, PS-ViT + ATS,
TimeSformer and XViT ATS) on padded batches; timm's ``fused_attn`` switch honoured everywhere; the one
padding helper."""

from __future__ import annotations

import pytest
import timm.layers
import torch
import torch.nn.functional as F

from models.attention import masked_attention, nonzero_token_mask, set_model_fused_attn, zero_padding
from models.trace import record
from models.video_vit_common import FrameAttention
from tests.test_model_contract import build, mixed_inputs, sharpen

torch.set_num_threads(1)

ATS_MODELS = ["deit_small_ats", "psvit_b_14_ats", "timesformer_base_ats", "xvit_8_ats"]


def reference_attention(q, k, v, key_mask, scale):
    """Per sample and head: softmax over the live keys only (padded keys sliced away), written out."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        live = torch.ones(k.shape[2], dtype=torch.bool) if key_mask is None else key_mask[b]
        for h in range(q.shape[1]):
            w = torch.softmax(q[b, h] @ k[b, h, live].T * scale, dim=-1)  # (Lq, live)
            out[b, h] = w @ v[b, h, live]
    return out


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("lq", [1, 5, 9])
def test_masked_attention_fused_manual_and_reference_agree(padded, lq):
    g = torch.Generator().manual_seed(lq)
    q, k, v = torch.randn(3, 3, 2, 9, 8, generator=g).unbind(0)  # (B, H, N, Dh) each
    q = q[:, :, :lq]
    mask = None
    if padded:
        mask = torch.ones(3, 9, dtype=torch.bool)
        mask[0, 4:] = False
        mask[2, 1:] = False  # only the class token live
    ref = reference_attention(q, k, v, mask, 0.3)
    for fused in (True, False):
        torch.testing.assert_close(masked_attention(q, k, v, mask, scale=0.3, fused=fused), ref, atol=1e-6, rtol=1e-5)
    # an all-live mask takes the unmasked path and gives the same numbers
    full = torch.ones(3, 9, dtype=torch.bool)
    assert torch.equal(masked_attention(q, k, v, full, scale=0.3, fused=True),
                       masked_attention(q, k, v, None, scale=0.3, fused=True))


@pytest.mark.parametrize("name", ATS_MODELS)
def test_fused_manual_and_unpadded_reference_agree_on_a_padded_batch(name):
    """Fused and manual logits and picks agree on a batch whose samples keep different K'; the reference is
    each sample run alone through the manual path (no padding at all)."""
    model = sharpen(build(name)).eval()
    x = mixed_inputs(model)
    runs = {}
    for fused in (True, False):
        assert set_model_fused_attn(model, fused) > 0
        with torch.no_grad(), record() as trace:
            logits = model(x)
        runs[fused] = logits, [k.kept_positions for k in trace.kept_tokens()]
    counts = trace.kept_counts()
    assert (counts.amax(0) > counts.amin(0)).any(), "the batch should be padded"
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=1e-5, rtol=1e-4)
    assert all(torch.equal(a, b) for s1, s2 in zip(runs[True][1], runs[False][1]) for a, b in zip(s1, s2))
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])  # manual path, nothing padded
    torch.testing.assert_close(runs[True][0], alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ATS_MODELS)
def test_the_fused_attn_switch_is_honoured(name, monkeypatch):
    """With every module's ``fused_attn`` off, no SDPA call is left (video frame attention included)."""
    model = build(name).eval()
    x = mixed_inputs(model, n=2)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    with torch.no_grad():
        model(x)
        assert calls, "fused by default"
        calls.clear()
        set_model_fused_attn(model, False)
        model(x)
    assert not calls


def test_frame_attention_reads_timms_switch_at_build():
    assert FrameAttention(16, 2).fused_attn == timm.layers.use_fused_attn()
    timm.layers.set_fused_attn(False)
    try:
        assert not FrameAttention(16, 2).fused_attn
    finally:
        timm.layers.set_fused_attn(True)
    assert FrameAttention(16, 2).fused_attn == timm.layers.use_fused_attn()


def test_zero_padding_is_one_helper_for_every_layout():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    x = torch.randn(2, 3, 4) + 5
    y = zero_padding(x, mask)  # (B, N, C)
    assert torch.equal(y[mask], x[mask]) and not y[~mask].any()
    frames = torch.randn(2, 5, 3, 4) + 5  # (B, T, N, C): XViT's frames share the sample's mask
    z = zero_padding(frames, mask)
    assert torch.equal(z[:, :, 0], frames[:, :, 0]) and not z[0, :, 2].any() and not z[1, :, 1:].any()
    assert zero_padding(x, None) is x and zero_padding(x, torch.ones(2, 3, dtype=torch.bool)) is x
    assert torch.equal(nonzero_token_mask(y), mask)
