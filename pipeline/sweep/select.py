"""Choosing operating points on the accuracy-versus-GFLOPs plane (ATS Fig. 4): the Pareto front and the
three selections a sweep offers (the most accurate, the most accurate within a budget, the whole front).

    >>> rows = [{"status": "complete", "top1": 0.7, "gflops": 2.0}, {"status": "complete", "top1": 0.6, "gflops": 1.0},
    ...         {"status": "complete", "top1": 0.65, "gflops": 2.5}]
    >>> [r["gflops"] for r in pareto_front(rows)]
    [1.0, 2.0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

Selection = Literal["best", "budget", "pareto"]


def is_number(v: Any) -> bool:
    """A finite int or float (not a bool, not None, not NaN)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pareto_front(rows: Sequence[Mapping[str, Any]], acc: str = "top1", cost: str = "gflops") -> list[Mapping[str, Any]]:
    """Rows no other row dominates (at most the cost and strictly more accurate, or cheaper and as
    accurate), sorted by cost. Rows without a number for either are ignored."""
    valid = [r for r in rows if is_number(r.get(acc)) and is_number(r.get(cost))]
    front, best = [], -math.inf
    for r in sorted(valid, key=lambda r: (r[cost], -r[acc])):
        if r[acc] > best:
            front.append(r)
            best = r[acc]
    return front


def most_accurate(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The row of highest top-1; ties go to the fewer GFLOPs."""
    return max(rows, key=lambda r: (r["top1"], -(r.get("gflops") or 0.0)))


def select_rows(rows: Sequence[Mapping[str, Any]], how: Selection = "best",
                gflops_budget: float | None = None) -> list[Mapping[str, Any]]:
    """The selected operating point(s) among complete rows: the most accurate (ties: fewer GFLOPs),
    the most accurate within ``gflops_budget``, or the whole Pareto front (cheapest first)."""
    complete = [r for r in rows if r.get("status") == "complete" and is_number(r.get("top1"))]
    if not complete:
        raise ValueError("no trial finished with an evaluation: nothing to select")
    if how == "pareto":
        return pareto_front(complete)
    if how == "budget":
        if gflops_budget is None:
            raise ValueError("selection 'budget' needs --gflops-budget")
        complete = [r for r in complete if is_number(r.get("gflops")) and r["gflops"] <= gflops_budget]
        if not complete:
            cheapest = min((r["gflops"] for r in rows if is_number(r.get("gflops"))), default=float("nan"))
            raise ValueError(f"no evaluated point within {gflops_budget} GFLOPs (the cheapest costs {cheapest:.4g})")
    elif how != "best":
        raise ValueError(f"unknown selection {how!r} (best, budget, pareto)")
    return [most_accurate(complete)]
