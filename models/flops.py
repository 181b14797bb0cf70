"""GFLOPs and parameter counting on fvcore, with the operators token-efficient models rely on.

Convention (fvcore's and the papers'): one multiply-add = one FLOP, and "GFLOPs" are fvcore's
counts / 1e9. Softmax, GELU, residual adds and other element-wise ops are not counted; LayerNorm
counts 5 per element (fvcore's rule). What this module adds to fvcore's handles:

* ``aten::scaled_dot_product_attention`` and the fused kernels it can trace to (flash / memory-
  efficient / math): ``Lq * Lk * (Dqk + Dv)`` per batch x head, the same as the two explicit
  matmuls ``Q K^T`` and ``A V`` it replaces, so a fused model counts what its manual twin counts.
  Masks (padding, causal) do not reduce the count: the dense kernel still does the work.
* ATS's own work, which fvcore would skip: ``||V_j||`` (``aten::linalg_vector_norm``, one per input
  element), the CDF (``aten::cumsum``, one per element) and the inverse-CDF search
  (``aten::searchsorted``, ``ceil(log2 M)`` comparisons per fixed point). The class-token row
  ``q_cls K^T`` is a matmul and counted by fvcore's rule. Gathers, sorts and masks count 0.

Adaptive models: :func:`count_flops` counts ATS at its upper bound K' = K (inside
:func:`models.ats.upper_bound_sampling`), the figure papers give for a K; :func:`average_flops`
counts each sample's own kept tokens and averages over a dataset.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from models.ats import upper_bound_sampling
from models.registry import built_input_size
from models.trace import record

with warnings.catch_warnings():
    # fvcore's focal_loss module calls torch.jit.script at import, which torch >= 2.10 deprecates (a
    # FutureWarning on every import of this module); Glimpse uses fvcore's FLOP counter only.
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ["FlopReport", "average_flops", "count_flops", "example_input", "measure_throughput", "model_input_shape",
           "param_count"]


# --------------------------------------------------------------------------------------------------
# Extra fvcore op handles
# --------------------------------------------------------------------------------------------------

def _sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Fused attention: Q K^T (Lq x Lk x Dqk) + A V (Lq x Lk x Dv) MACs per batch x head."""
    q, k, v = (get_shape(t) for t in inputs[:3])  # q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv)
    batch_heads = math.prod(q[:-2])
    return batch_heads * q[-2] * k[-2] * (q[-1] + v[-1])


def _numel_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """One FLOP per input element (vector norm, cumulative sum)."""
    return math.prod(get_shape(inputs[0]))


def _searchsorted_jit(inputs: list[Any], outputs: list[Any]) -> int:
    """Binary search: ceil(log2 M) comparisons per query value."""
    seq, values = get_shape(inputs[0]), get_shape(inputs[1])
    return math.prod(values) * max(1, math.ceil(math.log2(max(seq[-1], 2))))


_EXTRA_HANDLES = {
    "aten::scaled_dot_product_attention": _sdpa_flop_jit,
    "aten::_scaled_dot_product_flash_attention": _sdpa_flop_jit,
    "aten::_scaled_dot_product_flash_attention_for_cpu": _sdpa_flop_jit,
    "aten::_scaled_dot_product_efficient_attention": _sdpa_flop_jit,
    "aten::_scaled_dot_product_cudnn_attention": _sdpa_flop_jit,
    "aten::_scaled_dot_product_attention_math": _sdpa_flop_jit,
    "aten::linalg_vector_norm": _numel_jit,
    "aten::norm": _numel_jit,
    "aten::frobenius_norm": _numel_jit,
    "aten::cumsum": _numel_jit,
    "aten::searchsorted": _searchsorted_jit,
}


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------

@dataclass
class FlopReport:
    """One model's cost for one input.

    ``gflops``: every counted MAC / 1e9 (per input batch as given; batch 1 = per view).
    ``paper_gflops``: ``gflops`` minus submodules flagged ``exclude_from_paper_flops = True``
    (e.g. SparseFormer's adaptive mixing, which its paper leaves out).
    ``by_module``: GFLOPs per submodule name ('' = whole model), non-zero entries only.
    ``unsupported_ops``: operators fvcore saw but counted as 0, with how often they ran.
    """

    gflops: float
    paper_gflops: float
    params_m: float
    by_module: dict[str, float]
    input_shape: tuple
    unsupported_ops: dict[str, int] = field(default_factory=dict)


def param_count(model: nn.Module) -> int:
    """Number of parameters; a parameter shared by several layers counts once."""
    return sum(p.numel() for p in model.parameters())


def _analysis(model: nn.Module, inputs: Tensor | tuple) -> FlopCountAnalysis:
    analysis = FlopCountAnalysis(model, inputs)
    for name, handle in _EXTRA_HANDLES.items():
        analysis.set_op_handle(name, handle)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    return analysis


def _excluded_flops(model: nn.Module, by_module: Counter, attr: str) -> int:
    """FLOPs of the outermost submodules flagged ``attr`` (nested flagged modules are not double-counted)."""
    flagged = [n for n, m in model.named_modules() if n and getattr(m, attr, False)]
    outermost = [n for n in flagged if not any(n.startswith(o + ".") for o in flagged if o != n)]
    return sum(by_module.get(n, 0) for n in outermost)


def count_flops(model: nn.Module, inputs: Tensor | tuple, *, paper_excluded_attr: str = "exclude_from_paper_flops",
                ats_upper_bound: bool = True) -> FlopReport:
    """Count ``model``'s FLOPs on ``inputs`` with fvcore plus the handles above.

    Runs in eval mode without gradients (the model's mode is restored). With ``ats_upper_bound``
    (default) every ATS stage keeps exactly K' = K tokens, the cost papers quote for a K.
    """
    inputs_t = inputs if isinstance(inputs, tuple) else (inputs,)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jit tracer chatter: data-dependent shapes are expected here
            logging.getLogger("fvcore").setLevel(logging.ERROR)
            analysis = _analysis(model, inputs_t)
            if ats_upper_bound:
                with upper_bound_sampling():
                    by_module = analysis.by_module()
            else:
                by_module = analysis.by_module()
            unsupported = dict(analysis.unsupported_ops())
    finally:
        model.train(was_training)
    total = by_module.get("", 0)
    excluded = _excluded_flops(model, by_module, paper_excluded_attr)
    first = inputs_t[0]
    return FlopReport(
        gflops=total / 1e9,
        paper_gflops=(total - excluded) / 1e9,
        params_m=param_count(model) / 1e6,
        by_module={n: f / 1e9 for n, f in by_module.items() if f},
        input_shape=tuple(first.shape) if isinstance(first, Tensor) else (),
        unsupported_ops=unsupported,
    )


def _ats_signature(model: nn.Module, x: Tensor) -> list[tuple] | None:
    """Per sample of ``x``, the kept-token counts K' of every ATS stage (None if the model has no ATS)."""
    with torch.no_grad(), record() as trace:
        model(x)
    counts = trace.kept_counts()  # (B, stages) or None
    return None if counts is None else [tuple(row) for row in counts.tolist()]


def average_flops(model: nn.Module, batches: Iterable[Tensor]) -> float:
    """Average per-sample GFLOPs of an adaptive model over a dataset, counting each sample's OWN
    kept tokens (ATS: K' varies per sample, section 3.2 / Fig. 6).

    Each sample is counted alone (batch 1, so no padding is counted). The batch is first run once
    under :func:`models.trace.record`; for models that emit ATS kept-token records, samples with the
    same per-stage token counts share one fvcore trace (their cost is identical; ATS is
    batch-independent, so the counts in the batch equal those of the sample alone). Other models are
    traced sample by sample.
    """
    total, n = 0.0, 0
    cache: dict[tuple, float] = {}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(x, dict):
                x = x.get("image", x.get("video"))
            keys = _ats_signature(model, x)
            for i in range(x.shape[0]):
                key = keys[i] if keys is not None else None
                if key is None or key not in cache:
                    g = count_flops(model, x[i:i + 1], ats_upper_bound=False).gflops
                    if key is not None:
                        cache[key] = g
                else:
                    g = cache[key]
                total += g
                n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("average_flops got no samples")
    return total / n


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------

def model_input_shape(model: nn.Module) -> tuple[int, ...]:
    """Per-sample input shape, without the batch dimension: (3, H, W) images, (3, T, H, W) video.

    ``model.pretrained_cfg["input_size"]``, corrected by what the built model says
    (:func:`models.registry.built_input_size`: timm keeps the cfg's size when its own models are built
    with ``img_size=``; Glimpse's cfgs already follow the build).
    """
    return built_input_size(model)


def example_input(model: nn.Module, batch_size: int = 1, seed: int = 0) -> Tensor:
    """A deterministic random input of :func:`model_input_shape` (content does not matter for
    counting at the ATS upper bound)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch_size, *model_input_shape(model)), generator=g)


# --------------------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------------------

def measure_throughput(models: dict[str, nn.Module], x: Tensor, *, rounds: int, warmup: int = 1,
                       clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per forward pass of each model on ``x``, measured interleaved in one run.

    Every round runs each model once, starting from a different model each round, so slow drifts
    of the machine hit all models alike; report the median. ``clock="wall"`` measures elapsed time
    (all of torch's threads); ``clock="cpu"`` measures this thread's CPU time and needs
    ``torch.get_num_threads() == 1``: on a machine shared with other jobs it counts only our own
    work, so ratios stay meaningful when wall time is dominated by waiting for a core.
    """
    if clock not in ("wall", "cpu"):
        raise ValueError(f"clock must be 'wall' or 'cpu', got {clock!r}")
    if clock == "cpu" and torch.get_num_threads() != 1:
        raise ValueError(f"clock='cpu' times one thread; set torch.set_num_threads(1) "
                         f"(now {torch.get_num_threads()})")
    now = time.perf_counter if clock == "wall" else time.thread_time
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for m in models.values():
        m.eval()
    with torch.inference_mode():
        for _ in range(warmup):
            for n in names:
                models[n](x)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                t0 = now()
                models[n](x)
                times[n].append(now() - t0)
    return times
