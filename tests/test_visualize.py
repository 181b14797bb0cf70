"""pipeline/visualize/: figures drawn from the models' real sampling geometry.

Every check goes back to the model's own trace records (``models.trace``) converted to pixels here,
independently of the module, or to hand-computed positions (initial grids), and reads the positions off the
matplotlib artists (found by their ``gid``). Inputs are non-square (H != W) so that a swapped x / y shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

import models
from models.trace import record
from pipeline.evaluation import ViewAggregator, summarize
from pipeline.visualize import (
    collect_kept_counts,
    display_images,
    extract_geometry,
    geometry_figures,
    has_sampling_geometry,
    log_figures,
    metric_history,
    plot_ats_masks,
    plot_kept_count_histogram,
    plot_per_class_accuracy,
    plot_psvit_points,
    plot_sampling_density,
    plot_sparseformer_stages,
    plot_training_curves,
    plot_video_geometry,
    run_figures,
    sampling_density,
    save_figure,
)

torch.set_num_threads(1)

H, W = 64, 48  # image inputs: taller than wide


# ------------------------------------------------------------------------------------------ helpers

def by_gid(ax, gid: str) -> list:
    return [a for a in ax.get_children() if a.get_gid() == gid]


def axes_with(fig, gid: str) -> list:
    return [ax for ax in fig.axes if by_gid(ax, gid)]


def perturb(model: torch.nn.Module, std: float) -> torch.nn.Module:
    """Random values in every zero-initialised weight matrix, so sampling points and RoIs move."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std / p.shape[-1] ** 0.5)
    return model


def peaky(model: torch.nn.Module, factor: float = 6.0) -> torch.nn.Module:
    """Sharpen attention (scale the q and k rows of every qkv) so ATS keeps different K' per input."""
    with torch.no_grad():
        for m in model.modules():
            qkv = getattr(m, "qkv", None)
            if isinstance(qkv, torch.nn.Linear):
                qkv.weight[: 2 * qkv.in_features].mul_(factor)
    return model


def small_sparseformer():
    torch.manual_seed(0)
    return models.create_model("sparseformer_tiny", img_size=64, num_latent_tokens=9, dims=(32, 64), depths=(3, 2),
                               num_points=9, num_heads=4, num_classes=7).eval()


def small_psvit(name: str = "psvit_ti_14", **kw):
    torch.manual_seed(0)
    args = dict(img_size=(H, W), embed_dim=32, depth=2, num_heads=2, num_points=4, num_iters=3, stem_widths=(32, 32),
                num_classes=7)
    return models.create_model(name, **{**args, **kw}).eval()


def small_deit_ats():
    torch.manual_seed(0)
    model = models.create_model("deit_small_ats", img_size=(H, W), patch_size=16, embed_dim=64, num_heads=4, depth=6,
                                ats_stages=(1, 2, 4), num_classes=7).eval()
    return peaky(model)


def small_vsf():
    torch.manual_seed(0)
    return models.create_model("video_sparseformer_tiny", img_size=32, num_frames=4, inflation=2, num_latent_tokens=4,
                               dims=(32, 64), depths=(2, 1), num_points=4, num_heads=4, num_classes=7).eval()


def inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def records(model: torch.nn.Module, x: torch.Tensor):
    """The trace records of one forward (models.trace), independently of pipeline.visualize."""
    with torch.no_grad(), record() as trace:
        model(x)
    return trace


def psvit_points(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """PS-ViT's points p_1 .. p_N of one forward, (N_iter, B, n*n, 2) normalised (x, y)."""
    return torch.stack([r.points[:, :, 0] for r in records(model, x).sampled_points()])


def image_of(geometry) -> np.ndarray:
    h, w = geometry.image_size
    shape = (geometry.num_frames, h, w, 3) if geometry.is_video else (h, w, 3)
    return np.full(shape, 128, np.uint8)


def rois_to_pixels(rois: torch.Tensor, w: int, h: int) -> np.ndarray:
    """(N, 4) normalised (cx, cy, w, h) -> (N, 4) pixels (x0, y0, w, h)."""
    cx, cy, rw, rh = rois.double().unbind(-1)
    return torch.stack([(cx - rw / 2) * w, (cy - rh / 2) * h, rw * w, rh * h], dim=-1).numpy()


# ------------------------------------------------------------------------------------------ SparseFormer

def test_sparseformer_geometry_is_the_trace_in_pixels():
    model = perturb(small_sparseformer(), 1.0)
    x = inputs(2, 3, H, W)
    geoms = extract_geometry(model, x)
    trace = records(model, x).sampled_points()
    assert len(geoms) == 2 and [g.family for g in geoms] == ["sparseformer"] * 2
    assert [s.stage for s in geoms[0].sampling] == [r.stage for r in trace] == [1, 2, 3, 4]
    assert [s.name for s in geoms[0].sampling] == ["focusing 1", "focusing 2", "focusing 3", "cortex 1"]
    for b, geom in enumerate(geoms):
        assert geom.image_size == (H, W) and geom.num_frames is None
        for stage, rec in zip(geom.sampling, trace):
            pts = rec.points[b].double().numpy()  # (N, P, 2) normalised
            assert stage.points.shape == (9, 9, 2)
            np.testing.assert_allclose(stage.points[..., 0], pts[..., 0] * W, rtol=1e-6)
            np.testing.assert_allclose(stage.points[..., 1], pts[..., 1] * H, rtol=1e-6)
            np.testing.assert_allclose(stage.rois, rois_to_pixels(rec.rois[b], W, H), rtol=1e-6, atol=1e-9)
    # the perturbed model moves its RoIs between stages, and differently per image
    assert not np.allclose(geoms[0].sampling[0].rois, geoms[0].sampling[-1].rois)
    assert not np.allclose(geoms[0].sampling[-1].rois, geoms[1].sampling[-1].rois)


def test_sparseformer_first_stage_is_the_initial_grid_in_pixels():
    """Fresh model (zero-initialised RoI deltas and offset weights): stage 1 samples the appendix-A.3 grid.

    9 tokens, RoIs of half the image centred at 0.25 / 0.5 / 0.75: corners x0 in {0, 12, 24} (W = 48),
    y0 in {0, 16, 32} (H = 64), size 24 x 32. Each token's 3 x 3 offsets {-1/3, 0, 1/3} standardised
    (unbiased std sqrt(1/12)) and divided by 3 land at +-d of the RoI size, d = (1/3) / (3 sqrt(1/12)).
    """
    geom = extract_geometry(small_sparseformer(), inputs(1, 3, H, W))[0]
    rois = geom.sampling[0].rois
    np.testing.assert_allclose(rois[:, 0], [0, 12, 24] * 3, atol=1e-4)
    np.testing.assert_allclose(rois[:, 1], [0] * 3 + [16] * 3 + [32] * 3, atol=1e-4)
    np.testing.assert_allclose(rois[:, 2:], [[24, 32]] * 9, atol=1e-4)
    d = (1 / 3) / (3 * math.sqrt(1 / 12))
    pts = geom.sampling[0].points[0]  # token 0, centre (12, 16)
    np.testing.assert_allclose(np.sort(pts[:, 0]), np.repeat([12 - d * 24, 12, 12 + d * 24], 3), atol=2e-3)
    np.testing.assert_allclose(np.sort(pts[:, 1]), np.repeat([16 - d * 32, 16, 16 + d * 32], 3), atol=2e-3)


def test_sparseformer_figure_draws_the_trace():
    model = perturb(small_sparseformer(), 1.0)
    x = inputs(1, 3, H, W)
    geom = extract_geometry(model, x)[0]
    trace = records(model, x).sampled_points()
    fig = plot_sparseformer_stages(image_of(geom), geom)
    panels = axes_with(fig, "roi")
    assert len(panels) == len(trace) == 4
    token_colors = None
    for ax, rec in zip(panels, trace):
        rects = by_gid(ax, "roi")
        got = np.array([[r.get_x(), r.get_y(), r.get_width(), r.get_height()] for r in rects])
        np.testing.assert_allclose(got, rois_to_pixels(rec.rois[0], W, H), rtol=1e-6, atol=1e-9)
        (points,) = by_gid(ax, "points")
        want = rec.points[0].double().numpy().reshape(-1, 2) * [W, H]  # token-major, as the trace
        np.testing.assert_allclose(points.get_offsets(), want, rtol=1e-6)
        colors = [tuple(r.get_edgecolor()) for r in rects]
        assert len(set(colors)) == 9  # a colour per token ...
        assert token_colors in (None, colors)  # ... the same in every stage
        token_colors = colors
        (img,) = ax.get_images()
        assert tuple(img.get_extent()) == (0, W, H, 0)


def test_sampling_density_top_hat_by_hand():
    # one point at the centre of pixel (10, 10), radius 2: the 13 cells whose centres are within 2 px
    dens = sampling_density(np.array([[10.5, 10.5]]), (21, 21), radius=2.0, grid=(21, 21))
    value = 1 / (math.pi * 4)
    assert np.count_nonzero(dens) == 13
    rows, cols = np.nonzero(dens)
    assert set(zip(rows.tolist(), cols.tolist())) == {(10 + dy, 10 + dx) for dy in range(-2, 3) for dx in range(-2, 3)
                                                     if dx * dx + dy * dy <= 4}
    np.testing.assert_allclose(dens[dens > 0], value)
    # a coarser grid looks at cell centres ((j + 0.5) * W / cols, (i + 0.5) * H / rows): x = 5, 15, 25, 35 and
    # y = 5, 15 here; the nearest centre (5, 5) is 5.7 px from (1, 1) and 7.8 px from (10.5, 10.5)
    dens = sampling_density(np.array([[10.5, 10.5], [1.0, 1.0]]), (20, 40), radius=3.0, grid=(2, 4))
    assert not dens.any()
    # three points, 1.5 px: two fall on centre (5, 5), one on (35, 15); each point weighs 1 / 3
    dens = sampling_density(np.array([[5.0, 5.0], [5.0, 6.0], [35.0, 15.0]]), (20, 40), radius=1.5, grid=(2, 4))
    np.testing.assert_allclose(dens, np.array([[2, 0, 0, 0], [0, 0, 0, 1]]) / (3 * math.pi * 2.25))


def test_density_figure_is_the_density_of_each_stage():
    model = perturb(small_sparseformer(), 1.0)
    x = inputs(1, 3, H, W)
    geom = extract_geometry(model, x)[0]
    fig = plot_sampling_density(image_of(geom), geom, radius=4.0)
    panels = axes_with(fig, "density")
    assert len(panels) == 4
    for ax, rec in zip(panels, records(model, x).sampled_points()):
        (im,) = by_gid(ax, "density")
        pts = rec.points[0].double().numpy().reshape(-1, 2) * [W, H]
        np.testing.assert_allclose(np.asarray(im.get_array()), sampling_density(pts, (H, W), 4.0), rtol=1e-9)
        assert tuple(im.get_extent()) == (0, W, H, 0)


# ------------------------------------------------------------------------------------------ PS-ViT

def test_psvit_arrows_run_from_initial_to_final_points():
    model = perturb(small_psvit(), 0.5)
    x = inputs(2, 3, H, W)
    geoms = extract_geometry(model, x)
    trace = psvit_points(model, x).double()  # (N_iter, B, n*n, 2)
    assert [s.name for s in geoms[0].sampling] == ["iteration 1", "iteration 2", "iteration 3"]
    # p_1 is the regular grid of cell centres (eq. 2), in pixels: x in {6, 18, 30, 42}, y in {8, 24, 40, 56}
    start = geoms[0].sampling[0].points[:, 0]
    np.testing.assert_allclose(start, [[x0, y0] for y0 in (8, 24, 40, 56) for x0 in (6, 18, 30, 42)], atol=1e-4)
    for b, geom in enumerate(geoms):
        for t, stage in enumerate(geom.sampling):
            np.testing.assert_allclose(stage.points[:, 0], trace[t, b].numpy() * [W, H], rtol=1e-6)
        fig = plot_psvit_points(image_of(geom), geom)
        (ax,) = axes_with(fig, "psvit-arrows")
        (quiver,) = by_gid(ax, "psvit-arrows")
        p1, pn = trace[0, b].numpy() * [W, H], trace[-1, b].numpy() * [W, H]
        np.testing.assert_allclose(quiver.get_offsets(), p1, rtol=1e-6)
        np.testing.assert_allclose(np.stack([quiver.U, quiver.V], 1), pn - p1, rtol=1e-6, atol=1e-9)
        (end,) = by_gid(ax, "psvit-end")
        np.testing.assert_allclose(end.get_offsets(), pn, rtol=1e-6)
        assert np.abs(pn - p1).max() > 1.0  # the perturbed offsets really move the points


def test_psvit_ats_marks_the_kept_sampled_tokens():
    model = peaky(perturb(small_psvit("psvit_b_14_ats", depth=4, num_points=6, ats_ratio=0.5), 0.5))
    x = inputs(2, 3, H, W)
    geoms = extract_geometry(model, x)
    final = psvit_points(model, x)[-1].double()  # (B, 36, 2): ATS positions index these tokens
    traces = records(model, x).kept_tokens()
    assert [s.stage for s in geoms[0].ats] == [t.stage for t in traces] == [1, 2, 3]
    for b, geom in enumerate(geoms):
        np.testing.assert_allclose(geom.token_xy, final[b].numpy() * [W, H], rtol=1e-6)
        fig = plot_ats_masks(image_of(geom), geom)
        panels = axes_with(fig, "ats-kept")
        assert len(panels) == 3
        for ax, tr in zip(panels, traces):
            kept = tr.positions[b][tr.valid[b]].numpy()
            (dots,) = by_gid(ax, "ats-kept")
            np.testing.assert_allclose(dots.get_offsets(), final[b, kept].numpy() * [W, H], rtol=1e-6)
            (crosses,) = by_gid(ax, "ats-dropped")
            assert len(crosses.get_offsets()) == 36 - len(kept)


# ------------------------------------------------------------------------------------------ ATS on DeiT

def test_ats_masks_grey_exactly_the_dropped_patches():
    model = small_deit_ats()
    x = inputs(3, 3, H, W)
    geoms = extract_geometry(model, x)
    traces = records(model, x).kept_tokens()
    rows, cols = H // 16, W // 16  # 4 x 3 patch grid
    for b, geom in enumerate(geoms):
        assert geom.patch_grid == (rows, cols) and geom.patch_size == (16, 16)
        p = np.arange(rows * cols)
        np.testing.assert_allclose(geom.token_xy, np.stack([(p % cols + 0.5) * 16, (p // cols + 0.5) * 16], 1))
        fig = plot_ats_masks(image_of(geom), geom)
        panels = axes_with(fig, "ats-mask")
        assert len(panels) == len(traces) == 3
        for ax, stage, tr in zip(panels, geom.ats, traces):
            kept = tr.positions[b][tr.valid[b]].numpy()
            np.testing.assert_array_equal(stage.kept, kept)
            (overlay,) = by_gid(ax, "ats-mask")
            alpha = np.asarray(overlay.get_array())[..., 3]  # (rows, cols): 0 = kept, grey elsewhere
            assert alpha.shape == (rows, cols)
            assert set(np.flatnonzero(alpha.ravel() == 0)) == set(kept.tolist())
            assert (alpha.ravel()[np.setdiff1d(p, kept)] > 0.5).all()
            assert tuple(overlay.get_extent()) == (0, cols * 16, rows * 16, 0)
            assert f"K'={len(kept)}/12" in ax.get_title()
            assert 0 < len(kept) < 12
    counts = np.array([[len(g.ats[j].kept) for j in range(3)] for g in geoms])
    assert (np.diff(counts, axis=1) <= 0).all()  # each stage keeps a subset of the previous one's


def test_kept_count_histogram_over_batches_matches_the_traces():
    model = small_deit_ats()
    x = inputs(6, 3, H, W, seed=3)
    counts = collect_kept_counts(model, [x[:4], {"image": x[4:]}])
    want: dict[int, list[int]] = {}
    for batch in (x[:4], x[4:]):
        for tr in records(model, batch).kept_tokens():
            want.setdefault(tr.stage, []).extend(tr.valid.sum(1).tolist())
    assert list(counts) == [1, 2, 4]
    for stage, values in want.items():
        np.testing.assert_array_equal(counts[stage], values)
    assert len(set(counts[4].tolist())) > 1, "peaky attention should give different K' per image"
    fig = plot_kept_count_histogram(counts, num_tokens=12)
    for ax, values in zip(fig.axes, counts.values()):
        bars = ax.patches
        heights = np.array([b.get_height() for b in bars])
        assert heights.sum() == 6
        centres = np.array([b.get_x() + b.get_width() / 2 for b in bars])
        np.testing.assert_allclose(centres, np.arange(values.min(), values.max() + 1))
        np.testing.assert_array_equal(heights, np.bincount(values - values.min()))
    assert collect_kept_counts(model, [x], max_samples=5)[1].shape == (5,)


def test_kept_count_histogram_by_hand():
    fig = plot_kept_count_histogram({3: [5, 5, 7], 5: [2, 2, 2]})
    first, second = fig.axes[:2]
    assert [b.get_height() for b in first.patches] == [2, 0, 1]
    assert [b.get_x() + b.get_width() / 2 for b in first.patches] == [5, 6, 7]
    assert [b.get_height() for b in second.patches] == [3]
    assert "block 3" in first.get_title() and "block 5" in second.get_title()


# ------------------------------------------------------------------------------------------ video

def test_video_sparseformer_tubes_and_points_per_frame():
    T, h, w = 4, 32, 48
    fresh = extract_geometry(small_vsf(), inputs(1, 3, T, h, w))[0]
    # fresh tubes (models.video_sparseformer.tube_rois): copy k of the 4 tokens covers frames [2k, 2k + 2)
    rois = fresh.sampling[0].rois  # (8, 6) x0, y0, f0, w, h, l
    np.testing.assert_allclose(rois[:, 2], [0] * 4 + [2] * 4, atol=1e-5)
    np.testing.assert_allclose(rois[:, 5], [2] * 8, atol=1e-5)
    fig = plot_video_geometry(image_of(fresh), fresh)
    grid = np.array(fig.axes).reshape(len(fresh.sampling), T)
    first = [{(round(r.get_x(), 3), round(r.get_y(), 3)) for r in by_gid(ax, "roi")} for ax in grid[0]]
    tokens = [{(round(x0, 3), round(y0, 3)) for x0, y0 in rois[sel, :2]} for sel in (slice(0, 4), slice(4, 8))]
    assert first == [tokens[0], tokens[0], tokens[1], tokens[1]]

    model = perturb(small_vsf(), 1.0)
    x = inputs(2, 3, T, h, w)
    geoms = extract_geometry(model, x)
    trace = records(model, x).sampled_points()
    scale = np.array([w, h, T])
    for b, geom in enumerate(geoms):
        assert geom.num_frames == T and geom.is_video
        fig = plot_video_geometry(image_of(geom), geom)
        grid = np.array(fig.axes).reshape(len(trace), T)
        for r, rec in enumerate(trace):
            centre, size = rec.rois[b, :, :3].double().numpy() * scale, rec.rois[b, :, 3:].double().numpy() * scale
            lo, hi = centre[:, 2] - size[:, 2] / 2, centre[:, 2] + size[:, 2] / 2  # frames covered by each tube
            pts = rec.points[b].double().numpy() * scale  # (N, P, 3)
            np.testing.assert_allclose(geom.sampling[r].points, pts, rtol=1e-6)
            for k in range(T):
                ax = grid[r, k]
                rects = by_gid(ax, "roi")
                overlap = np.nonzero((lo < k + 1) & (hi > k))[0]
                got = np.array([[q.get_x(), q.get_y(), q.get_width(), q.get_height()] for q in rects]).reshape(-1, 4)
                want = np.concatenate([centre[overlap, :2] - size[overlap, :2] / 2, size[overlap, :2]], 1)
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
                in_frame = np.floor(pts[..., 2]) == k
                (dots,) = by_gid(ax, "points")
                np.testing.assert_allclose(dots.get_offsets(), pts[in_frame][:, :2], rtol=1e-6)


@pytest.mark.parametrize("name", ["timesformer_base_ats", "xvit_8_ats"])
def test_video_ats_same_kept_positions_in_every_frame(name):
    T = 3
    torch.manual_seed(0)
    model = peaky(models.create_model(name, img_size=64, num_frames=T, embed_dim=64, num_heads=4, depth=6,
                                      ats_ratio=0.5, num_classes=5).eval())
    x = inputs(2, 3, T, 64, 64)
    geoms = extract_geometry(model, x)
    traces = records(model, x).kept_tokens()
    assert len(traces) >= 1
    for b, geom in enumerate(geoms):
        assert geom.patch_grid == (4, 4) and geom.num_frames == T
        for stage, tr in zip(geom.ats, traces):
            np.testing.assert_array_equal(stage.kept, tr.positions[b][tr.valid[b]].numpy())
        fig = plot_video_geometry(image_of(geom), geom)
        grid = np.array(fig.axes).reshape(len(traces), T)
        for r, tr in enumerate(traces):
            kept = set(tr.positions[b][tr.valid[b]].tolist())
            for k in range(T):
                (overlay,) = by_gid(grid[r, k], "ats-mask")
                alpha = np.asarray(overlay.get_array())[..., 3].ravel()
                assert set(np.flatnonzero(alpha == 0).tolist()) == kept


# ------------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize("name, kwargs, shape, cls", [
    ("conv3d_tiny", {}, (1, 3, 8, 32, 32), "Conv3DNet"),
    ("frame_tcn_tiny", {}, (1, 3, 8, 32, 32), "FrameTCN"),
    ("vit_tiny_patch16_224", {"img_size": 32}, (1, 3, 32, 32), "VisionTransformer"),
    ("timesformer_base", {"img_size": 32, "num_frames": 2, "depth": 2, "embed_dim": 32, "num_heads": 2},
     (1, 3, 2, 32, 32), "TimeSformer"),
])
def test_models_without_geometry_are_refused(name, kwargs, shape, cls, tmp_path):
    model = models.create_model(name, **kwargs).eval()
    assert not has_sampling_geometry(model)
    with pytest.raises(ValueError, match=rf"^{cls} has no sampling geometry") as err:
        extract_geometry(model, torch.zeros(shape))
    assert "sparseformer" in str(err.value)  # says which models have geometry
    with pytest.raises(ValueError, match=cls):
        geometry_figures(model, torch.zeros(shape), tmp_path)
    # at the end of a run such a model simply gets no geometry figures
    summary = {"per_class": {"a": 1.0}, "top1": 1.0, "num_videos": 1}
    assert [p.name for p in run_figures(None, None, summary, model, torch.zeros(shape), tmp_path)] == \
        ["per_class_accuracy.png"]


def test_stale_trace_is_refused():
    model = small_sparseformer()
    trace = records(model, inputs(2, 3, H, W))  # the records of a forward on 2 inputs, read without a new one
    with pytest.raises(ValueError, match="another forward"):
        extract_geometry(model, inputs(3, 3, H, W), trace=trace)
    assert len(extract_geometry(model, inputs(2, 3, H, W), trace=trace)) == 2


# ------------------------------------------------------------------------------------------ files

def test_pngs_have_the_figure_size(tmp_path):
    fig = plot_kept_count_histogram({3: [5, 6]})
    path = save_figure(fig, tmp_path / "sub" / "hist.png", dpi=80)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == tuple(int(round(v * 80)) for v in fig.get_size_inches())


def test_geometry_figures_files(tmp_path):
    model = perturb(small_psvit("psvit_b_14_ats", depth=3, ats_ratio=0.5), 0.5)
    x = inputs(3, 3, H, W)
    paths = geometry_figures(model, {"image": x}, tmp_path, max_samples=2, prefix="ps_", dpi=50)
    assert sorted(p.name for p in paths) == sorted(["ps_sample00_points.png", "ps_sample00_ats.png",
                                                    "ps_sample01_points.png", "ps_sample01_ats.png",
                                                    "ps_ats_kept_counts.png"])
    for p in paths:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG" and min(im.size) > 50


def test_display_images_undo_the_normalisation():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    (back,) = display_images(x[None], mean=mean, std=std)
    assert back.dtype == np.uint8 and back.shape == (H, W, 3)
    assert np.abs(back.astype(int) - img).max() <= 1
    clip = x[:, None].expand(3, 2, H, W)  # (C, T, H, W)
    (frames,) = display_images(clip[None], mean=mean, std=std)
    assert frames.shape == (2, H, W, 3) and np.abs(frames[1].astype(int) - img).max() <= 1


# ------------------------------------------------------------------------------------------ run figures

def test_training_curves_plot_the_history():
    history = {"train/loss": [(10, 2.0), (0, 2.5), (20, 1.5)], "val/loss": [(20, 1.8)],
               "train/top1": [(0, 0.1), (20, 0.4)], "train/lr": [(0, 1e-4), (10, 1e-3), (20, 5e-4)],
               "eval/top1": []}
    fig = plot_training_curves(history)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "top1", "lr"]
    lines = {ln.get_label(): ln for ax in fig.axes for ln in ax.get_lines()}
    assert set(lines) == {"train/loss", "val/loss", "train/top1", "train/lr"}
    assert list(lines["train/loss"].get_xdata()) == [0, 10, 20]
    assert list(lines["train/loss"].get_ydata()) == [2.5, 2.0, 1.5]
    assert lines["val/loss"].axes is lines["train/loss"].axes
    assert list(lines["train/lr"].get_ydata()) == [1e-4, 1e-3, 5e-4]
    assert plot_training_curves({}).axes[0].texts[0].get_text() == "no metrics logged"


def test_per_class_accuracy_from_the_evaluation_summary():
    agg = ViewAggregator(num_views=1)
    # 4 videos: class 0 right and wrong, class 1 right, class 2 wrong -> per class 0.5, 1.0, 0.0
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 3.0, 0], [3.0, 0, 0]])
    agg.add(logits, torch.tensor([0, 0, 1, 2]), ["v0", "v1", "v2", "v3"])
    summary = summarize(agg, ["ant", "bee", "cat"])
    fig = plot_per_class_accuracy(summary)
    (ax,) = fig.axes
    bars = by_gid(ax, "per-class")
    assert [b.get_height() for b in bars] == [0.5, 1.0, 0.0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["ant", "bee", "cat"]
    assert "top-1 0.500" in ax.get_title()
    with pytest.raises(ValueError, match="per_class"):
        plot_per_class_accuracy({"top1": 0.0})


def test_run_figures_and_logging_with_mlflow(tmp_path):
    """A real MLflow store (SQLite): the curves come from the run's metric history, the PNGs land in the
    run's artifacts under figures/, through a Glimpse Tracker and through a plain MlflowClient."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "viz-test", "run-a", artifact_root=str(tmp_path / "artifacts"))
    for step, (loss, lr) in enumerate([(2.0, 1e-3), (1.5, 8e-4), (1.2, 5e-4)]):
        tracker.log_metrics({"train/loss": loss, "train/lr": lr}, step=10 * step)
    tracker.log_metrics({"val/top1": 0.25}, step=20)
    model = perturb(small_sparseformer(), 1.0)
    summary = {"num_videos": 2, "top1": 0.5, "top5": 1.0, "mean_class_accuracy": 0.5, "per_class": {"a": 1.0, "b": 0.0}}
    out = tmp_path / "figs"
    paths = run_figures(tracker, None, summary, model=model, samples=inputs(2, 3, H, W), out_dir=out, max_samples=1)
    rel = sorted(p.relative_to(out).as_posix() for p in paths)
    assert rel == ["geometry/sample00_density.png", "geometry/sample00_rois.png", "per_class_accuracy.png",
                   "training_curves.png"]
    run_id = tracker.run_id
    client = MlflowClient(uri)
    history = metric_history(client, run_id)
    assert history == {"train/loss": [(0, 2.0), (10, 1.5), (20, 1.2)], "val/top1": [(20, 0.25)],
                       "train/lr": [(0, 1e-3), (10, 8e-4), (20, 5e-4)]}
    assert metric_history(uri, run_id, metrics=None).keys() == {"train/loss", "train/lr", "val/top1"}

    assert log_figures(tracker, None, paths, root=out)
    names = {a.path for a in client.list_artifacts(run_id, "figures")}
    assert names == {"figures/geometry", "figures/per_class_accuracy.png", "figures/training_curves.png"}
    assert {a.path for a in client.list_artifacts(run_id, "figures/geometry")} == \
        {"figures/geometry/sample00_density.png", "figures/geometry/sample00_rois.png"}
    other = client.create_run(client.get_experiment_by_name("viz-test").experiment_id).info.run_id
    assert log_figures(client, other, paths[:1])
    assert [a.path for a in client.list_artifacts(other, "figures")] == ["figures/training_curves.png"]


def test_run_figures_without_a_tracking_server(tmp_path, caplog):
    """End of a run with MLflow down: no curves (a warning), the other figures are still written."""
    import socket

    from pipeline.tracking import Tracker

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tracker = Tracker(f"http://127.0.0.1:{port}", "viz-test", "run-down")
    tracker.log_metrics({"train/loss": 1.0}, step=1)
    summary = {"num_videos": 1, "top1": 1.0, "per_class": {"a": 1.0}}
    with caplog.at_level("WARNING", logger="pipeline.visualize"):
        paths = run_figures(tracker, None, summary, out_dir=tmp_path)
    assert [p.name for p in paths] == ["per_class_accuracy.png"]
    assert "no training curves" in caplog.text
    assert run_figures(None, None, None, out_dir=tmp_path) == []


def test_the_figures_read_only_the_trace_protocol():
    """pipeline/visualize/ imports no model family (the records of models.trace say what a model is) and
    leaves pixel transforms to datasets/: only these modules of models/ and datasets/ are imported."""
    import ast
    from pathlib import Path

    allowed = {"models", "models.trace", "models.registry", "models.ats", "datasets.media_inputs"}
    folder = Path(__file__).resolve().parents[1] / "pipeline" / "visualize"
    seen = set()
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            seen |= {(path.name, n) for n in names if n.split(".")[0] in ("models", "datasets")}
    assert {n for _, n in seen} <= allowed, sorted(seen)
    assert ("geometry.py", "models.trace") in seen  # the check reads real imports
