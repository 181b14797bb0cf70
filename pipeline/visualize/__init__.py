"""Figures: where token-efficient models look (the papers' visualisations) and how a run went.

* ``geometry``: the one reader of the models' trace records (:mod:`models.trace`; no model class is
  imported, a model is known by the records it emits): :func:`extract_geometry` turns them into
  :class:`SampleGeometry` in image pixels; :func:`collect_kept_counts` gathers K' over many inputs;
* ``figures``: ATS masks with the dropped patch cells greyed out (ATS Figs. 2, 7, A.5; video models sample
  positions once per clip, so every frame shows the same mask), PS-ViT arrows from the initial to the
  final sampling points (PS-ViT Fig. 5), SparseFormer RoIs and points per stage (SparseFormer Fig. 4) and
  their top-hat density (SparseFormer Fig. 3), VideoSparseFormer tubes and points per stage and frame;
  :func:`geometry_figures` writes all that apply;
* ``curves``: the K' histogram per ATS stage (ATS Fig. 6), training curves by step, per-class accuracy
  (the summary of :func:`pipeline.evaluation.summarize`);
* ``mlflow_io``: :func:`metric_history`, :func:`run_figures` (every figure that applies to a run) and
  :func:`log_figures` (the PNGs under the run's ``figures/``);
* ``drawing``: shared panel helpers, :func:`save_figure`; ``cli``: ``jobs/visualize.py``.

Coordinates. Everything drawn is in image pixels with the origin at the top-left corner of the top-left
pixel: pixel ``(row i, column j)`` covers ``[j, j + 1] x [i, i + 1]``, and an image is shown with
``extent=(0, W, H, 0)``. The models' normalised coordinates ([0, 1] of the map, ``models.point_sampling``)
therefore become pixels by a plain ``x * W``, ``y * H``; a clip's normalised time ``t`` becomes frames by
``t * T`` (frame ``k`` covers ``[k, k + 1)``). Patch cell ``p`` of an ATS model is row ``p // cols``,
column ``p % cols`` of the patch grid.

Pure functions: tensors and arrays in, :class:`matplotlib.figure.Figure` out (Agg canvas, no pyplot, no
global state), or PNG files written. No Ray here; MLflow is imported only by the functions that talk to it.
Pixel transforms (normalising inputs, undoing it for display) belong to :mod:`datasets.media_inputs`.
"""

from pipeline.visualize.curves import (
    DEFAULT_CURVE_METRICS,
    plot_kept_count_histogram,
    plot_per_class_accuracy,
    plot_training_curves,
)
from pipeline.visualize.drawing import safe_label, save_figure
from pipeline.visualize.figures import (
    geometry_figures,
    plot_ats_masks,
    plot_psvit_points,
    plot_sampling_density,
    plot_sparseformer_stages,
    plot_video_geometry,
    sampling_density,
)
from pipeline.visualize.geometry import (
    ATSStage,
    SampleGeometry,
    SamplingStage,
    ats_kept_grid,
    collect_kept_counts,
    display_images,
    extract_geometry,
    geometry_family,
    has_sampling_geometry,
    model_media_spec,
    probe_trace,
)
from pipeline.visualize.mlflow_io import log_figures, metric_history, run_figures

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
    "model_media_spec",
    "plot_ats_masks",
    "plot_kept_count_histogram",
    "plot_per_class_accuracy",
    "plot_psvit_points",
    "plot_sampling_density",
    "plot_sparseformer_stages",
    "plot_training_curves",
    "plot_video_geometry",
    "probe_trace",
    "run_figures",
    "safe_label",
    "sampling_density",
    "save_figure",
]
