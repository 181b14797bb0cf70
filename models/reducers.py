"""Token reducers side by side: ATS (single- and multi-stage), ToMe and EViT on one ViT, at matched GFLOPs.

Each :class:`Reducer` names the registered model that carries the method, the knob that sets how much it
reduces and how to set that knob on a built model. :func:`match_gflops` finds, for a target GFLOPs, the knob
value whose count (``models.flops.count_flops``: the same fvcore counter for every method, ATS at its upper
bound K' = K) is closest to the target, by bisection over the knob's range: every method's cost falls
monotonically as its knob reduces more. The benchmark harness and the accuracy-GFLOPs frontier use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from models.ats import set_ats_k
from models.evit import set_evit_keep_rate
from models.flops import count_flops, example_input
from models.tome import set_tome_r

__all__ = ["REDUCERS", "Reducer", "match_gflops"]


@dataclass(frozen=True)
class Reducer:
    """One token-reduction method on a DeiT: the model that carries it and its knob.

    ``lo``/``hi``: the knob's range, ``hi`` reducing the most when ``increasing`` is False (a keep count or
    rate) and ``lo`` when True (ToMe's r: more merges, less cost). ``integer``: the knob is a count.
    """

    label: str
    model: str  # the variant for DeiT-S; ``{size}`` is replaced by tiny / small / base
    knob: str
    lo: float
    hi: float
    integer: bool
    increasing: bool  # True when a larger knob value reduces more
    set_knob: Callable[[nn.Module, Any], nn.Module]
    build_kwargs: tuple[tuple[str, Any], ...] = ()

    def build(self, size: str = "small", **kwargs: Any) -> nn.Module:
        import models

        return models.create_model(self.model.format(size=size), **dict(self.build_kwargs), **kwargs)

    def value(self, x: float) -> float | int:
        return int(round(x)) if self.integer else round(float(x), 4)


def _ats_k(model: nn.Module, k: int) -> nn.Module:
    set_ats_k(model, k=int(k))
    return model


def _ats_ratio(model: nn.Module, ratio: float) -> nn.Module:
    set_ats_k(model, ratio=float(ratio))
    return model


REDUCERS: dict[str, Reducer] = {r.label: r for r in (
    # ATS section 4.1: single stage 3 with K = 108 / 78 / 48 for 3.0 / 2.5 / 2.0 GFLOPs (at K' = K)
    Reducer("ats", "deit_{size}_ats", "ats_k", 8, 196, True, False, _ats_k, (("single_stage", True),)),
    # ATS multi-stage (blocks 3-11), K_n = max(floor(rho * N_n), 8)
    Reducer("ats_multi", "deit_{size}_ats", "ats_ratio", 0.05, 1.0, False, False, _ats_ratio),
    Reducer("tome", "deit_{size}_tome", "tome_r", 0, 64, True, True, set_tome_r),
    Reducer("evit", "deit_{size}_evit", "evit_keep_rate", 0.05, 1.0, False, False, set_evit_keep_rate),
)}


def _gflops(reducer: Reducer, model: nn.Module, value: float, x: torch.Tensor) -> float:
    return count_flops(reducer.set_knob(model, reducer.value(value)), x).gflops


def match_gflops(reducer: Reducer, model: nn.Module, target: float, *, steps: int = 12) -> tuple[float | int, float]:
    """The knob value of ``reducer`` on ``model`` whose GFLOPs (batch 1, the model's input) are nearest
    ``target``, and those GFLOPs. The model is left at that value."""
    x = example_input(model)
    lo, hi = float(reducer.lo), float(reducer.hi)
    # Orient the search so that ``cheap`` is the end that reduces the most.
    cheap, full = (hi, lo) if reducer.increasing else (lo, hi)
    for _ in range(steps):
        mid = (cheap + full) / 2
        if reducer.integer and abs(cheap - full) <= 1:
            break
        if _gflops(reducer, model, mid, x) > target:
            full = mid  # still too expensive: reduce more
        else:
            cheap = mid
    candidates = {reducer.value(v) for v in (cheap, full)}
    scored = sorted((abs(_gflops(reducer, model, v, x) - target), v) for v in candidates)
    best = scored[0][1]
    return best, _gflops(reducer, model, best, x)
