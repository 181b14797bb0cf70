"""Drawing helpers shared by the figures: Agg figures without pyplot, image panels in pixel coordinates
(``extent=(0, W, H, 0)``, package docstring), ATS overlays, RoIs and points, PNG files."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from pipeline.visualize.geometry import ATSStage, SampleGeometry, ats_kept_grid

__all__ = ["PANEL_IN", "check_image", "draw_ats", "draw_rois_points", "figure", "frame_indices", "image_grid",
           "safe_label", "save_figure", "show"]

GREY = (0.55, 0.55, 0.55, 0.85)  # dropped ATS cells
PANEL_IN = 2.6  # inches per image panel


def figure(nrows: int, ncols: int, panel_w: float, panel_h: float) -> tuple[Figure, np.ndarray]:
    """A constrained-layout Agg figure (no pyplot, no global state) and its ``(nrows, ncols)`` axes."""
    fig = Figure(figsize=(max(panel_w * ncols, 3.0), max(panel_h * nrows, 2.2)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(nrows, ncols)
    return fig, axes


def image_grid(n_panels: int, image_size: tuple[int, int], max_cols: int = 6) -> tuple[Figure, list]:
    """``n_panels`` image panels of the image's aspect, at most ``max_cols`` a row (spare axes hidden)."""
    ncols = max(1, min(max_cols, n_panels))
    nrows = math.ceil(n_panels / ncols)
    h, w = image_size
    fig, axes = figure(nrows, ncols, PANEL_IN, PANEL_IN * h / w + 0.3)
    flat = list(axes.ravel())
    for ax in flat[n_panels:]:
        ax.set_axis_off()
    return fig, flat[:n_panels]


def show(ax, image: np.ndarray, image_size: tuple[int, int], alpha: float = 1.0) -> None:
    """``image`` in pixel coordinates: pixel (i, j) covers ``[j, j + 1] x [i, i + 1]``."""
    h, w = image_size
    ax.imshow(image, extent=(0, w, h, 0), interpolation="nearest", alpha=alpha)
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def token_colors(n: int) -> np.ndarray:
    cmap = colormaps["tab20"]
    return np.array([cmap(i % 20) for i in range(n)])  # (n, 4) RGBA


def check_image(image: np.ndarray, geometry: SampleGeometry) -> np.ndarray:
    """``image`` as an array, refused unless it is ``(H, W, 3)`` (or ``(T, H, W, 3)``) of the geometry."""
    image = np.asarray(image)
    want = geometry.image_size
    if geometry.is_video:
        if image.ndim != 4 or tuple(image.shape[1:3]) != want or image.shape[0] != geometry.num_frames:
            raise ValueError(f"frames must be (T={geometry.num_frames}, {want[0]}, {want[1]}, 3), "
                             f"got {image.shape}")
    elif image.ndim != 3 or tuple(image.shape[:2]) != want:
        raise ValueError(f"image must be ({want[0]}, {want[1]}, 3), got {image.shape}")
    return image


def draw_ats(ax, geometry: SampleGeometry, stage: ATSStage) -> None:
    """Kept tokens of one ATS stage: patch cells not kept greyed out, or (PS-ViT) kept / dropped points."""
    if geometry.patch_grid is not None:
        rows, cols = geometry.patch_grid
        ph, pw = geometry.patch_size
        rgba = np.zeros((rows, cols, 4))
        rgba[~ats_kept_grid(geometry, stage)] = GREY  # kept cells stay fully transparent
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


def draw_rois_points(ax, rois: np.ndarray, pts: np.ndarray, tokens: np.ndarray, points: bool = True,
                     point_mask: np.ndarray | None = None) -> None:
    """RoIs ``(N, 4+)`` (x0, y0, ..., w, h, ...) of ``tokens`` and their points ``(N, P, 2+)``; a token
    keeps its colour (``tab20`` by token index) in every panel."""
    n = rois.shape[0]
    colors = token_colors(n)
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


def frame_indices(num_frames: int, max_frames: int) -> list[int]:
    """At most ``max_frames`` evenly spaced frames of ``num_frames``, first and last included."""
    if num_frames <= max_frames:
        return list(range(num_frames))
    return sorted({int(round(v)) for v in np.linspace(0, num_frames - 1, max_frames)})


def save_figure(fig: Figure, path: str | Path, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG of exactly ``figsize * dpi`` pixels (parent folders made); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def safe_label(text: str) -> str:
    """A file-name-safe label (``models:/vsf@candidate`` -> ``models_vsf_candidate``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"
