"""ATS mechanism (models/ats.py): ATS eqs. 3-6 on hand-made inputs, K resolution, the modules against a
plain reference (full attention matrix, rows selected), masking, packing and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from models import ats
from models.ats import (
    ATSAttention,
    ATSBlock,
    MaskedBlock,
    ats_significance,
    class_attention,
    inverse_transform_sample,
    resolve_k,
    resolve_k_per_sample,
    upper_bound_sampling,
)

torch.set_num_threads(1)


def _kept(scores, k, mask=None):
    """Kept indices per sample as Python lists (valid slots only)."""
    kept, valid = inverse_transform_sample(torch.as_tensor(scores, dtype=torch.float32), k,
                                           None if mask is None else torch.as_tensor(mask))
    return [row[v].tolist() for row, v in zip(kept, valid)]


# ---------------------------------------------------------------------------------------------
# ATS eq. 3: significance scores
# ---------------------------------------------------------------------------------------------

def test_significance_matches_eq3_by_hand():
    # B=1, H=2, N=4 (class + 3 tokens); value norms 1, 2, 3 on tokens 1..3 (head 0) and 1, 1, 1 (head 1)
    cls_attn = torch.tensor([[[0.4, 0.3, 0.2, 0.1], [0.1, 0.1, 0.1, 0.7]]])
    v = torch.zeros(1, 2, 4, 2)
    v[0, 0, 1:, 0] = torch.tensor([1.0, 2.0, 3.0])
    v[0, 1, 1:, 1] = torch.tensor([1.0, 1.0, 1.0])
    v[0, :, 0, 0] = 100.0  # the class token's value never enters its own score
    s = ats_significance(cls_attn, v)
    head0 = torch.tensor([0.3 * 1, 0.2 * 2, 0.1 * 3]) / (0.3 + 0.4 + 0.3)
    head1 = torch.tensor([0.1, 0.1, 0.7]) / 0.9
    torch.testing.assert_close(s, ((head0 + head1) / 2)[None])
    torch.testing.assert_close(s.sum(-1), torch.ones(1))


def test_significance_padding_scores_zero_and_degenerate_values_fall_back_to_uniform():
    cls_attn = torch.softmax(torch.randn(2, 3, 5), -1)
    v = torch.randn(2, 3, 5, 4)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    s = ats_significance(cls_attn, v, mask)
    assert (s[0, 2:] == 0).all() and (s[0, :2] > 0).all()
    torch.testing.assert_close(s.sum(-1), torch.ones(2))
    # all-zero values: ATS eq. 3 is 0/0; we fall back to uniform over live tokens
    s0 = ats_significance(cls_attn, torch.zeros_like(v), mask)
    torch.testing.assert_close(s0[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))
    torch.testing.assert_close(s0[1], torch.full((4,), 0.25))


def test_class_attention_is_row_one_of_the_full_matrix():
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    full = torch.softmax(q @ k.transpose(-2, -1) * 8 ** -0.5, -1)  # (B, H, N, N)
    torch.testing.assert_close(class_attention(q[:, :, 0], k, 8 ** -0.5), full[:, :, 0])


# ---------------------------------------------------------------------------------------------
# ATS eqs. 4-5: inverse transform sampling
# ---------------------------------------------------------------------------------------------

def test_one_dominant_token_is_kept_and_k_prime_collapses():
    scores = torch.full((1, 20), 0.001)
    scores[0, 7] = 0.98
    assert _kept(scores, 10) == [[7]]  # every fixed point lands in token 7's interval: K' = 1
    # a smaller second peak gets its share of fixed points: S_j >= 2/K guarantees K' < K (section 3.2)
    scores[0, 15] = 0.3
    kept = _kept(scores, 10)[0]
    assert 7 in kept and 15 in kept and len(kept) < 10


def test_uniform_scores_give_k_evenly_spread_tokens():
    # M=12 tokens, K=4: fixed points 1/8, 3/8, 5/8, 7/8 fall in tokens ceil(12 y) - 1 = 1, 4, 7, 10
    assert _kept(torch.ones(1, 12), 4) == [[1, 4, 7, 10]]
    assert _kept(torch.ones(1, 12), 12) == [list(range(12))]  # K = M: every token exactly once
    assert _kept(torch.ones(1, 12), 1) == [[5]]  # the median token (y = 1/2 -> CDF 6/12)


def test_ties_fixed_point_on_a_cdf_boundary_goes_to_the_left_token():
    # CDF = .25, .5, .75, 1; K=2 puts fixed points exactly on .25 and .75 -> tokens 0 and 2
    assert _kept([[0.25, 0.25, 0.25, 0.25]], 2) == [[0, 2]]
    # two tied dominant tokens: both kept, each once
    assert _kept([[0.4, 0.1, 0.1, 0.4]], 4) == [[0, 3]]


def test_kept_indices_are_sorted_unique_and_trimmed_per_sample():
    scores = torch.tensor([[0.01, 0.9, 0.01, 0.08], [0.25, 0.25, 0.25, 0.25]])
    kept, valid = inverse_transform_sample(scores, 4)
    assert kept.shape == valid.shape == (2, 4)  # K'max = 4 (second sample), first has K' = 1 or 2
    assert valid.sum(1).tolist() == [len(_kept(scores[:1], 4)[0]), 4]
    for row, v in zip(kept, valid):
        r = row[v]
        assert (r[1:] > r[:-1]).all()  # strictly increasing: unique, in original position order


def test_zero_score_and_padded_tokens_are_never_sampled():
    scores = torch.tensor([[0.0, 1.0, 0.0, 5.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True, True, False, False]])  # padded tokens with huge scores
    for k in (1, 2, 3, 8):
        assert set(_kept(scores, k, mask)[0]) <= {1, 3}


def test_batch_rows_are_sampled_independently():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(5, 30, generator=g) ** 4
    mask = torch.rand(5, 30, generator=g) > 0.2
    k = torch.tensor([3, 10, 29, 1, 7])
    together = _kept(scores, k, mask)
    alone = [_kept(scores[i:i + 1], int(k[i]), mask[i:i + 1])[0] for i in range(5)]
    assert together == alone


def test_k_prime_never_exceeds_k_and_never_collapses():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        scores = torch.rand(4, 50, generator=g) ** 8  # peaky
        for k in (1, 5, 25, 50):
            counts = inverse_transform_sample(scores, k)[1].sum(1)
            assert ((counts >= 1) & (counts <= k)).all()


def test_upper_bound_sampling_keeps_exactly_k():
    scores = torch.rand(3, 40) ** 8
    mask = torch.ones(3, 40, dtype=torch.bool)
    mask[2, 10:] = False  # only 10 live tokens
    with upper_bound_sampling():
        counts = inverse_transform_sample(scores, 39, mask)[1].sum(1)
        assert counts.tolist() == [39, 39, 10]
        assert inverse_transform_sample(scores, 7, mask)[1].sum(1).tolist() == [7, 7, 7]
    assert inverse_transform_sample(scores, 39, mask)[1].sum(1).max() < 39  # peaky scores outside


# ---------------------------------------------------------------------------------------------
# K resolution (appendix E.1)
# ---------------------------------------------------------------------------------------------

def test_resolve_k_counts_ratios_and_floor():
    assert resolve_k(197) == 196  # paper default K = N, clipped to the samplable tokens
    assert resolve_k(197, ratio=0.87) == 171  # floor(0.87 * 197)
    assert resolve_k(197, ratio=0.72) == 141
    assert resolve_k(20, ratio=0.1) == 8  # floor(2.0) lifted to the floor of 8
    assert resolve_k(5, ratio=0.1) == 4  # ... and clipped to N - 1
    assert resolve_k(50, k=108) == 49  # one K for all stages: clipped where fewer tokens remain
    assert resolve_k(197, k=108) == 108
    n_live = torch.tensor([197, 110, 9])
    assert resolve_k_per_sample(n_live, ratio=0.87).tolist() == [171, 95, 8]
    assert resolve_k_per_sample(n_live, k=100).tolist() == [100, 100, 8]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(k=0), "k=0"), (dict(k=-3), "k=-3"), (dict(k=2.5), "k=2.5"), (dict(ratio=0.0), "ratio=0.0"),
    (dict(ratio=1.5), "ratio=1.5"), (dict(ratio=float("nan")), "ratio=nan"), (dict(k=4, ratio=0.5), "not both"),
    (dict(ratio=0.5, floor=0), "floor=0"),
])
def test_resolve_k_rejects_out_of_range_values_by_name(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        resolve_k(197, **kwargs)


def test_resolve_k_needs_two_tokens():
    with pytest.raises(ValueError, match="n_tokens=1"):
        resolve_k(1, k=1)


# ---------------------------------------------------------------------------------------------
# Modules against a plain reference
# ---------------------------------------------------------------------------------------------

def _reference_ats_attention(attn: ATSAttention, x: torch.Tensor, k: int, mask: torch.Tensor | None):
    """Plain ATS: the FULL attention matrix (ATS eq. 1), scores from its first row, rows selected (ATS eq. 6)."""
    B, N, C = x.shape
    H, Dh = attn.num_heads, attn.head_dim
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
    q, kk, v = qkv[0], qkv[1], qkv[2]  # (B, H, N, Dh)
    logits = q @ kk.transpose(-2, -1) * Dh ** -0.5  # (B, H, N, N)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    a = logits.softmax(-1)  # (B, H, N, N)
    scores = ats_significance(a[:, :, 0], v, mask)
    kept, valid = inverse_transform_sample(scores, k, None if mask is None else mask[:, 1:])
    rows = torch.cat([torch.zeros_like(kept[:, :1]), kept + 1], 1)  # (B, 1+K)
    a_s = torch.stack([a[b][:, rows[b]] for b in range(B)])  # (B, H, 1+K, N): A^s
    o = (a_s @ v).transpose(1, 2).reshape(B, -1, C)  # O = A^s V
    out = F.linear(o, attn.proj.weight, attn.proj.bias)
    new_mask = torch.cat([torch.ones_like(valid[:, :1]), valid], 1)
    return out * new_mask[..., None], kept, new_mask


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_ats_attention_fused_and_manual_match_plain_reference(fused, padded, monkeypatch):
    monkeypatch.setattr(ats, "PACK_MIN_PADDING", 0.0)  # exercise the packed linear path too
    torch.manual_seed(0)
    attn = ATSAttention(32, num_heads=4, qkv_bias=True, k=6).eval()
    attn.fused_attn = fused
    with torch.no_grad():
        attn.qkv.weight.mul_(4)  # peaky attention: K' varies per sample
    x = torch.randn(3, 17, 32)
    mask = None
    if padded:
        mask = torch.ones(3, 17, dtype=torch.bool)
        mask[0, 12:] = False
        mask[2, 5:] = False
        x = x * mask[..., None]
    with torch.no_grad():
        out, kept, new_mask = attn(x, mask)
        ref_out, ref_kept, ref_mask = _reference_ats_attention(attn, x, 6, mask)
    assert torch.equal(kept[new_mask[:, 1:]], ref_kept[ref_mask[:, 1:]]) and torch.equal(new_mask, ref_mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-4)
    assert (new_mask.sum(1) - 1 <= 6).all() and (new_mask[:, 1:].sum(1) >= 1).all()


def _block_pair(cls, **kw):
    torch.manual_seed(0)
    plain = Block(32, 4, qkv_bias=True).eval()
    with torch.no_grad():
        plain.attn.qkv.weight.mul_(3)
    other = cls(32, 4, qkv_bias=True, **kw).eval()
    other.load_state_dict(plain.state_dict(), strict=True)  # same parameter names as timm's Block
    return plain, other


@pytest.mark.parametrize("pack", [0.0, 1.0])
def test_masked_block_equals_timm_block_on_each_samples_live_tokens(pack, monkeypatch):
    monkeypatch.setattr(ats, "PACK_MIN_PADDING", pack)  # packed and unpacked FC paths
    plain, masked = _block_pair(MaskedBlock)
    lengths = [9, 4, 7]
    x = torch.zeros(3, 9, 32)
    mask = torch.zeros(3, 9, dtype=torch.bool)
    for b, n in enumerate(lengths):
        x[b, :n] = torch.randn(n, 32)
        mask[b, :n] = True
    with torch.no_grad():
        y = masked(x, mask)
        for b, n in enumerate(lengths):
            torch.testing.assert_close(y[b, :n], plain(x[b:b + 1, :n])[0], atol=1e-5, rtol=1e-4)
            assert (y[b, n:] == 0).all()


def test_ats_block_equals_timm_block_when_nothing_is_dropped_and_rows_otherwise():
    plain, blk = _block_pair(ATSBlock, k=10)
    x = torch.randn(2, 11, 32)
    with torch.no_grad():
        blk.attn.set_k(keep_all=True)
        y, kept, mask = blk(x)
        torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-4)
        assert mask.all() and kept.shape == (2, 10)
        # sampling: each kept row equals the full block's output row (ATS eq. 6 keeps rows of A, and
        # the residual and FFN are per token)
        blk.attn.set_k(k=4)
        y, kept, mask = blk(x)
        full = plain(x)
        for b in range(2):
            rows = torch.cat([torch.zeros(1, dtype=torch.long), kept[b][mask[b, 1:]] + 1])
            torch.testing.assert_close(y[b, :len(rows)], full[b, rows], atol=1e-5, rtol=1e-4)


def test_gradients_reach_every_parameter_of_an_ats_block():
    torch.manual_seed(0)
    blk = ATSBlock(32, 4, qkv_bias=True, k=3).train()
    x = torch.randn(2, 13, 32, requires_grad=True)
    y, _, mask = blk(x)
    (y * mask[..., None]).square().sum().backward()
    for name, p in blk.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert blk.attn.qkv.weight.grad.abs().sum() > 0
    # dropped tokens still receive gradient: they are keys/values of the kept rows
    assert (x.grad.abs().sum(-1) > 0).all()


def test_fx_leaves_are_registered():
    from timm.layers import is_notrace_function

    for fn in (ats.select_tokens, ats.pack_tokens, ats.unpack_tokens, ats.live_token_index, ats.key_padding_mask,
               ats.inverse_transform_sample, ats.resolve_k_per_sample, ats.zero_padding, ats.with_class_token,
               ats.kept_rows):
        assert is_notrace_function(fn), fn.__name__
