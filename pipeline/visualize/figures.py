"""The papers' geometry figures, drawn from :class:`~pipeline.visualize.geometry.SampleGeometry`:
ATS masks (ATS Figs. 2, 7, A.5), PS-ViT arrows (PS-ViT Fig. 5), SparseFormer RoIs and points
(SparseFormer Fig. 4) and sampling density (SparseFormer Fig. 3), clips as stages x frames; and
:func:`geometry_figures`, which writes all that apply to a model."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from matplotlib.figure import Figure
from torch import Tensor

from pipeline.visualize.curves import plot_kept_count_histogram
from pipeline.visualize.drawing import (
    PANEL_IN,
    check_image,
    draw_ats,
    draw_rois_points,
    figure,
    frame_indices,
    image_grid,
    save_figure,
    show,
)
from pipeline.visualize.geometry import (
    SampleGeometry,
    SamplingStage,
    batch_tensor,
    display_images,
    extract_geometry,
)

__all__ = ["geometry_figures", "plot_ats_masks", "plot_psvit_points", "plot_sampling_density",
           "plot_sparseformer_stages", "plot_video_geometry", "sampling_density"]


def plot_ats_masks(image: np.ndarray, geometry: SampleGeometry) -> Figure:
    """ATS Figs. 2 / A.5 for one image: the input, then one panel per ATS stage with the tokens that stage
    did not keep greyed out (patch models; PS-ViT + ATS marks kept / dropped sampled tokens instead)."""
    if not geometry.ats:
        raise ValueError(f"{geometry.model} has no ATS stage to draw")
    if geometry.is_video:
        return plot_video_geometry(image, geometry)
    image = check_image(image, geometry)
    fig, axes = image_grid(1 + len(geometry.ats), geometry.image_size)
    show(axes[0], image, geometry.image_size)
    axes[0].set_title("input", fontsize=8)
    for ax, stage in zip(axes[1:], geometry.ats):
        show(ax, image, geometry.image_size)
        draw_ats(ax, geometry, stage)
    fig.suptitle(f"{geometry.model}: tokens kept per ATS stage", fontsize=9)
    return fig


def plot_psvit_points(image: np.ndarray, geometry: SampleGeometry) -> Figure:
    """PS-ViT Fig. 5: arrows from each token's initial sampling point (iteration 1) to its final one."""
    if geometry.family != "psvit" or geometry.is_video:
        raise ValueError(f"{geometry.model}: PS-ViT points need a PS-ViT image geometry, got {geometry.family!r}")
    image = check_image(image, geometry)
    start = geometry.sampling[0].points[:, 0, :]  # (n*n, 2)
    end = geometry.sampling[-1].points[:, 0, :]  # (n*n, 2)
    fig, (ax,) = image_grid(1, geometry.image_size)
    fig.set_size_inches(fig.get_size_inches() * 1.6)
    show(ax, image, geometry.image_size)
    d = end - start  # (n*n, 2)
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
    image = check_image(image, geometry)
    fig, axes = image_grid(len(geometry.sampling), geometry.image_size)
    for ax, stage in zip(axes, geometry.sampling):
        show(ax, image, geometry.image_size)
        draw_rois_points(ax, stage.rois, stage.points, np.arange(stage.rois.shape[0]), points)
        ax.set_title(f"stage {stage.stage} ({stage.name})", fontsize=8)
    fig.suptitle(f"{geometry.model}: token RoIs and sampling points", fontsize=9)
    return fig


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
    image = check_image(image, geometry)
    shown = image[0] if geometry.is_video else image
    h, w = geometry.image_size
    fig, axes = image_grid(len(geometry.sampling), geometry.image_size)
    for ax, stage in zip(axes, geometry.sampling):
        show(ax, shown, geometry.image_size, alpha=0.45)
        dens = sampling_density(stage.points, geometry.image_size, radius)  # (rows, cols)
        im = ax.imshow(dens, extent=(0, w, h, 0), cmap="inferno", alpha=0.75, interpolation="bilinear")
        im.set_gid("density")
        ax.set_title(f"stage {stage.stage} ({stage.name})", fontsize=8)
    fig.suptitle(f"{geometry.model}: sampling density", fontsize=9)
    return fig


def _draw_frame_stage(ax, geometry: SampleGeometry, stage, k: int) -> str:
    """One (stage, frame ``k``) panel of :func:`plot_video_geometry`; returns its label."""
    if isinstance(stage, SamplingStage):
        f0, length = stage.rois[:, 2], stage.rois[:, 5]  # (N,) first frame, length in frames
        tokens = np.nonzero((f0 < k + 1) & (f0 + length > k))[0]  # tubes overlapping frame k
        in_frame = np.floor(stage.points[..., 2]) == k  # (N, P)
        draw_rois_points(ax, stage.rois, stage.points, tokens, True, in_frame)
        return f"stage {stage.stage}"
    draw_ats(ax, geometry, stage)
    return f"block {stage.stage} K'={stage.count}"


def plot_video_geometry(frames: np.ndarray, geometry: SampleGeometry, max_frames: int = 8) -> Figure:
    """A clip's geometry as a stages x frames grid (at most ``max_frames`` evenly spaced frames).

    VideoSparseFormer: per stage, the tubes overlapping each frame (``f0 < k + 1`` and ``f0 + l > k``) and
    the points falling in it (``floor(frame) == k``). TimeSformer / XViT + ATS: per ATS stage, the same
    kept positions greyed out in every frame (positions are sampled once per clip).
    """
    if not geometry.is_video:
        raise ValueError(f"{geometry.model}: geometry is of an image, not a clip")
    frames = check_image(frames, geometry)
    shown = frame_indices(geometry.num_frames, max_frames)
    rows = geometry.sampling if geometry.family == "sparseformer" else geometry.ats
    if not rows:
        raise ValueError(f"{geometry.model} has no stage to draw")
    h, w = geometry.image_size
    fig, axes = figure(len(rows), len(shown), PANEL_IN * 0.8, PANEL_IN * 0.8 * h / w + 0.25)
    for r, stage in enumerate(rows):
        for c, k in enumerate(shown):
            ax = axes[r, c]
            show(ax, frames[k], geometry.image_size)
            label = _draw_frame_stage(ax, geometry, stage, k)
            ax.set_title(f"{label}, frame {k}", fontsize=7)
    what = "tubes and points" if geometry.family == "sparseformer" else "positions kept per ATS stage"
    fig.suptitle(f"{geometry.model}: {what}", fontsize=9)
    return fig


def _sample_figures(geom: SampleGeometry, img: np.ndarray, max_frames: int) -> list[tuple[str, Figure]]:
    """(file suffix, figure) of one sample's geometry (see :func:`geometry_figures`)."""
    if geom.is_video:
        out = [("frames", plot_video_geometry(img, geom, max_frames))]
        return out + ([("density", plot_sampling_density(img, geom))] if geom.sampling else [])
    out = []
    if geom.family == "psvit":
        out.append(("points", plot_psvit_points(img, geom)))
    if geom.family == "sparseformer":
        out += [("rois", plot_sparseformer_stages(img, geom)), ("density", plot_sampling_density(img, geom))]
    if geom.ats:
        out.append(("ats", plot_ats_masks(img, geom)))
    return out


def geometry_figures(model: nn.Module, samples: Tensor | Mapping[str, Any], out_dir: str | Path, *,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None, max_samples: int = 4,
                     prefix: str = "", dpi: int = 100, max_frames: int = 8,
                     kept_counts: Mapping[int, Sequence[int]] | None = None) -> list[Path]:
    """All geometry figures of ``model`` on the first ``max_samples`` of ``samples`` (a model input batch or
    a loader batch dict), written to ``out_dir``; returns the PNG paths.

    Per sample ``i``: ``{prefix}sample{i:02d}_ats.png`` (ATS masks), ``_points.png`` (PS-ViT arrows),
    ``_rois.png`` and ``_density.png`` (SparseFormer), ``_frames.png`` (clips: stages x frames); over the
    batch (or over ``kept_counts``, e.g. :func:`~pipeline.visualize.geometry.collect_kept_counts` of a whole
    dataset): ``{prefix}ats_kept_counts.png``. Raises ``ValueError`` (naming the class) for a model without
    sampling geometry.
    """
    x = batch_tensor(samples)[:max_samples]
    geoms = extract_geometry(model, x)
    images = display_images(x, model, mean, std)
    out = Path(out_dir)
    paths: list[Path] = []
    for i, (geom, img) in enumerate(zip(geoms, images)):
        for suffix, fig in _sample_figures(geom, img, max_frames):
            paths.append(save_figure(fig, out / f"{prefix}sample{i:02d}_{suffix}.png", dpi))
    if geoms and geoms[0].ats:
        counts = kept_counts or {st.stage: np.array([g.ats[j].count for g in geoms])
                                 for j, st in enumerate(geoms[0].ats)}
        unit = "clips" if geoms[0].is_video else "images"
        fig = plot_kept_count_histogram(counts, geoms[0].token_xy.shape[0], unit)
        paths.append(save_figure(fig, out / f"{prefix}ats_kept_counts.png", dpi))
    return paths
