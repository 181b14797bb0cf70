"""Figures: where token-efficient models look (the papers' visualisations) and how a run went.

Geometry (one place reads the models' trace records, :mod:`models.trace`: :func:`extract_geometry`;
no model class is imported here, a model is known by the records it emits):

* ATS (DeiT/ViT + ATS, PS-ViT + ATS, TimeSformer / XViT + ATS): the tokens each ATS stage kept, as masks
  over the image with the dropped patch cells greyed out (ATS Figs. 2, 7, A.5), and histograms of the
  kept-token count K' per stage over many inputs (ATS Fig. 6). Video models sample positions once per
  clip, so every frame shows the same mask;
* PS-ViT: arrows from the initial to the final sampling points (PS-ViT Fig. 5);
* SparseFormer: token RoIs (rectangles) and their sampling points per stage, and the sampling density
  (top-hat kernel density of the points, SparseFormer Figs. 3-4);
* VideoSparseFormer: tubes and points per stage and frame (a tube shows in every frame it overlaps, a point
  in the frame it falls in).

Run figures: training curves (loss, top-1, learning rate by step, e.g. from MLflow's metric history) and
the evaluation's per-class accuracy (the summary of :func:`pipeline.evaluation.summarize`).
:func:`run_figures` makes all that apply to a run and :func:`log_figures` attaches the PNGs to the MLflow
run under ``figures/``.

Coordinates. Everything drawn is in image pixels with the origin at the top-left corner of the top-left
pixel: pixel ``(row i, column j)`` covers ``[j, j + 1] x [i, i + 1]``, and an image is shown with
``extent=(0, W, H, 0)``. The models' normalised coordinates ([0, 1] of the map, ``models.point_sampling``)
therefore become pixels by a plain ``x * W``, ``y * H``; a clip's normalised time ``t`` becomes frames by
``t * T`` (frame ``k`` covers ``[k, k + 1)``). Patch cell ``p`` of an ATS model is row ``p // cols``,
column ``p % cols`` of the patch grid.

Pure functions: tensors and arrays in, :class:`matplotlib.figure.Figure` out (Agg canvas, no pyplot, no
global state), or PNG files written. No Ray here; MLflow is imported only by the functions that talk to it.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from models.trace import KeptTokens, Record, SampledPoints, record

logger = logging.getLogger(__name__)

__all__ = [
    "ATSStage",
    "DEFAULT_CURVE_METRICS",
    "SampleGeometry",
    "SamplingStage",
    "ats_kept_grid",
    "collect_kept_counts",
    "display_images",
    "extract_geometry",
    "geometry_family",
    "geometry_figures",
    "has_sampling_geometry",
    "log_figures",
    "metric_history",
    "plot_ats_masks",
    "plot_kept_count_histogram",
    "plot_per_class_accuracy",
    "plot_psvit_points",
    "plot_sampling_density",
    "plot_sparseformer_stages",
    "plot_training_curves",
    "plot_video_geometry",
    "run_figures",
    "safe_label",
    "sampling_density",
    "save_figure",
]

# Metrics drawn by default (the training loop's names); keys a run did not log are skipped.
DEFAULT_CURVE_METRICS = ("train/loss", "val/loss", "train/top1", "val/top1", "eval/top1", "train/lr")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GREY = (0.55, 0.55, 0.55, 0.85)  # dropped ATS cells
_PANEL_IN = 2.6  # inches per image panel
_NO_GEOMETRY_HINT = ("figures need ATS stages (deit_*_ats, psvit_*_ats, timesformer_*_ats, xvit_*_ats), "
                     "PS-ViT sampling points (psvit_*) or SparseFormer RoIs (sparseformer_*, video_sparseformer_*)")


# ==========================================================================================================
# Geometry records
# ==========================================================================================================

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
    """A model's sampling geometry for ONE input, in image pixels (module docstring).

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


# ==========================================================================================================
# Reading the models (the only code that reads their trace records, models.trace)
# ==========================================================================================================

def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


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


def _probe(net: nn.Module) -> list[Record]:
    """The records of one forward on a zero input of the size the model was built for (batch 1)."""
    from models.registry import built_input_size

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
    raise ValueError(f"{name} has no sampling geometry to draw (it emits no trace record); {_NO_GEOMETRY_HINT}")


def geometry_family(model: nn.Module, trace: Sequence[Record] | None = None) -> str:
    """``"sparseformer"``, ``"psvit"`` or ``"ats"``, read from the model's trace records: those of
    ``trace`` when given, else of one forward on a zero input of the model's ``pretrained_cfg`` size.

    Raises ``ValueError`` naming the model class when it emits no record (convolutional baselines, plain
    timm ViTs, a TimeSformer or XViT built without ATS stages).
    """
    net = _unwrap(model)
    return _family(_probe(net) if trace is None else trace, type(net).__name__)


def has_sampling_geometry(model: nn.Module) -> bool:
    """True when :func:`extract_geometry` can read ``model`` (see :func:`geometry_family`)."""
    try:
        geometry_family(model)
    except ValueError:
        return False
    return True


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
    net = _unwrap(model)
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
        size = np.array([width, height], dtype=np.float64)  # normalised (x, y) -> pixels
        out = []
        for b in range(batch):
            stages = tuple(SamplingStage(int(r.stage), str(r.name), _np(r.points[b]) * size)  # (n*n, 1, 2)
                           for r in points)
            token_xy = _np(kept[0].candidates_xy[b]) * size if kept else None  # (n*n, 2): the tokens ATS picks
            out.append(SampleGeometry(**common, sampling=stages, ats=_ats_stages(kept, b), token_xy=token_xy))
        return out

    axes = points[0].num_axes
    if (axes == 3) != (frames is not None):
        raise ValueError(f"{name} samples {axes}-D points but the inputs have shape {tuple(inputs.shape)}")
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


def _batch_tensor(samples: Tensor | Mapping[str, Any]) -> Tensor:
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
        x = _batch_tensor(batch)
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
    """Undo the input normalisation: ``uint8`` ``(H, W, 3)`` per image or ``(T, H, W, 3)`` per clip.

    ``mean`` / ``std`` default to the model's ``pretrained_cfg`` (what the data pipeline normalised with),
    else ImageNet's.
    """
    cfg = (getattr(_unwrap(model), "pretrained_cfg", None) or {}) if model is not None else {}
    mean = tuple(mean if mean is not None else cfg.get("mean") or IMAGENET_MEAN)
    std = tuple(std if std is not None else cfg.get("std") or IMAGENET_STD)
    x = inputs.detach().float().cpu()
    shape = (1, -1) + (1,) * (x.ndim - 2)  # channels at dim 1
    x = x * torch.tensor(std).view(shape) + torch.tensor(mean).view(shape)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    x = x.permute(0, 2, 3, 4, 1) if x.ndim == 5 else x.permute(0, 2, 3, 1)  # channels last
    return [img.numpy() for img in x]


# ==========================================================================================================
# Drawing helpers
# ==========================================================================================================

def _figure(nrows: int, ncols: int, panel_w: float, panel_h: float) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(max(panel_w * ncols, 3.0), max(panel_h * nrows, 2.2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(nrows, ncols)
    return fig, axes


def _image_grid(n_panels: int, image_size: tuple[int, int], max_cols: int = 6) -> tuple[Figure, list]:
    ncols = max(1, min(max_cols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    h, w = image_size
    fig, axes = _figure(nrows, ncols, _PANEL_IN, _PANEL_IN * h / w + 0.3)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_axis_off()
    return fig, flat[:n_panels]


def _show(ax, image: np.ndarray, image_size: tuple[int, int], alpha: float = 1.0) -> None:
    h, w = image_size
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest", alpha=alpha)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _token_colors(n: int) -> np.ndarray:
    cmap = colormaps["tab20"]
    return np.array([cmap(i % 20) for i in range(n)])  # (n, 4) RGBA


def _check_image(image: np.ndarray, geometry: SampleGeometry) -> np.ndarray:
    image = np.asarray(image)
    want = geometry.image_size
    if geometry.is_video:
        if image.ndim != 4 or tuple(image.shape[1:3]) != want or image.shape[0] != geometry.num_frames:
            raise ValueError(f"frames must be (T={geometry.num_frames}, {want[0]}, {want[1]}, 3), "
                             f"got {image.shape}")
    elif image.ndim != 3 or tuple(image.shape[:2]) != want:
        raise ValueError(f"image must be ({want[0]}, {want[1]}, 3), got {image.shape}")
    return image


def _draw_ats(ax, geometry: SampleGeometry, stage: ATSStage) -> None:
    """Kept tokens of one ATS stage: patch cells not kept greyed out, or (PS-ViT) kept / dropped points."""
    if geometry.patch_grid is not None:
        rows, cols = geometry.patch_grid
        ph, pw = geometry.patch_size
        rgba = np.zeros((rows, cols, 4))
        rgba[~ats_kept_grid(geometry, stage)] = _GREY  # kept cells stay fully transparent
        overlay = ax.imshow(rgba, extent=(0, cols * pw, rows * ph, 0), interpolation="nearest")
        overlay.set_gid("ats-mask")
    else:
        xy = geometry.token_xy
        dropped = np.setdiff1d(np.arange(xy.shape[0]), stage.kept)
        ax.scatter(xy[dropped, 0], xy[dropped, 1], s=10, c="0.6", marker="x", linewidths=0.8, gid="ats-dropped")
        ax.scatter(xy[stage.kept, 0], xy[stage.kept, 1], s=14, c="red", edgecolors="white", linewidths=0.4,
                   gid="ats-kept")
    total = geometry.token_xy.shape[0]
    ax.set_title(f"block {stage.stage}: K'={stage.count}/{total}", fontsize=8)


def _frame_indices(num_frames: int, max_frames: int) -> list[int]:
    if num_frames <= max_frames:
        return list(range(num_frames))
    return sorted({int(round(v)) for v in np.linspace(0, num_frames - 1, max_frames)})


# ==========================================================================================================
# Geometry figures
# ==========================================================================================================

def plot_ats_masks(image: np.ndarray, geometry: SampleGeometry) -> Figure:
    """ATS Figs. 2 / A.5 for one image: the input, then one panel per ATS stage with the tokens that stage
    did not keep greyed out (patch models; PS-ViT + ATS marks kept / dropped sampled tokens instead)."""
    if not geometry.ats:
        raise ValueError(f"{geometry.model} has no ATS stage to draw")
    if geometry.is_video:
        return plot_video_geometry(image, geometry)
    image = _check_image(image, geometry)
    fig, axes = _image_grid(1 + len(geometry.ats), geometry.image_size)
    _show(axes[0], image, geometry.image_size)
    axes[0].set_title("input", fontsize=8)
    for ax, stage in zip(axes[1:], geometry.ats):
        _show(ax, image, geometry.image_size)
        _draw_ats(ax, geometry, stage)
    fig.suptitle(f"{geometry.model}: tokens kept per ATS stage", fontsize=9)
    return fig


def plot_psvit_points(image: np.ndarray, geometry: SampleGeometry) -> Figure:
    """PS-ViT Fig. 5: arrows from each token's initial sampling point (iteration 1) to its final one."""
    if geometry.family != "psvit" or geometry.is_video:
        raise ValueError(f"{geometry.model}: PS-ViT points need a PS-ViT image geometry, got {geometry.family!r}")
    image = _check_image(image, geometry)
    start = geometry.sampling[0].points[:, 0, :]  # (n*n, 2)
    end = geometry.sampling[-1].points[:, 0, :]  # (n*n, 2)
    fig, (ax,) = _image_grid(1, geometry.image_size)
    fig.set_size_inches(fig.get_size_inches() * 1.6)
    _show(ax, image, geometry.image_size)
    d = end - start
    ax.quiver(start[:, 0], start[:, 1], d[:, 0], d[:, 1], angles="xy", scale_units="xy", scale=1, color="yellow",
              width=0.005, gid="psvit-arrows")
    ax.scatter(start[:, 0], start[:, 1], s=6, c="white", gid="psvit-start")
    ax.scatter(end[:, 0], end[:, 1], s=8, c="red", gid="psvit-end")
    shift = float(np.linalg.norm(d, axis=1).mean())
    ax.set_title(f"{geometry.model}: iteration 1 -> {len(geometry.sampling)} (mean shift {shift:.2f} px)", fontsize=8)
    return fig


def plot_sparseformer_stages(image: np.ndarray, geometry: SampleGeometry, *, points: bool = True) -> Figure:
    """SparseFormer Fig. 4: every token's RoI (rectangle) and sampling points, one panel per stage; a token
    keeps its colour across stages."""
    if geometry.family != "sparseformer":
        raise ValueError(f"{geometry.model}: RoIs need a SparseFormer geometry, got {geometry.family!r}")
    if geometry.is_video:
        return plot_video_geometry(image, geometry)
    image = _check_image(image, geometry)
    fig, axes = _image_grid(len(geometry.sampling), geometry.image_size)
    for ax, stage in zip(axes, geometry.sampling):
        _show(ax, image, geometry.image_size)
        _draw_rois_points(ax, stage.rois, stage.points, np.arange(stage.rois.shape[0]), points)
        ax.set_title(f"stage {stage.stage} ({stage.name})", fontsize=8)
    fig.suptitle(f"{geometry.model}: token RoIs and sampling points", fontsize=9)
    return fig


def _draw_rois_points(ax, rois: np.ndarray, pts: np.ndarray, tokens: np.ndarray, points: bool = True,
                      point_mask: np.ndarray | None = None) -> None:
    """RoIs ``(N, 4+)`` (x0, y0, ..., w, h, ...) of ``tokens`` and their points ``(N, P, 2+)``."""
    n = rois.shape[0]
    colors = _token_colors(n)
    axes = pts.shape[-1]
    for i in tokens:
        x0, y0 = rois[i, 0], rois[i, 1]
        w, h = rois[i, axes], rois[i, axes + 1]
        ax.add_patch(Rectangle((x0, y0), w, h, fill=False, edgecolor=colors[i], linewidth=0.8, gid="roi"))
    if points:
        xy = pts[..., :2]  # (N, P, 2)
        keep = np.zeros(pts.shape[:2], dtype=bool)
        keep[tokens] = True
        if point_mask is not None:
            keep &= point_mask
        c = np.broadcast_to(colors[:, None, :], (*pts.shape[:2], 4))[keep]
        ax.scatter(xy[keep][:, 0], xy[keep][:, 1], s=3, c=c, linewidths=0, gid="points")


def sampling_density(points: np.ndarray, image_size: tuple[int, int], radius: float | None = None,
                     grid: tuple[int, int] | None = None) -> np.ndarray:
    """Top-hat kernel density of sampling points (SparseFormer Fig. 3), per square pixel.

    ``points`` ``(M, 2+)`` (x, y, ...) pixels. Cell ``(i, j)`` of a ``grid`` (rows, cols; default the image
    size, at most 112 per side) over the image holds ``#{points within radius of its centre} / (M pi r^2)``;
    the centre of cell (i, j) is ``((j + 0.5) W / cols, (i + 0.5) H / rows)``. The default radius is
    ``max(H, W) / 24``. Over the plane the density integrates to 1.
    """
    h, w = image_size
    radius = max(h, w) / 24 if radius is None else float(radius)
    if radius <= 0:
        raise ValueError(f"density radius must be > 0, got {radius}")
    rows, cols = grid if grid is not None else (min(h, 112), min(w, 112))
    xy = np.asarray(points, dtype=np.float64).reshape(-1, np.asarray(points).shape[-1])[:, :2]  # (M, 2)
    out = np.zeros((rows, cols))
    if xy.shape[0] == 0:
        return out
    xc = (np.arange(cols) + 0.5) * w / cols  # (cols,)
    yc = (np.arange(rows) + 0.5) * h / rows  # (rows,)
    dx2 = (xc[None, :] - xy[:, :1]) ** 2  # (M, cols)
    for i in range(rows):  # row by row: M x cols distances at a time
        d2 = dx2 + (yc[i] - xy[:, 1:2]) ** 2  # (M, cols)
        out[i] = (d2 <= radius * radius).sum(axis=0)
    return out / (xy.shape[0] * math.pi * radius * radius)


def plot_sampling_density(image: np.ndarray, geometry: SampleGeometry, radius: float | None = None) -> Figure:
    """SparseFormer Fig. 3: the density of each stage's sampling points over the (dimmed) image. For a clip
    the points of all frames are pooled (the density is spatial); the first frame is shown."""
    if not geometry.sampling:
        raise ValueError(f"{geometry.model} has no sampling points to draw")
    image = _check_image(image, geometry)
    shown = image[0] if geometry.is_video else image
    h, w = geometry.image_size
    fig, axes = _image_grid(len(geometry.sampling), geometry.image_size)
    for ax, stage in zip(axes, geometry.sampling):
        _show(ax, shown, geometry.image_size, alpha=0.45)
        dens = sampling_density(stage.points, geometry.image_size, radius)
        im = ax.imshow(dens, extent=(0, w, h, 0), cmap="inferno", alpha=0.75, interpolation="bilinear")
        im.set_gid("density")
        ax.set_title(f"stage {stage.stage} ({stage.name})", fontsize=8)
    fig.suptitle(f"{geometry.model}: sampling density", fontsize=9)
    return fig


def plot_video_geometry(frames: np.ndarray, geometry: SampleGeometry, max_frames: int = 8) -> Figure:
    """A clip's geometry as a stages x frames grid (at most ``max_frames`` evenly spaced frames).

    VideoSparseFormer: per stage, the tubes overlapping each frame (``f0 < k + 1`` and ``f0 + l > k``) and
    the points falling in it (``floor(frame) == k``). TimeSformer / XViT + ATS: per ATS stage, the same
    kept positions greyed out in every frame (positions are sampled once per clip).
    """
    if not geometry.is_video:
        raise ValueError(f"{geometry.model}: geometry is of an image, not a clip")
    frames = _check_image(frames, geometry)
    shown = _frame_indices(geometry.num_frames, max_frames)
    rows = geometry.sampling if geometry.family == "sparseformer" else geometry.ats
    if not rows:
        raise ValueError(f"{geometry.model} has no stage to draw")
    h, w = geometry.image_size
    fig, axes = _figure(len(rows), len(shown), _PANEL_IN * 0.8, _PANEL_IN * 0.8 * h / w + 0.25)
    for r, stage in enumerate(rows):
        for c, k in enumerate(shown):
            ax = axes[r, c]
            _show(ax, frames[k], geometry.image_size)
            if isinstance(stage, SamplingStage):
                f0, length = stage.rois[:, 2], stage.rois[:, 5]
                tokens = np.nonzero((f0 < k + 1) & (f0 + length > k))[0]
                in_frame = np.floor(stage.points[..., 2]) == k  # (N, P)
                _draw_rois_points(ax, stage.rois, stage.points, tokens, True, in_frame)
                label = f"stage {stage.stage}"
            else:
                _draw_ats(ax, geometry, stage)
                label = f"block {stage.stage} K'={stage.count}"
            ax.set_title(f"{label}, frame {k}", fontsize=7)
    what = "tubes and points" if geometry.family == "sparseformer" else "positions kept per ATS stage"
    fig.suptitle(f"{geometry.model}: {what}", fontsize=9)
    return fig


def _count_bins(values: np.ndarray) -> np.ndarray:
    lo, hi = int(values.min()), int(values.max())
    if hi - lo <= 60:
        return np.arange(lo, hi + 2) - 0.5  # one bar per count
    return np.linspace(lo - 0.5, hi + 0.5, 41)


def plot_kept_count_histogram(counts: Mapping[int, Sequence[int]], num_tokens: int | None = None,
                              unit: str = "images") -> Figure:
    """ATS Fig. 6: per ATS stage, how many inputs kept how many tokens (``counts``: {stage: K' per input},
    e.g. from :func:`collect_kept_counts`). ``num_tokens`` fixes the x-axis to [0, num_tokens]."""
    if not counts:
        raise ValueError("no ATS stage counts to draw")
    n = len(counts)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = _figure(nrows, ncols, 3.0, 2.3)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_axis_off()
    for ax, (stage, vals) in zip(flat, counts.items()):
        vals = np.asarray(vals, dtype=np.int64)
        if vals.size == 0:
            raise ValueError(f"ATS stage {stage} has no counts")
        ax.hist(vals, bins=_count_bins(vals), color="tab:blue", edgecolor="white", linewidth=0.4)
        if num_tokens is not None:
            ax.set_xlim(0, num_tokens + 0.5)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"block {stage}: mean K'={vals.mean():.1f}", fontsize=8)
        ax.set_xlabel("sampled tokens K'", fontsize=7)
        ax.set_ylabel(unit, fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"kept tokens per ATS stage over {len(next(iter(counts.values())))} {unit}", fontsize=9)
    return fig


# ==========================================================================================================
# Run figures
# ==========================================================================================================

def _metric_group(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def plot_training_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """Curves by step, one panel per metric kind (``train/loss`` and ``val/loss`` share "loss"; "top1";
    "lr"; ...). ``history``: {metric: [(step, value), ...]}, e.g. from :func:`metric_history`."""
    groups: dict[str, list[str]] = {}
    for key, values in history.items():
        if len(values):
            groups.setdefault(_metric_group(key), []).append(key)
    fig, axes = _figure(1, max(1, len(groups)), 3.6, 2.8)
    if not groups:
        axes[0, 0].text(0.5, 0.5, "no metrics logged", ha="center", va="center")
        axes[0, 0].set_axis_off()
        return fig
    for ax, (group, keys) in zip(axes[0], groups.items()):
        for key in keys:
            pts = sorted(history[key])
            steps = [int(s) for s, _ in pts]
            values = [float(v) for _, v in pts]
            marker = "o" if len(pts) <= 20 else None
            ax.plot(steps, values, marker=marker, markersize=3, linewidth=1.2, label=key)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if group == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    return fig


def plot_per_class_accuracy(summary: Mapping[str, Any]) -> Figure:
    """Per-class top-1 of a multi-view evaluation (``summary["per_class"]``, in class order), with the
    mean class accuracy as a line and top-1 / top-5 in the title."""
    per_class = summary.get("per_class") or {}
    if not per_class:
        raise ValueError("the evaluation summary has no per_class accuracies")
    names, values = list(per_class), [float(v) for v in per_class.values()]
    n = len(names)
    fig, axes = _figure(1, 1, min(max(6.0, 0.22 * n + 1.5), 30.0), 3.6)
    ax = axes[0, 0]
    ax.bar(np.arange(n), values, color="tab:blue", gid="per-class")
    ax.set_xticks(np.arange(n))
    ax.set_xticklabels(names if n <= 150 else [""] * n, rotation=90, fontsize=max(4, min(8, 400 // n)))
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("top-1 accuracy", fontsize=8)
    mca = summary.get("mean_class_accuracy", float(np.mean(values)))
    ax.axhline(mca, color="tab:red", linewidth=1, linestyle="--", label=f"mean class accuracy {mca:.3f}")
    ax.legend(fontsize=7, loc="lower right")
    title = f"per-class accuracy over {summary.get('num_videos', '?')} samples"
    if "top1" in summary:
        title += f": top-1 {summary['top1']:.3f}, top-5 {summary.get('top5', float('nan')):.3f}"
    if summary.get("views_spec"):
        title += f" ({summary['views_spec']} views)"
    ax.set_title(title, fontsize=9)
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG of exactly ``figsize * dpi`` pixels (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def geometry_figures(model: nn.Module, samples: Tensor | Mapping[str, Any], out_dir: str | Path, *,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None, max_samples: int = 4,
                     prefix: str = "", dpi: int = 100, max_frames: int = 8,
                     kept_counts: Mapping[int, Sequence[int]] | None = None) -> list[Path]:
    """All geometry figures of ``model`` on the first ``max_samples`` of ``samples`` (a model input batch or
    a loader batch dict), written to ``out_dir``; returns the PNG paths.

    Per sample ``i``: ``{prefix}sample{i:02d}_ats.png`` (ATS masks), ``_points.png`` (PS-ViT arrows),
    ``_rois.png`` and ``_density.png`` (SparseFormer), ``_frames.png`` (clips: stages x frames); over the
    batch (or over ``kept_counts``, e.g. :func:`collect_kept_counts` of a whole dataset):
    ``{prefix}ats_kept_counts.png``. Raises ``ValueError`` (naming the class) for a model without
    sampling geometry.
    """
    x = _batch_tensor(samples)[:max_samples]
    geoms = extract_geometry(model, x)
    images = display_images(x, model, mean, std)
    out = Path(out_dir)
    paths: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        paths.append(save_figure(fig, out / f"{prefix}{name}.png", dpi))

    for i, (geom, img) in enumerate(zip(geoms, images)):
        tag = f"sample{i:02d}"
        if geom.is_video:
            save(plot_video_geometry(img, geom, max_frames), f"{tag}_frames")
            if geom.sampling:
                save(plot_sampling_density(img, geom), f"{tag}_density")
            continue
        if geom.family == "psvit":
            save(plot_psvit_points(img, geom), f"{tag}_points")
        if geom.family == "sparseformer":
            save(plot_sparseformer_stages(img, geom), f"{tag}_rois")
            save(plot_sampling_density(img, geom), f"{tag}_density")
        if geom.ats:
            save(plot_ats_masks(img, geom), f"{tag}_ats")
    if geoms and geoms[0].ats:
        counts = kept_counts or {st.stage: np.array([g.ats[j].count for g in geoms])
                                 for j, st in enumerate(geoms[0].ats)}
        save(plot_kept_count_histogram(counts, geoms[0].token_xy.shape[0], "clips" if geoms[0].is_video else "images"),
             "ats_kept_counts")
    return paths


def _mlflow_client(source: Any):
    """An ``MlflowClient`` from a client, a Glimpse ``Tracker`` (its tracking URI) or a tracking URI."""
    from mlflow.tracking import MlflowClient

    if isinstance(source, str):
        return MlflowClient(tracking_uri=source)
    if hasattr(source, "get_metric_history"):
        return source
    uri = getattr(source, "tracking_uri", None)
    if uri is None:
        raise TypeError(f"expected an MlflowClient, a pipeline.tracking.Tracker or a tracking URI, got "
                        f"{type(source).__name__}")
    return MlflowClient(tracking_uri=uri)


def _is_tracker(source: Any) -> bool:
    return hasattr(source, "log_artifact") and hasattr(source, "flush") and hasattr(source, "ensure_run")


def metric_history(source: Any, run_id: str | None = None, metrics: Sequence[str] | None = DEFAULT_CURVE_METRICS
                   ) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of an MLflow run, sorted by step (last value kept for a repeated step).

    ``source``: an ``MlflowClient``, a Glimpse ``Tracker`` (flushed first, its run by default) or a tracking
    URI. ``metrics``: keys to read (absent ones are skipped); None = every metric the run logged.
    """
    if _is_tracker(source):
        source.flush()
        run_id = run_id or source.ensure_run()
    if not run_id:
        raise ValueError("metric_history needs a run id")
    client = _mlflow_client(source)
    logged = client.get_run(run_id).data.metrics
    keys = sorted(logged) if metrics is None else [k for k in metrics if k in logged]
    out: dict[str, list[tuple[int, float]]] = {}
    for key in keys:
        by_step: dict[int, tuple[int, float]] = {}
        for m in client.get_metric_history(run_id, key):
            if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
                by_step[m.step] = (m.timestamp, float(m.value))
        out[key] = [(s, v) for s, (_, v) in sorted(by_step.items())]
    return out


def log_figures(destination: Any, run_id: str | None, paths: Sequence[str | Path], artifact_path: str = "figures",
                root: str | Path | None = None) -> bool:
    """Attach PNGs to an MLflow run under ``artifact_path``. Returns True when they were sent.

    ``destination``: a Glimpse ``Tracker`` (buffered and flushed: an unreachable server costs a warning and
    the files wait in its buffer; ``run_id`` may be None), an ``MlflowClient`` or a tracking URI (``run_id``
    required). With ``root`` (e.g. the ``out_dir`` of :func:`run_figures`) the folders below it are kept:
    ``root/geometry/a.png`` goes to ``figures/geometry/a.png``; without, every file lands in ``figures/``.
    """
    def folder(p: Path) -> str:
        if root is None:
            return artifact_path
        rel = p.resolve().parent.relative_to(Path(root).resolve()).as_posix()
        return artifact_path if rel == "." else f"{artifact_path}/{rel}"

    files = [Path(p) for p in paths]
    if _is_tracker(destination):
        for p in files:
            destination.log_artifact(str(p), folder(p))
        return bool(destination.flush())
    if not run_id:
        raise ValueError("log_figures needs a run id with an MlflowClient or tracking URI")
    client = _mlflow_client(destination)
    for p in files:
        client.log_artifact(run_id, str(p), folder(p))
    return True


def run_figures(tracker_or_client: Any, run_id: str | None, summary: Mapping[str, Any] | None,
                model: nn.Module | None = None, samples: Tensor | Mapping[str, Any] | None = None,
                out_dir: str | Path = "figures", *, metrics: Sequence[str] | None = DEFAULT_CURVE_METRICS,
                max_samples: int = 4, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                dpi: int = 100, kept_counts: Mapping[int, Sequence[int]] | None = None) -> list[Path]:
    """The figures of a finished run, written to ``out_dir``; returns the PNG paths.

    * ``training_curves.png`` from the run's metric history (``tracker_or_client``: a Glimpse ``Tracker``,
      flushed first, an ``MlflowClient`` or a tracking URI; None or a disabled Tracker skips the curves, and
      an unreachable server skips them with a warning instead of raising);
    * ``per_class_accuracy.png`` from ``summary`` (``pipeline.evaluation.summarize``'s dict; skipped when
      None or without ``per_class``);
    * the geometry figures of :func:`geometry_figures` (prefix ``geometry/``) when ``model`` and ``samples``
      are given AND the model has sampling geometry; other models are skipped silently (logged at INFO).
      ``kept_counts`` (:func:`collect_kept_counts` over more inputs) feeds the ATS K' histogram.

    Attach them to the run with ``log_figures(tracker_or_client, run_id, paths, root=out_dir)``.
    """
    out = Path(out_dir)
    paths: list[Path] = []
    if tracker_or_client is not None and getattr(tracker_or_client, "enabled", True):
        try:
            history = metric_history(tracker_or_client, run_id, metrics)
        except Exception as exc:  # tracking server down: the other figures are still made (as Tracker does)
            logger.warning("no training curves: cannot read the metric history (%s: %s)", type(exc).__name__, exc)
        else:
            paths.append(save_figure(plot_training_curves(history), out / "training_curves.png", dpi))
    if summary is not None and summary.get("per_class"):
        paths.append(save_figure(plot_per_class_accuracy(summary), out / "per_class_accuracy.png", dpi))
    if model is not None and samples is not None:
        if has_sampling_geometry(model):
            paths += geometry_figures(model, samples, out / "geometry", mean=mean, std=std, max_samples=max_samples,
                                      dpi=dpi, kept_counts=kept_counts)
        else:
            logger.info("no geometry figures: %s has no sampling geometry", type(_unwrap(model)).__name__)
    return paths


def safe_label(text: str) -> str:
    """A file-name-safe label (``models:/vsf@candidate`` -> ``models_vsf_candidate``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"
