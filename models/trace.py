"""One trace protocol for every family: which tokens a forward kept and where it sampled.

Modules keep no forward state. A caller who wants to see inside a forward opens a recorder, and the
models emit frozen, detached records into it while that forward runs::

    with models.trace.record() as trace:
        logits = model(x)
    for kept in trace.kept_tokens():    # ATS: DeiT/ViT, PS-ViT, TimeSformer, XViT
        print(kept.stage, kept.counts)  # K' per sample
    for pts in trace.sampled_points():  # PS-ViT iterations, (Video)SparseFormer stages
        print(pts.name, pts.points.shape)

Outside :func:`record` nothing is computed or kept: :func:`recording` is a read of one module-level
flag, so under ``torch.compile`` it becomes a guard (no graph break) and FX / TorchScript graphs traced
while it is off contain no emission at all. Records go to every recorder open on the emitting thread
(another thread's forward never lands in this thread's trace); one record per stage and forward, so
activation checkpointing (which recomputes blocks in the backward pass) adds none.

Coordinates (the one convention of every record; ``models.point_sampling`` uses the same):
    normalised to [0, 1] of the model INPUT, image or clip: 0 is the outer edge of the first pixel
    (frame), 1 the outer edge of the last, and the centre of pixel ``i`` sits at ``(i + 0.5) / size``.
    The last axis is (x, y) for images and (x, y, t) for clips; x runs along W, y along H, t along T.
    Patch cell ``p`` of a ``grid = (rows, cols)`` is row ``p // cols``, column ``p % cols`` (row-major).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["KeptTokens", "Record", "SampledPoints", "Trace", "emit", "record", "recording"]


@dataclass(frozen=True)
class KeptTokens:
    """What one ATS stage kept (ATS eqs. 4-5), per sample.

    ``positions`` (B, K'max) long index the stage's CANDIDATE tokens, ascending in each sample's first
    K' slots; ``valid`` (B, K'max) bool marks those slots (later slots are padding: read positions
    through ``valid``). The candidates are the patch cells of ``grid`` (rows, cols) when it is given
    (DeiT/ViT, TimeSformer, XViT), otherwise the points ``candidates_xy`` (B, M, 2) in normalised (x, y)
    input coordinates (PS-ViT's sampled tokens). ``num_frames`` is T for video ATS, whose positions are
    shared by every frame of a clip, and None for images. ``stage`` is the 0-based block index.
    """

    stage: int
    positions: Tensor
    valid: Tensor
    grid: tuple[int, int] | None = None
    candidates_xy: Tensor | None = None
    num_frames: int | None = None

    def __post_init__(self) -> None:
        if (self.grid is None) == (self.candidates_xy is None):
            raise ValueError("KeptTokens needs exactly one of grid (patch cells) or candidates_xy (points)")
        if tuple(self.positions.shape) != tuple(self.valid.shape) or self.positions.dim() != 2:
            raise ValueError(f"KeptTokens positions {tuple(self.positions.shape)} and valid "
                             f"{tuple(self.valid.shape)} must be the same (B, K) shape")
        object.__setattr__(self, "positions", self.positions.detach())
        object.__setattr__(self, "valid", self.valid.detach())
        if self.candidates_xy is not None:
            object.__setattr__(self, "candidates_xy", self.candidates_xy.detach())
        if self.grid is not None:
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    @property
    def batch_size(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_candidates(self) -> int:
        """M, the number of tokens the stage could keep (the patch cells, or PS-ViT's sampled points)."""
        if self.grid is not None:
            return self.grid[0] * self.grid[1]
        return int(self.candidates_xy.shape[1])

    @property
    def counts(self) -> Tensor:
        """(B,) K' per sample: how many tokens this stage kept."""
        return self.valid.sum(dim=1)

    @property
    def kept_positions(self) -> list[Tensor]:
        """Per sample, the (K',) candidate indices kept, ascending."""
        return [p[v] for p, v in zip(self.positions, self.valid)]


@dataclass(frozen=True)
class SampledPoints:
    """Where one sampling step read the input: a PS-ViT iteration (PS-ViT eqs. 1-3) or a (Video)SparseFormer
    sampling stage (SparseFormer eqs. 2-3, 7-8).

    ``points`` (B, N, P, A): P points for each of N tokens (PS-ViT: P = 1), A = 2 (x, y) or 3 (x, y, t),
    normalised input coordinates. ``rois`` (B, N, 2A) as centre then size ((x, y[, t]), (w, h[, l])),
    normalised likewise, after this stage's adjustment; None for PS-ViT, whose tokens have no RoI.
    ``stage`` counts from 1 in the model's own order; ``name`` labels it ("iteration 2", "focusing 1").
    """

    stage: int
    name: str
    points: Tensor
    rois: Tensor | None = None

    def __post_init__(self) -> None:
        if self.points.dim() != 4 or self.points.shape[-1] not in (2, 3):
            raise ValueError(f"SampledPoints points must be (B, N, P, 2|3), got {tuple(self.points.shape)}")
        object.__setattr__(self, "points", self.points.detach())
        if self.rois is not None:
            object.__setattr__(self, "rois", self.rois.detach())

    @property
    def batch_size(self) -> int:
        return int(self.points.shape[0])

    @property
    def num_axes(self) -> int:
        """A: 2 for images (x, y), 3 for clips (x, y, t)."""
        return int(self.points.shape[-1])


Record = KeptTokens | SampledPoints


class Trace(list):
    """The records of one :func:`record` block, in emission order (a plain list, with filters)."""

    def kept_tokens(self) -> list[KeptTokens]:
        return [r for r in self if isinstance(r, KeptTokens)]

    def sampled_points(self) -> list[SampledPoints]:
        return [r for r in self if isinstance(r, SampledPoints)]

    def kept_counts(self) -> Tensor | None:
        """(B, stages) K' of every ATS stage per sample, or None when nothing was kept by ATS."""
        kept = self.kept_tokens()
        return torch.stack([r.counts for r in kept], dim=1) if kept else None


# Open recorders: a process-wide count (the cheap flag) and, per thread, the traces that receive records.
_OPEN = 0
_LOCAL = threading.local()
_LOCK = threading.Lock()


def recording() -> bool:
    """True while any :func:`record` block is open: models build records only then."""
    return _OPEN > 0


def emit(rec: Record) -> None:
    """Hand ``rec`` to every recorder open on this thread (nothing happens outside :func:`record`)."""
    for trace in getattr(_LOCAL, "traces", ()):
        trace.append(rec)


@contextlib.contextmanager
def record() -> Iterator[Trace]:
    """Collect the records that forwards on this thread emit inside the block (nested blocks all collect)."""
    global _OPEN
    trace = Trace()
    traces = _LOCAL.__dict__.setdefault("traces", [])
    traces.append(trace)
    with _LOCK:
        _OPEN += 1
    try:
        yield trace
    finally:
        with _LOCK:
            _OPEN -= 1
        del traces[next(i for i, t in enumerate(traces) if t is trace)]  # by identity: Trace compares as a list
