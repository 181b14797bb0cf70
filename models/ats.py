"""Adaptive Token Sampler (ATS): Fayyaz et al., "Adaptive Token Sampling For Efficient Vision
Transformers", ECCV 2022 (``/work/shared/papers/ats.txt``, section 3, appendices A, E, F).

The mechanism is split the way ``timm/layers/patch_dropout.py`` is (STYLE #5):

* pure functions (tokens and scores in, kept indices out), usable by any backbone:
  :func:`class_attention` (the class token's softmax row), :func:`ats_significance` (ATS eq. 3),
  :func:`inverse_transform_sample` (ATS eqs. 4-5), :func:`resolve_k` / :func:`resolve_k_per_sample`
  (appendix E.1), and the data-dependent gather / pack helpers (:func:`select_tokens`,
  :func:`pack_tokens`, ...), registered as FX leaves (STYLE #8);
* thin modules with timm's parameter names, so a timm checkpoint loads unchanged:
  :class:`ATSAttention` (drop-in for ``timm.layers.Attention``), :class:`MaskedAttention`,
  :class:`ATSBlock` (the sampling block) and :class:`MaskedBlock` (every later block);
* glue: :func:`convert_blocks` (turn a run of timm ``Block`` s into ATS/masked blocks in place),
  :func:`forward_ats_blocks` (the loop that threads the token mask and, while a trace is recorded,
  emits one :class:`models.trace.KeptTokens` per ATS stage), :func:`set_ats_k` (K is an
  inference-time knob), :func:`set_ats_mode` (dynamic or static shapes, below) and
  :func:`upper_bound_sampling` (count cost at the upper bound K' = K).

Attention itself (fused SDPA or the manual softmax, padded keys masked) and the re-zeroing of padded
rows are :mod:`models.attention`'s, shared with the video transformers. Nothing is stored on a module
during a forward: masks travel as arguments and return values.

Conventions (decided here; the paper is silent or ambiguous):

* Token layout. A sequence is ``(B, N, C)`` with the class token first. ``token_mask`` is a
  ``(B, N)`` bool tensor over ALL tokens, class token included, ``True`` = live, or ``None`` when
  nothing is padded. Padded slots are zero and are excluded from every softmax, FFN and pooling.
* Stage numbering. The paper counts blocks from 0 (appendix F.3 places ATS in "stages 0, 3, 6" and
  "3-11" of the 12-block DeiT-S), so a stage is the 0-based index of the block in ``model.blocks``.
* CDF order. ATS eq. 4 accumulates the scores in token (position) order, ``CDF_i = sum_{j<=i} S_j``;
  the official code sorts the scores first. We follow the paper: with positional order the fixed
  points of ATS eq. 5 stratify the image (uniform scores give K evenly spaced tokens) and the kept
  indices come out sorted by position for free.
* Inverse CDF. Token ``j`` owns the interval ``(CDF_{j-1}, CDF_j]``; a fixed point ``y`` maps to the
  first ``j`` with ``CDF_j >= y`` (``torch.searchsorted``, left side). A fixed point exactly on a
  boundary therefore goes to the token on its left ("ties"). Zero-score tokens own empty intervals
  and are never picked, so padding can never be sampled. The official code maps ``y`` to the token
  whose CDF value is *nearest*, which biases picks by half an interval.
* Multi-head scores. ATS eq. 3 is normalised per head and then "summed over all heads"; we then divide
  by the number of heads so the scores stay a distribution (the official code sums un-normalised
  heads, letting heads with large value norms dominate).
* K per sample. K (a count, or a ratio of the stage's input tokens with a floor, appendix E.1) is
  resolved from each sample's OWN live token count, never from the padded batch length, so a
  sample keeps the same tokens alone or in any batch (appendix A).
* Kept slots. After sampling, a sample's ``K'`` kept tokens sit in slots ``1..K'`` in ascending
  original position; slots ``K'+1..K'max`` are padding (appendix A: "sampled tokens in the lower
  indices"). Index values in invalid slots are arbitrary (a duplicate): always read them with the mask.
  A stage whose slots reach all M candidates keeps them IN PLACE instead (kept indices ``0..M-1``, the
  mask marks the picks): nothing is gathered or copied, e.g. with ``keep_all`` or K = N - 1.

Two modes, the same weights and the same logits (``ats_mode``, :func:`set_ats_mode`):

* ``dynamic`` (default): each stage trims the batch to its largest K' and packs live tokens for the
  linear layers when padding is plentiful (appendix A). Reading K'max is a device-to-host sync, and the
  shape depends on the data: ``torch.compile`` breaks its graph there, ``torch.export`` cannot trace it.
* ``static``: each stage keeps exactly ``1 + K`` slots, K resolved from the stage's input SLOT count
  (the largest K any sample can resolve to). ATS eq. 5's fixed points map to picks in ascending order;
  a repeated pick (several fixed points in one token's interval, or the points past a sample's own K)
  keeps its slot, masked out like padding. No host sync, no data-dependent shape: compiles with
  ``fullgraph=True``, exports with a dynamic batch, runs on meta tensors. Masked slots are computed and
  discarded, so a stage whose K' << K costs more than in dynamic mode.

A forward on meta tensors always runs the static path (there are no values to trim by): a dynamic model
still builds and runs on the meta device (timm's own model tests do that).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterable, Iterator, Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import register_notrace_function
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import Tensor

from models.attention import key_padding_mask, masked_attention, zero_padding
from models.trace import KeptTokens, emit, recording

__all__ = [
    "ATSAttention",
    "ATSBlock",
    "ATSSamplingMixin",
    "MaskedAttention",
    "MaskedBlock",
    "ats_significance",
    "ats_stages",
    "check_ats_mode",
    "check_ats_stages",
    "class_attention",
    "convert_blocks",
    "forward_ats_blocks",
    "inverse_transform_sample",
    "key_padding_mask",
    "live_token_index",
    "masked_pool",
    "pack_tokens",
    "resolve_k",
    "resolve_k_per_sample",
    "kept_rows",
    "select_tokens",
    "set_ats_k",
    "set_ats_mode",
    "unpack_tokens",
    "upper_bound_sampling",
    "with_class_token",
    "zero_padding",
]

DEFAULT_K_FLOOR = 8  # appendix E.1: K_n = max(floor(rho * N_n), 8)
ATS_MODES = ("dynamic", "static")  # module docstring: trim to K'max, or exactly 1 + K slots
PACK_MIN_PADDING = 0.2  # pack live tokens for the FC layers when >= 20% of a batch's slots are padding

# Set by ``upper_bound_sampling()``: sample as if every score were equal, so K' = min(K, live) exactly.
_UPPER_BOUND: contextvars.ContextVar[bool] = contextvars.ContextVar("ats_upper_bound", default=False)


# --------------------------------------------------------------------------------------------------
# K resolution (appendix E.1)
# --------------------------------------------------------------------------------------------------

def _check_k_args(k: int | None, ratio: float | None, floor: int) -> None:
    if k is not None and ratio is not None:
        raise ValueError(f"give ATS K as a count or as a ratio, not both (k={k!r}, ratio={ratio!r})")
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"ATS K must be a positive integer, got k={k!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not math.isfinite(ratio) or not 0.0 < ratio <= 1.0):
        raise ValueError(f"ATS ratio must be in (0, 1], got ratio={ratio!r}")
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 1:
        raise ValueError(f"ATS K floor must be a positive integer, got floor={floor!r}")


def check_ats_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`ATS_MODES`, else ``ValueError`` naming it."""
    if mode not in ATS_MODES:
        raise ValueError(f"ats_mode must be one of {ATS_MODES}, got {mode!r}")
    return mode


def _check(cond: Tensor, msg: str, static: bool) -> None:
    """Assert a device bool: read on the host in dynamic mode, a device-side assert (no sync) in static mode."""
    if static:
        torch._assert_async(cond, msg)
    else:
        torch._assert(bool(cond), msg)


def resolve_k(n_tokens: int, k: int | None = None, ratio: float | None = None,
              floor: int = DEFAULT_K_FLOOR) -> int:
    """The stage's K (upper bound on sampled tokens) for ``n_tokens`` input tokens.

    ``n_tokens`` counts the class token (the paper's "#InputTokens", 197 for DeiT-S). K is
    ``k`` itself, or ``max(floor(ratio * n_tokens), floor)`` (appendix E.1), or the paper's
    default ``n_tokens`` when neither is given (section 4: "we set K = 197 in case of DeiT-S").
    It is then clipped to ``n_tokens - 1``, the number of tokens that can be sampled. A K larger
    than the stage's input is legal (e.g. one K for all stages of a multi-stage model).

    Raises ``ValueError`` naming the value for ``k < 1``, ``ratio`` outside ``(0, 1]``, both given,
    or fewer than 2 tokens.
    """
    _check_k_args(k, ratio, floor)
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 2:
        raise ValueError(f"ATS needs a class token and at least one other token, got n_tokens={n_tokens!r}")
    if k is None:
        k = n_tokens if ratio is None else max(math.floor(ratio * n_tokens), floor)
    return min(k, n_tokens - 1)


@register_notrace_function
def resolve_k_per_sample(n_live: Tensor, k: int | None = None, ratio: float | None = None,
                         floor: int = DEFAULT_K_FLOOR, static: bool = False) -> Tensor:
    """Vectorised :func:`resolve_k` over samples: ``n_live`` (B,) live tokens incl. class -> (B,) K.

    Each sample's K depends only on its own live tokens, which keeps sampling batch-independent.
    ``static``: the input check runs on the device (no host sync).
    """
    _check_k_args(k, ratio, floor)
    _check((n_live >= 2).all(), "ATS needs a class token and at least one live token per sample", static)
    n_live = n_live.long()
    if k is not None:
        kk = torch.full_like(n_live, k)
    elif ratio is not None:
        # floor(ratio * n) in float64 (exact for any realistic n), then the floor of appendix E.1
        kk = torch.floor(n_live.double() * ratio).long().clamp_min(floor)
    else:
        kk = n_live.clone()
    return torch.minimum(kk, n_live - 1)  # (B,)


# --------------------------------------------------------------------------------------------------
# Pure functions: scores (ATS eq. 3) and inverse transform sampling (ATS eqs. 4-5)
# --------------------------------------------------------------------------------------------------

def class_attention(q_cls: Tensor, k: Tensor, scale: float, token_mask: Tensor | None = None) -> Tensor:
    """The class token's softmax attention row, ATS eq. 1 restricted to row 1: ``A_{1,:}``.

    ``q_cls`` (B, H, Dh), ``k`` (B, H, N, Dh), ``token_mask`` (B, N) or None -> (B, H, N).
    Fused SDPA does not return attention weights, so this one row is computed by hand
    (O(N d) work, not O(N^2 d)).
    """
    logits = ((q_cls * scale)[:, :, None, :] @ k.transpose(-2, -1)).squeeze(2)  # (B, H, N)
    if token_mask is not None:
        logits = logits.masked_fill(~token_mask[:, None, :], float("-inf"))  # padded keys get 0 weight
    return logits.softmax(dim=-1)  # (B, H, N)


def ats_significance(cls_attn: Tensor, v: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """Significance scores of the non-class tokens, ATS eq. 3.

    Args:
        cls_attn: (B, H, N) the class token's softmax attention row over all N tokens (class first).
        v: (B, H, N, Dh) values.
        token_mask: (B, N) bool, True = live (class token included), or None.

    Returns:
        (B, N-1) scores ``S_j = A_{1,j} ||V_j|| / sum_i A_{1,i} ||V_i||`` per head, averaged over
        heads (the paper sums; dividing by H keeps a distribution). Each row sums to 1; padded
        tokens score exactly 0. A head (or sample) whose scores are all zero, e.g. all-zero values,
        falls back to uniform over the live tokens so sampling stays defined.
    """
    B, H, N = cls_attn.shape
    torch._assert(v.shape[:3] == (B, H, N), "ats_significance: cls_attn (B,H,N) and v (B,H,N,Dh) disagree")
    a = cls_attn[:, :, 1:]  # (B, H, N-1) A_{1,j}, j >= 2: A_{1,1} unused, the class token is always kept
    s = a * torch.linalg.vector_norm(v[:, :, 1:], dim=-1)  # (B, H, N-1) A_{1,j} * ||V_j||
    live = torch.ones_like(s[:, :1]) if token_mask is None else token_mask[:, None, 1:].to(s.dtype)  # (B, 1|H, N-1)
    s = s * live
    total = s.sum(dim=-1, keepdim=True)  # (B, H, 1)
    uniform = live / live.sum(dim=-1, keepdim=True).clamp_min(1.0)  # (B, 1, N-1)
    ok = total > 0  # (B, H, 1)
    s = torch.where(ok, s / torch.where(ok, total, torch.ones_like(total)), uniform)  # (B, H, N-1) ATS eq. 3
    return s.mean(dim=1)  # (B, N-1)


@register_notrace_function
def inverse_transform_sample(scores: Tensor, k: int | Tensor, token_mask: Tensor | None = None,
                             slots: int | None = None) -> tuple[Tensor, Tensor]:
    """Deterministic inverse transform sampling, ATS eqs. 4-5, with repeats removed per sample.

    Args:
        scores: (B, M) non-negative significance scores of the candidate tokens (the non-class
            tokens), e.g. from :func:`ats_significance`; need not be normalised.
        k: K, the number of fixed points, as an int or a (B,) tensor (one K per sample).
        token_mask: (B, M) bool over the SAME tokens as ``scores`` (True = live), or None.
        slots: None (dynamic mode) or the static mode's slot count, ``>= K`` of every sample.

    Returns:
        ``kept`` (B, L) long indices into the M candidates and ``valid`` (B, L) bool, K' >= 1 valid
        slots per sample. Dynamic: L = K'max, the largest K' in the batch (trimmed); a sample's K' <= K
        unique picks occupy its first K' slots in ascending index (= original position) order, later
        slots are padding (their index values are meaningless). Static: L = ``slots``, the picks of
        the fixed points in ascending order, each repeat invalid. Either way, when L reaches M the
        candidates stay in place: ``kept`` = 0..M-1 and ``valid`` marks the picks (no gather needed).

    The fixed points are ``y_i = (2i - 1) / (2K)``, i = 1..K (ATS eq. 5 with the paper's deterministic
    scheme); ``y`` maps to the first token whose CDF reaches it (see module docstring for ties).
    Inside :func:`upper_bound_sampling` every live score counts as equal, so K' = min(K, live).
    """
    B, M = scores.shape
    device, static = scores.device, slots is not None
    live = torch.ones_like(scores, dtype=torch.bool) if token_mask is None else token_mask  # (B, M)
    torch._assert(live.shape == (B, M), "inverse_transform_sample: token_mask must match scores (B, M)")
    _check(live.any(dim=1).all(), "inverse_transform_sample: every sample needs a live token", static)
    # float64: CDF boundaries are then exact enough that rounding never merges or splits picks
    w = scores.detach().double().clamp_min(0) * live  # (B, M), padding weighs 0
    if _UPPER_BOUND.get():
        w = live.double()  # equal weights: fixed points 1/K apart never share a 1/M interval
    total = w.sum(dim=1, keepdim=True)  # (B, 1)
    w = torch.where(total > 0, w, live.double())  # degenerate scores: uniform over live tokens
    cdf = w.cumsum(dim=1)  # (B, M) ATS eq. 4 in token order
    cdf = cdf / cdf[:, -1:]  # (B, M) exactly 1 at the end (x / x == 1 in IEEE arithmetic)

    k_b = torch.as_tensor(k, device=device, dtype=torch.long).expand(B)  # (B,)
    _check((k_b >= 1).all(), "inverse_transform_sample: K must be >= 1", static)
    if static:
        _check((k_b <= slots).all(), "inverse_transform_sample: a sample's K exceeds the static slots", static)
    k_max = slots if static else int(k_b.max())  # host sync in dynamic mode only
    i = torch.arange(k_max, device=device, dtype=torch.float64)  # (Kmax,)
    k_f = k_b.double()[:, None]  # (B, 1)
    ys = (2 * i[None, :] + 1) / (2 * k_f)  # (B, Kmax) fixed points (2i-1)/(2K), 1-based i
    ys = torch.minimum(ys, (2 * k_f - 1) / (2 * k_f))  # points beyond a sample's own K repeat its last one
    picks = torch.searchsorted(cdf, ys).clamp_(max=M - 1)  # (B, Kmax) ATS eq. 5: first j with CDF_j >= y

    # ys and the CDF are non-decreasing, so picks are sorted and repeats are adjacent: keep the first
    first = torch.ones_like(picks, dtype=torch.bool)  # (B, Kmax)
    first[:, 1:] = picks[:, 1:] != picks[:, :-1]
    counts = first.sum(dim=1)  # (B,) K'
    k_kept = k_max if static else int(counts.max())  # K'max: trim the batch to the largest K' (dynamic)
    if k_kept >= M:  # every candidate has a slot: keep them in place, mark the picks (no gather later)
        kept = torch.arange(M, device=device).expand(B, M)  # (B, M)
        picked = torch.ones_like(picks, dtype=torch.bool)  # a tensor source: fvcore's jit trace takes no bool scalar
        return kept, torch.zeros_like(live).scatter_(1, picks, picked)  # (B, M) valid = picked
    if static:
        return picks, first  # (B, slots) repeats stay, masked
    order = torch.argsort((~first).to(torch.int8), dim=1, stable=True)[:, :k_kept]  # (B, K'max) uniques first
    kept = picks.gather(1, order)  # (B, K'max) ascending positions
    valid = torch.arange(k_kept, device=device)[None, :] < counts[:, None]  # (B, K'max)
    return kept, valid


@contextlib.contextmanager
def upper_bound_sampling() -> Iterator[None]:
    """Within this context ATS keeps exactly K' = min(K, live tokens) tokens in every sample.

    Used to count a model's cost at its upper bound K' = K (the figure papers quote for a given K)
    independently of the input. Outside the context sampling follows the scores.
    """
    token = _UPPER_BOUND.set(True)
    try:
        yield
    finally:
        _UPPER_BOUND.reset(token)


# --------------------------------------------------------------------------------------------------
# Data-dependent gather / pack helpers (FX leaves, STYLE #8)
# --------------------------------------------------------------------------------------------------

@register_notrace_function
def select_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """Per-sample gather along the token axis: ``x`` (B, N, *rest), ``idx`` (B, K) -> (B, K, *rest)."""
    torch._assert(idx.shape[0] == x.shape[0], "select_tokens: batch sizes differ")
    batch = torch.arange(x.shape[0], device=x.device)[:, None]  # (B, 1)
    return x[batch, idx]  # (B, K, *rest); differentiable w.r.t. x


@register_notrace_function
def with_class_token(kept_idx: Tensor) -> Tensor:
    """Kept indices over non-class tokens (B, K) -> row indices over the full sequence (B, 1+K)."""
    cls = torch.zeros_like(kept_idx[:, :1])  # (B, 1) the class token (row 0) is always kept
    return torch.cat([cls, kept_idx + 1], dim=1)  # (B, 1+K)


@register_notrace_function  # an FX leaf: the shape test sees real tensors only at run time
def kept_rows(x: Tensor, kept_idx: Tensor) -> Tensor:
    """The class + kept rows of ``x`` (B, N, *rest) for ``kept_idx`` (B, K) over its N - 1 non-class
    rows -> (B, 1+K, *rest); ``x`` itself, no copy, when K = N - 1 (the in-place layout: every slot kept)."""
    if kept_idx.shape[1] == x.shape[1] - 1:
        return x
    return select_tokens(x, with_class_token(kept_idx))  # (B, 1+K, *rest)


@register_notrace_function
def live_token_index(token_mask: Tensor | None, min_padding: float | None = None) -> Tensor | None:
    """Flat indices (L,) of live tokens in a (B, N) mask, or None when packing is not worth it.

    Packing live tokens for the linear layers (appendix A) costs two copies per layer; measured on
    CPU that beats computing the padded rows only when a good share of the slots is padding, so
    below ``min_padding`` (default :data:`PACK_MIN_PADDING`) of padded slots we return None and the
    padded rows are computed and discarded (they never reach a live token: keys are masked).
    """
    if token_mask is None:
        return None
    n_pad = token_mask.numel() - int(token_mask.sum())
    if n_pad == 0 or n_pad < (PACK_MIN_PADDING if min_padding is None else min_padding) * token_mask.numel():
        return None
    return token_mask.reshape(-1).nonzero().squeeze(1)  # (L,)


@register_notrace_function
def pack_tokens(x: Tensor, live_index: Tensor | None) -> Tensor:
    """(B, N, C) -> (L, C) live tokens only (appendix A: FC layers see no padding); identity if None."""
    if live_index is None:
        return x
    return x.reshape(-1, x.shape[-1]).index_select(0, live_index)  # (L, C)


@register_notrace_function
def unpack_tokens(y: Tensor, live_index: Tensor | None, like: Tensor) -> Tensor:
    """Inverse of :func:`pack_tokens`: (L, C') -> (B, N, C') with zeros in padded slots."""
    if live_index is None:
        return y
    B, N = like.shape[:2]
    out = y.new_zeros(B * N, y.shape[-1])  # (B*N, C')
    return out.index_copy(0, live_index, y).reshape(B, N, y.shape[-1])  # (B, N, C')


def masked_pool(x: Tensor, token_mask: Tensor | None, pool_type: str, num_prefix_tokens: int = 1) -> Tensor:
    """timm's ``global_pool_nlc`` with padded tokens ignored: (B, N, C) -> (B, C).

    ``pool_type`` is ``token`` (class token, always live), ``avg``, ``max`` or ``avgmax`` over the
    non-prefix live tokens, or ``''`` (no pooling: returns ``x``).
    """
    if not pool_type:
        return x
    if pool_type == "token":
        return x[:, 0]  # (B, C)
    tokens = x[:, num_prefix_tokens:]  # (B, N-p, C)
    live = (torch.ones_like(tokens[..., 0], dtype=torch.bool) if token_mask is None
            else token_mask[:, num_prefix_tokens:])  # (B, N-p)
    w = live[..., None].to(tokens.dtype)  # (B, N-p, 1)
    mean = (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)  # (B, C)
    if pool_type == "avg":
        return mean
    mx = tokens.masked_fill(~live[..., None], float("-inf")).amax(1)  # (B, C)
    if pool_type == "max":
        return mx
    if pool_type == "avgmax":
        return 0.5 * (mean + mx)
    raise ValueError(f"unsupported pool type {pool_type!r} for an ATS model (token, avg, max, avgmax or '')")


# --------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------

class ATSSamplingMixin:
    """The inference-time knobs of an ATS sampler: K (count) or ratio, the floor, ``keep_all``, and the
    mode (``dynamic`` or ``static`` shapes, module docstring).

    ``keep_all=True`` bypasses sampling (every live token kept) while running the rest of the ATS
    path: the exact "nothing dropped" reference. Note that the paper's K = N does NOT mean nothing
    is dropped: K' <= K, and any token with S_j >= 2/K makes K' < K (section 3.2).
    Backbones with their own ATS modules (video models) can inherit this so :func:`set_ats_k`
    reaches them.
    """

    ats_k: int | None = None
    ats_ratio: float | None = None
    ats_floor: int = DEFAULT_K_FLOOR
    ats_keep_all: bool = False
    ats_mode: str = "dynamic"

    def set_mode(self, mode: str) -> None:
        self.ats_mode = check_ats_mode(mode)

    def is_static(self, x: Tensor) -> bool:
        """Whether this forward runs static shapes: static mode, or meta tensors (no values to trim by)."""
        return self.ats_mode == "static" or (isinstance(x, Tensor) and x.device.type == "meta")  # FX: a Proxy

    def static_slots(self, n_tokens: int) -> int:
        """Static mode's K for ``n_tokens`` input slots (class incl.): no sample can resolve a larger K."""
        return resolve_k(n_tokens, self.ats_k, self.ats_ratio, self.ats_floor)

    def set_k(self, k: int | None = None, ratio: float | None = None, *, floor: int = DEFAULT_K_FLOOR,
              keep_all: bool = False) -> None:
        """Set K (count) or ratio; neither means the paper's default K = number of input tokens."""
        _check_k_args(k, ratio, floor)
        self.ats_k, self.ats_ratio, self.ats_floor, self.ats_keep_all = k, ratio, floor, bool(keep_all)

    def k_per_sample(self, n_live: Tensor, static: bool = False) -> Tensor:
        """(B,) live tokens incl. class -> (B,) K for this stage."""
        return resolve_k_per_sample(n_live, self.ats_k, self.ats_ratio, self.ats_floor, static)

    def extra_repr(self) -> str:
        return self.ats_extra_repr()

    def ats_extra_repr(self) -> str:
        mode = ", mode=static" if self.ats_mode == "static" else ""
        if self.ats_keep_all:
            return "keep_all=True" + mode
        if self.ats_k is not None:
            return f"k={self.ats_k}" + mode
        return (f"ratio={self.ats_ratio}, floor={self.ats_floor}" if self.ats_ratio is not None else "k=N") + mode


def _attend(attn: Attention, q: Tensor, k: Tensor, v: Tensor, token_mask: Tensor | None,
            static: bool = False) -> Tensor:
    """Softmax(q k^T / sqrt(d)) v for the given query rows only, fused or manual as ``attn.fused_attn``
    says (STYLE #6; :func:`models.attention.masked_attention`).

    ``q`` (B, H, Lq, Dh), ``k``/``v`` (B, H, N, Dh), ``token_mask`` (B, N) -> (B, H, Lq, Dh).
    Padded keys are excluded from the softmax; the full N x N matrix is never formed unless
    Lq == N (a masked block).
    """
    return masked_attention(q, k, v, token_mask, scale=attn.scale, fused=attn.fused_attn,
                            dropout_p=attn.attn_drop.p if attn.training else 0.0,
                            static=static)  # (B, H, Lq, Dh) ATS eq. 2 / ATS eq. 6


def _output(attn: Attention, o: Tensor, x_rows: Tensor, live_index: Tensor | None) -> Tensor:
    """Head merge, timm's optional norm/gate, output projection, on live rows only.

    ``o`` (B, H, L, Dh) attention output, ``x_rows`` (B, L, C) the block inputs of the same rows
    (for timm's optional gate) -> (B, L, C), zero in padded rows.
    """
    B, H, L, Dh = o.shape
    o = o.transpose(1, 2).reshape(B, L, H * Dh)  # (B, L, H*Dh)
    y = attn.norm(pack_tokens(o, live_index))  # (L', H*Dh)
    if attn.gate is not None:
        y = y * attn.gate(pack_tokens(x_rows, live_index)).sigmoid()
    y = attn.proj_drop(attn.proj(y))  # (L', C)
    return unpack_tokens(y, live_index, x_rows)  # (B, L, C)


def _qkv(attn: Attention, x: Tensor, live_index: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """QKV projection of live tokens: (B, N, C) -> q, k, v each (B, N, H, Dh) (padding rows zero)."""
    B, N, _ = x.shape
    qkv = unpack_tokens(attn.qkv(pack_tokens(x, live_index)), live_index, x)  # (B, N, 3*H*Dh)
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)  # each (B, N, H, Dh)
    return attn.q_norm(q), attn.k_norm(k), v


class MaskedAttention(Attention):
    """timm ``Attention`` that ignores padded tokens: padded keys are out of every softmax and the
    QKV / output projections run on live tokens only. Same parameters as timm's ``Attention``.

    ``forward(x (B, N, C), token_mask (B, N) | None, static) -> (B, N, C)``, zero in padded rows;
    ``static``: no packing and no host sync (the padded rows are computed and discarded).
    """

    def forward(self, x: Tensor, token_mask: Tensor | None = None,  # type: ignore[override]
                static: bool = False) -> Tensor:
        B, N, C = x.shape
        li = None if static else live_token_index(token_mask)  # (L,) or None
        q, k, v = _qkv(self, x, li)  # each (B, N, H, Dh)
        o = _attend(self, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), token_mask,
                    static)  # (B, H, N, Dh)
        return _output(self, o, x, li)  # (B, N, C)


class ATSAttention(ATSSamplingMixin, Attention):
    """Self-attention with the Adaptive Token Sampler (Fig. 1, Fig. A.3); drop-in for timm ``Attention``.

    Same parameters (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``,
    ``proj_drop``) so state dicts are unchanged; ATS itself has none. Steps:

    1. Q, K, V for all live tokens; the class row ``A_{1,:}`` by hand (no gradient needed: it only
       picks indices).
    2. Scores (ATS eq. 3) and inverse transform sampling (ATS eqs. 4-5) -> kept tokens, K' <= K per sample.
    3. ``O = A^s V`` (ATS eq. 6) for the class + kept rows only, with fused SDPA (queries = kept rows,
       keys/values = all live tokens): never the full N x N matrix. Gradients flow through these rows.

    ``forward(x (B, N, C), token_mask (B, N) | None, static=None) -> (out (B, 1+L, C), kept_idx (B, L),
    new_mask (B, 1+L))``: ``kept_idx`` indexes the input's non-class tokens (0 = token 1); L = K'max
    (dynamic) or K (static), N - 1 when every slot stays in place. ``out`` is zero in padded rows; the
    caller gathers the residual with :func:`kept_rows`. ``static=None`` follows :meth:`is_static`.
    """

    def __init__(self, dim: int, num_heads: int = 8, *, k: int | None = None, ratio: float | None = None,
                 floor: int = DEFAULT_K_FLOOR, mode: str = "dynamic", **attn_kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **attn_kwargs)
        self.set_k(k, ratio, floor=floor)
        self.set_mode(mode)

    def forward(self, x: Tensor, token_mask: Tensor | None = None,  # type: ignore[override]
                static: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        B, N, C = x.shape
        static = self.is_static(x) if static is None else static
        li = None if static else live_token_index(token_mask)  # (L,) or None
        q, k, v = _qkv(self, x, li)  # each (B, N, H, Dh)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, Dh)
        n_live = (torch.full((B,), N, device=x.device, dtype=torch.long) if token_mask is None
                  else token_mask.sum(dim=1))  # (B,) live tokens incl. class

        with torch.no_grad():  # selection is discrete: no gradient through scores (as in the paper)
            if self.ats_keep_all:
                kept_idx = torch.arange(N - 1, device=x.device).expand(B, N - 1)  # (B, N-1) every token
                kept_valid = (torch.ones_like(kept_idx, dtype=torch.bool) if token_mask is None
                              else token_mask[:, 1:])  # (B, N-1)
            else:
                cls_attn = class_attention(q[:, 0].detach(), k.detach(), self.scale, token_mask)  # (B, H, N)
                scores = ats_significance(cls_attn, v.detach(), token_mask)  # (B, N-1) ATS eq. 3
                kept_idx, kept_valid = inverse_transform_sample(
                    scores, self.k_per_sample(n_live, static), None if token_mask is None else token_mask[:, 1:],
                    slots=self.static_slots(N) if static else None)
        new_mask = torch.cat([torch.ones_like(kept_valid[:, :1]), kept_valid], dim=1)  # (B, 1+K)
        out_mask = token_mask if self.ats_keep_all else new_mask  # keep_all: the same (or no) padding

        q_rows = kept_rows(q, kept_idx).transpose(1, 2)  # (B, H, 1+K, Dh) queries of kept rows only
        o = _attend(self, q_rows, k, v, token_mask, static)  # (B, H, 1+K, Dh) O = A^s V, ATS eq. 6
        out = _output(self, o, kept_rows(x, kept_idx),
                      None if static else live_token_index(out_mask))  # (B, 1+K, C)
        return out, kept_idx, new_mask


def _ffn(block: Block, x: Tensor, token_mask: Tensor | None, static: bool = False) -> Tensor:
    """Residual FFN branch on live tokens only (norm2 and MLP see no padding; ``static``: every slot,
    no packing): (B, N, C) -> (B, N, C)."""
    li = None if static else live_token_index(token_mask)
    y = unpack_tokens(block.mlp(block.norm2(pack_tokens(x, li))), li, x)  # (B, N, C)
    return x + block.drop_path2(block.ls2(y))  # drop_path per sample, after unpacking


class MaskedBlock(Block):
    """timm ``Block`` (same parameter names) for the blocks after an ATS stage: masked attention,
    FFN on live tokens, padded rows kept at zero. ``forward(x, token_mask, static=False) -> x``."""

    def __init__(self, dim: int, num_heads: int, **block_kwargs) -> None:
        super().__init__(dim, num_heads, attn_layer=MaskedAttention, **block_kwargs)

    def forward(self, x: Tensor, token_mask: Tensor | None = None,  # type: ignore[override]
                static: bool = False) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), token_mask, static)))  # (B, N, C)
        return zero_padding(_ffn(self, x, token_mask, static), token_mask, static)


class ATSBlock(Block):
    """timm ``Block`` (same parameter names) whose attention samples tokens (appendix E.6):
    ``O = A^s V`` for the kept rows, residual gathered for them, then the FFN on kept tokens only.

    ``forward(x (B, N, C), token_mask, static=None) -> (x (B, 1+L, C), kept_idx (B, L), new_mask)``
    (:class:`ATSAttention`). With ``keep_all`` nothing is gathered and the mask stays ``token_mask``.
    """

    def __init__(self, dim: int, num_heads: int, *, k: int | None = None, ratio: float | None = None,
                 floor: int = DEFAULT_K_FLOOR, mode: str = "dynamic", **block_kwargs) -> None:
        super().__init__(dim, num_heads, attn_layer=ATSAttention, **block_kwargs)
        self.attn.set_k(k, ratio, floor=floor)
        self.attn.set_mode(mode)

    def forward(self, x: Tensor, token_mask: Tensor | None = None,  # type: ignore[override]
                static: bool | None = None) -> tuple[Tensor, Tensor, Tensor]:
        static = self.attn.is_static(x) if static is None else static
        out, kept_idx, new_mask = self.attn(self.norm1(x), token_mask, static)  # (B, 1+K, C)
        x = kept_rows(x, kept_idx) + self.drop_path1(self.ls1(out))  # (B, 1+K, C) residual of the kept rows
        mask = token_mask if self.attn.ats_keep_all else new_mask  # keep_all: padding (if any) unchanged
        return zero_padding(_ffn(self, x, mask, static), mask, static), kept_idx, new_mask


# --------------------------------------------------------------------------------------------------
# Conversion, the block loop, introspection
# --------------------------------------------------------------------------------------------------

def _convert_block(block: nn.Module, new_cls: type[Block], attn_cls: type[Attention]) -> Block:
    if not isinstance(block, Block) or not isinstance(block.attn, Attention):
        raise TypeError(f"ATS converts timm Block/Attention modules, got {type(block).__name__} with "
                        f"{type(getattr(block, 'attn', None)).__name__}")
    if type(block) not in (Block, MaskedBlock, ATSBlock) or type(block.attn) not in (
            Attention, MaskedAttention, ATSAttention):
        # A subclass may compute something else in forward(); we would silently replace it.
        raise TypeError(f"cannot convert {type(block).__name__}/{type(block.attn).__name__}: ATS reimplements "
                        "forward() of timm's Block and Attention exactly, not of subclasses")
    # Same parameters and buffers, new forward(): swap the class in place so state_dict keys stay.
    block.attn.__class__ = attn_cls
    block.__class__ = new_cls
    return block


def convert_blocks(blocks: Sequence[nn.Module], stages: Sequence[int], k: int | Sequence[int | None] | None = None,
                   ratio: float | Sequence[float | None] | None = None, floor: int = DEFAULT_K_FLOOR,
                   mode: str = "dynamic") -> None:
    """Turn timm ``Block`` s into ATS blocks in place: ``blocks[s]`` for s in ``stages`` sample
    tokens (K or ratio per stage, one value for all or one per stage), every later block becomes a
    :class:`MaskedBlock`; earlier blocks are untouched. Parameters (and state_dict keys) are unchanged.
    ``mode``: ``dynamic`` or ``static`` shapes (module docstring).
    """
    check_ats_mode(mode)
    depth = len(blocks)
    stages = check_ats_stages(stages, depth)
    if not stages:
        raise ValueError("ATS needs at least one stage")
    ks = _per_stage(k, len(stages), "k")
    ratios = _per_stage(ratio, len(stages), "ratio")
    for kk, rr in zip(ks, ratios):
        _check_k_args(kk, rr, floor)
    for i in range(stages[0], depth):
        if i in stages:
            j = stages.index(i)
            blk = _convert_block(blocks[i], ATSBlock, ATSAttention)
            blk.attn.set_k(ks[j], ratios[j], floor=floor)
            blk.attn.set_mode(mode)
        else:
            _convert_block(blocks[i], MaskedBlock, MaskedAttention)


def check_ats_stages(stages: Sequence[int], depth: int) -> list[int]:
    """``ats_stages`` validated against a ``depth``-block model and sorted: 0-based block indices, no repeats.

    Raises ``ValueError`` naming the offending stage (ATS stages count blocks from 0, as the paper does).
    """
    stages = list(stages)
    for s in stages:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < depth:
            raise ValueError(f"ATS stage {s!r} is not a block index in [0, {depth - 1}] (stages count from 0)")
    if len(set(stages)) != len(stages):
        raise ValueError(f"ATS stages repeat: {stages}")
    return sorted(stages)


def _per_stage(value, n: int, name: str) -> list:
    if value is None or isinstance(value, (int, float)):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise ValueError(f"ATS {name} has {len(values)} values for {n} stages: {values}")
    return values


def ats_stages(model: nn.Module) -> list[ATSSamplingMixin]:
    """The model's ATS samplers, in module order."""
    return [m for m in model.modules() if isinstance(m, ATSSamplingMixin)]


def set_ats_k(model: nn.Module, k: int | Sequence[int | None] | None = None,
              ratio: float | Sequence[float | None] | None = None, *, floor: int = DEFAULT_K_FLOOR,
              keep_all: bool = False) -> nn.Module:
    """Change K at inference time (no weights touched): one K/ratio for every ATS stage or one per
    stage; neither = the paper's default K = input tokens; ``keep_all`` = sample nothing away."""
    samplers = ats_stages(model)
    if not samplers:
        raise ValueError(f"{type(model).__name__} has no ATS stage")
    ks = _per_stage(k, len(samplers), "k")
    ratios = _per_stage(ratio, len(samplers), "ratio")
    for s, kk, rr in zip(samplers, ks, ratios):
        s.set_k(kk, rr, floor=floor, keep_all=keep_all)
    return model


def set_ats_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every ATS stage of ``model`` to ``dynamic`` or ``static`` shapes (module docstring) at
    inference time; the weights and the logits stay the same. Returns ``model``."""
    samplers = ats_stages(model)
    if not samplers:
        raise ValueError(f"{type(model).__name__} has no ATS stage")
    check_ats_mode(mode)
    for s in samplers:
        s.set_mode(mode)
    return model


def forward_ats_blocks(blocks: Iterable[nn.Module], x: Tensor, token_mask: Tensor | None = None, *,
                       checkpoint: bool = False, grid: tuple[int, int] | None = None,
                       candidates_xy: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Run a stack of (timm / masked / ATS) blocks, threading the token mask.

    ``x`` (B, N, C) with the class token first. Returns ``(x (B, N', C), token_mask (B, N') | None)``.
    While a trace is recorded (:func:`models.trace.record`) every ATS block emits a
    :class:`models.trace.KeptTokens` (stage = index in ``blocks``) whose positions index the N - 1
    non-class tokens ``blocks`` received: the patch cells of ``grid`` (rows, cols), or the points
    ``candidates_xy`` (B, N-1, 2) in normalised input (x, y) (PS-ViT's sampled tokens).
    Once a stage runs static shapes (:meth:`ATSSamplingMixin.is_static`) every later block does too.
    A ``keep_all`` stage on an unpadded sequence leaves the mask None: later blocks run unmasked.
    """
    B, N, _ = x.shape
    traced = recording()
    positions = torch.arange(N - 1, device=x.device).expand(B, N - 1) if traced else None  # (B, N-1)
    static = False
    for i, blk in enumerate(blocks):
        run = partial(torch.utils.checkpoint.checkpoint, blk, use_reentrant=False) if checkpoint else blk
        if isinstance(blk, ATSBlock):
            static = static or blk.attn.is_static(x)
            unpadded = token_mask is None and blk.attn.ats_keep_all
            x, kept_idx, new_mask = run(x, token_mask, static)  # (B, 1+K, C), (B, K), (B, 1+K)
            if traced:
                positions = positions.gather(1, kept_idx)  # (B, K) original candidate indices
                emit(KeptTokens(i, positions, new_mask[:, 1:], grid=grid, candidates_xy=candidates_xy))
            token_mask = None if unpadded else new_mask
        elif isinstance(blk, MaskedBlock):
            x = run(x, token_mask, static)
        else:
            if token_mask is not None:
                raise TypeError(f"block {i} ({type(blk).__name__}) follows an ATS stage but is not mask-aware")
            x = run(x)
    return x, token_mask
