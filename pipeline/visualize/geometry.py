"""Sampling geometry, read from the models' trace records (:mod:`models.trace`) and put in image pixels.

This is the only module of :mod:`pipeline.visualize` that runs a model or reads its records; no model
class is imported: a model is known by the records it emits (``KeptTokens``: ATS; ``SampledPoints``
without RoIs: PS-ViT; with RoIs: (Video)SparseFormer). Coordinates: see the package docstring.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from datasets.media_inputs import MediaSpec, to_display
from models.trace import KeptTokens, Record, SampledPoints, record

__all__ = [
    "ATSStage",
    "SampleGeometry",
    "SamplingStage",
    "ats_kept_grid",
    "batch_tensor",
    "collect_kept_counts",
    "display_images",
    "extract_geometry",
    "geometry_family",
    "has_sampling_geometry",
    "model_media_spec",
    "probe_trace",
    "unwrap",
]

NO_GEOMETRY_HINT = ("figures need ATS stages (deit_*_ats, psvit_*_ats, timesformer_*_ats, xvit_*_ats), "
                    "PS-ViT sampling points (psvit_*) or SparseFormer RoIs (sparseformer_*, video_sparseformer_*)")


# ----------------------------------------------------------------------------------------------- records

@dataclass(frozen=True)
class SamplingStage:
    """One sampling step of one sample: a PS-ViT iteration or a (Video)SparseFormer sampling stage.

    ``points``: ``(N, P, 2)`` (x, y) pixels per token and point; video ``(N, P, 3)`` (x, y, frame).
    PS-ViT has one point per token (P = 1). ``rois``: None (PS-ViT), ``(N, 4)`` (x0, y0, w, h) pixels with
    (x0, y0) the top-left corner, or ``(N, 6)`` (x0, y0, f0, w, h, l) for tubes, f0 and l in frames.
    ``stage`` is the model's own number (1-based), ``name`` its label ("iteration 2", "focusing 1", ...).
    """

    stage: int
    name: str
    points: np.ndarray
    rois: np.ndarray | None = None


@dataclass(frozen=True)
class ATSStage:
    """What one ATS stage kept for one sample: ``kept`` (K',) ascending indices into the candidate tokens
    of :attr:`SampleGeometry.token_xy` (patch cells, or PS-ViT's sampled tokens); ``stage`` = block index."""

    stage: int
    kept: np.ndarray

    @property
    def count(self) -> int:
        """K', the number of tokens kept."""
        return int(self.kept.shape[0])


@dataclass(frozen=True)
class SampleGeometry:
    """A model's sampling geometry for ONE input, in image pixels (package docstring).

    ``family``: ``"ats"`` (tokens are patch cells), ``"psvit"`` or ``"sparseformer"``; ``num_frames`` is
    None for images. ``token_xy`` ``(M, 2)``: pixel centre of each token ATS chooses from (patch-cell
    centres, or PS-ViT's final sampling points); ``patch_grid`` (rows, cols) and ``patch_size`` (h, w)
    when those tokens are patch cells.
    """

    model: str
    family: str
    image_size: tuple[int, int]
    num_frames: int | None = None
    sampling: tuple[SamplingStage, ...] = ()
    ats: tuple[ATSStage, ...] = ()
    token_xy: np.ndarray | None = None
    patch_grid: tuple[int, int] | None = None
    patch_size: tuple[int, int] | None = None

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None


def ats_kept_grid(geometry: SampleGeometry, stage: ATSStage) -> np.ndarray:
    """``(rows, cols)`` bool over the patch grid, True where ``stage`` kept the cell."""
    if geometry.patch_grid is None:
        raise ValueError(f"{geometry.model}: ATS tokens are not patch cells (family {geometry.family!r})")
    rows, cols = geometry.patch_grid
    mask = np.zeros(rows * cols, dtype=bool)
    mask[stage.kept] = True
    return mask.reshape(rows, cols)


# ----------------------------------------------------------------------------------------------- the model

def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def model_media_spec(model: nn.Module) -> MediaSpec:
    """What ``model`` takes, from its ``pretrained_cfg``: the input shape it was built for
    (:func:`models.registry.built_input_size`) and its mean/std (ImageNet's where absent)."""
    from models.registry import built_input_size

    net = unwrap(model)
    return MediaSpec.from_pretrained_cfg(getattr(net, "pretrained_cfg", None), built_input_size(net))


def _record_forward(net: nn.Module, inputs: Tensor) -> list[Record]:
    """The trace records of one forward of ``net`` on ``inputs`` (eval mode, no grad; mode restored)."""
    param = next(net.parameters(), None)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad(), record() as trace:
            net(inputs if param is None else inputs.to(param.device))
    finally:
        net.train(was_training)
    return list(trace)


def probe_trace(model: nn.Module) -> list[Record]:
    """The records of one forward on a zero input of the size the model was built for (batch 1)."""
    from models.registry import built_input_size

    net = unwrap(model)
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return _record_forward(net, torch.zeros((1, *built_input_size(net)), dtype=dtype))


def _family(records: Sequence[Record], name: str) -> str:
    """``"sparseformer"`` (points with RoIs), ``"psvit"`` (points without) or ``"ats"`` (kept tokens only)."""
    points = [r for r in records if isinstance(r, SampledPoints)]
    if points:
        return "psvit" if points[0].rois is None else "sparseformer"
    if any(isinstance(r, KeptTokens) for r in records):
        return "ats"
    raise ValueError(f"{name} has no sampling geometry to draw (it emits no trace record); {NO_GEOMETRY_HINT}")


def geometry_family(model: nn.Module, trace: Sequence[Record] | None = None) -> str:
    """``"sparseformer"``, ``"psvit"`` or ``"ats"``, read from the model's trace records: those of
    ``trace`` when given, else of :func:`probe_trace`.

    Raises ``ValueError`` naming the model class when it emits no record (convolutional baselines, plain
    timm ViTs, a TimeSformer or XViT built without ATS stages).
    """
    net = unwrap(model)
    return _family(probe_trace(net) if trace is None else trace, type(net).__name__)


def has_sampling_geometry(model: nn.Module) -> bool:
    """True when :func:`extract_geometry` can read ``model`` (see :func:`geometry_family`)."""
    try:
        geometry_family(model)
    except ValueError:
        return False
    return True


# ----------------------------------------------------------------------------------------------- records -> pixels

def _np(x: Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy().astype(np.float64)


def _ats_stages(kept: Sequence[KeptTokens], b: int) -> tuple[ATSStage, ...]:
    return tuple(ATSStage(int(k.stage), k.positions[b][k.valid[b]].cpu().numpy().astype(np.int64)) for k in kept)


def _check_batch(name: str, records: Sequence[Record], want: int) -> None:
    for rec in records:
        if rec.batch_size != want:
            raise ValueError(f"{name}'s trace ({type(rec).__name__}, stage {rec.stage}) holds {rec.batch_size} "
                             f"samples but the inputs have {want}: the trace is from another forward; record one "
                             "on these inputs (or pass trace=None)")


def _patch_geometry(name: str, kept: Sequence[KeptTokens], height: int, width: int) -> dict[str, Any]:
    """Candidate cell centres (pixels), grid and cell size of ATS records over a patch grid."""
    grids = {k.grid for k in kept}
    if len(grids) != 1 or None in grids:
        raise ValueError(f"{name}: ATS stages disagree on their candidate tokens ({sorted(map(str, grids))})")
    rows, cols = grids.pop()
    top = max(int(k.positions[k.valid].max()) if k.valid.any() else 0 for k in kept)
    if top >= rows * cols:
        raise ValueError(f"{name}: ATS kept patch {top}, beyond the {rows}x{cols} grid of a {height}x{width} input")
    ph, pw = height // rows, width // cols
    r, c = np.divmod(np.arange(rows * cols), cols)
    token_xy = np.stack([(c + 0.5) * pw, (r + 0.5) * ph], axis=1).astype(np.float64)  # (S, 2) cell centres
    return dict(token_xy=token_xy, patch_grid=(rows, cols), patch_size=(ph, pw))


def _psvit_geometry(common: dict[str, Any], points: Sequence[SampledPoints], kept: Sequence[KeptTokens],
                    batch: int) -> list[SampleGeometry]:
    """PS-ViT: each iteration's points, and (PS-ViT + ATS) the final points as ATS's candidate tokens."""
    height, width = common["image_size"]
    size = np.array([width, height], dtype=np.float64)  # normalised (x, y) -> pixels
    out = []
    for b in range(batch):
        stages = tuple(SamplingStage(int(r.stage), str(r.name), _np(r.points[b]) * size)  # (n*n, 1, 2)
                       for r in points)
        token_xy = _np(kept[0].candidates_xy[b]) * size if kept else None  # (n*n, 2): the tokens ATS picks
        out.append(SampleGeometry(**common, sampling=stages, ats=_ats_stages(kept, b), token_xy=token_xy))
    return out


def _sparseformer_geometry(common: dict[str, Any], points: Sequence[SampledPoints], batch: int,
                           shape: tuple[int, ...]) -> list[SampleGeometry]:
    """(Video)SparseFormer: per stage, RoIs as (top-left corner, size) and sampling points, in pixels
    (and frames)."""
    height, width = common["image_size"]
    frames = common["num_frames"]
    axes = points[0].num_axes
    if (axes == 3) != (frames is not None):
        raise ValueError(f"{common['model']} samples {axes}-D points but the inputs have shape {shape}")
    scale = np.array([width, height] if axes == 2 else [width, height, frames], dtype=np.float64)  # (A,)
    out = []
    for b in range(batch):
        stages = []
        for rec in points:
            rois = _np(rec.rois[b])  # (N, 2A) centre, size (normalised)
            centre, size = rois[:, :axes] * scale, rois[:, axes:] * scale  # pixels (and frames)
            corner = centre - size / 2  # (N, A) top-left (and first frame)
            stages.append(SamplingStage(int(rec.stage), str(rec.name), _np(rec.points[b]) * scale,
                                        np.concatenate([corner, size], axis=1)))
        out.append(SampleGeometry(**common, sampling=tuple(stages)))
    return out


def extract_geometry(model: nn.Module, inputs: Tensor, *, trace: Sequence[Record] | None = None
                     ) -> list[SampleGeometry]:
    """The sampling geometry of ``model`` on ``inputs``, one :class:`SampleGeometry` per sample, in pixels.

    ``inputs``: the model's input batch, ``(B, C, H, W)`` or ``(B, C, T, H, W)`` (normalised as the model
    expects; only its shape is read when ``trace`` is given). Without ``trace`` the model runs once on it in
    eval mode under ``no_grad`` (its train/eval mode is restored) and its records are read; with ``trace``
    (the records of a :func:`models.trace.record` block) those are read instead, and must be of ``inputs``.

    Raises ``ValueError`` naming the model class when it emits no record, and when the records do not
    match ``inputs``.
    """
    net = unwrap(model)
    name = type(net).__name__
    if inputs.ndim not in (4, 5):
        raise ValueError(f"inputs must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(inputs.shape)}")
    records = _record_forward(net, inputs) if trace is None else list(trace)
    family = _family(records, name)
    batch = inputs.shape[0]
    _check_batch(name, records, batch)
    height, width = (int(s) for s in inputs.shape[-2:])
    frames = int(inputs.shape[2]) if inputs.ndim == 5 else None
    common = dict(model=name, family=family, image_size=(height, width), num_frames=frames)
    kept = [r for r in records if isinstance(r, KeptTokens)]
    points = [r for r in records if isinstance(r, SampledPoints)]
    if family == "ats":
        patches = _patch_geometry(name, kept, height, width)
        return [SampleGeometry(**common, ats=_ats_stages(kept, b), **patches) for b in range(batch)]
    if family == "psvit":
        return _psvit_geometry(common, points, kept, batch)
    return _sparseformer_geometry(common, points, batch, tuple(inputs.shape))


# ----------------------------------------------------------------------------------------------- batches

def batch_tensor(samples: Tensor | Mapping[str, Any]) -> Tensor:
    """A model input batch from a tensor or a loader batch dict (``video`` or ``image`` key)."""
    if isinstance(samples, Tensor):
        return samples
    for key in ("video", "image"):
        if key in samples:
            return samples[key]
    raise ValueError(f"samples must be a tensor or a batch dict with 'video' or 'image', got keys {list(samples)}")


def collect_kept_counts(model: nn.Module, batches: Iterable[Tensor | Mapping[str, Any]],
                        max_samples: int | None = None) -> dict[int, np.ndarray]:
    """K' per ATS stage over many inputs (ATS Fig. 6): ``{stage: (num_samples,) int counts}``.

    ``batches``: model input tensors or loader batch dicts; stops after ``max_samples`` samples.
    """
    counts: dict[int, list[int]] = {}
    seen = 0
    for batch in batches:
        x = batch_tensor(batch)
        if max_samples is not None:
            x = x[: max(max_samples - seen, 0)]
        if x.shape[0] == 0:
            break
        for geom in extract_geometry(model, x):
            if not geom.ats:
                raise ValueError(f"{geom.model} has no ATS stage: there are no kept-token counts to collect")
            for st in geom.ats:
                counts.setdefault(st.stage, []).append(st.count)
        seen += x.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    return {s: np.asarray(c, dtype=np.int64) for s, c in sorted(counts.items())}


def display_images(inputs: Tensor, model: nn.Module | None = None, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> list[np.ndarray]:
    """Undo the input normalisation (:func:`datasets.media_inputs.to_display`): ``uint8`` ``(H, W, 3)``
    per image or ``(T, H, W, 3)`` per clip.

    ``mean`` / ``std`` default to the model's ``pretrained_cfg`` (what the data pipeline normalised with),
    else ImageNet's.
    """
    cfg = (getattr(unwrap(model), "pretrained_cfg", None) or {}) if model is not None else {}
    default = MediaSpec.from_pretrained_cfg(cfg, input_size=(3, 1, 1))  # only its mean/std are read
    mean = tuple(mean if mean is not None else default.mean)
    std = tuple(std if std is not None else default.std)
    return [img.numpy() for img in to_display(inputs, mean, std)]
