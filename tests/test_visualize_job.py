"""jobs/visualize.py as users run it: subprocesses, exit codes, one-line errors, PNGs on disk."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "visualize.py"

# A small SparseFormer / VideoSparseFormer, as --model-kwargs and as a config dict.
SF_KWARGS = dict(img_size=64, num_latent_tokens=9, dims=(32, 64), depths=(2, 1), num_points=9, num_heads=4,
                 num_classes=5)
VSF_KWARGS = dict(img_size=32, num_frames=4, inflation=2, num_latent_tokens=4, dims=(32, 64), depths=(2, 1),
                  num_points=4, num_heads=4, num_classes=5)


def as_args(kwargs: dict) -> list[str]:
    return ["--model-kwargs", *[f"{k}={v!r}".replace(" ", "") for k, v in kwargs.items()]]


def run(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or REPO)


def printed_pngs(res: subprocess.CompletedProcess) -> list[Path]:
    paths = [Path(line) for line in res.stdout.splitlines() if line.endswith(".png")]
    for p in paths:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
    return paths


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, res.stderr)


def run_in_process(capsys, *args: str) -> subprocess.CompletedProcess:
    """The job's main function in this process (the same code as the script, without interpreter start-up)."""
    from pipeline.visualize.cli import run_visualize_job

    code = run_visualize_job(list(args), "test")
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_help():
    res = run("--help")
    assert res.returncode == 0 and "usage: visualize.py" in res.stdout
    for flag in ("--preset", "--model", "--model-name", "--tracking-uri", "--out", "--run-id", "smoke"):
        assert flag in res.stdout


def test_smoke_preset(tmp_path: Path):
    start = time.monotonic()
    res = run("--preset", "smoke", "--out", str(tmp_path), timeout=120)
    elapsed = time.monotonic() - start
    assert res.returncode == 0, res.stderr
    assert elapsed < 120
    paths = printed_pngs(res)
    rel = {p.relative_to(tmp_path).as_posix() for p in paths}
    for want in ("sparseformer_tiny/sample00_rois.png", "sparseformer_tiny/sample00_density.png",
                 "psvit_ti_14/sample00_points.png", "deit_small_ats/sample00_ats.png",
                 "deit_small_ats/ats_kept_counts.png", "video_sparseformer_tiny/sample00_frames.png",
                 "timesformer_base_ats/sample01_frames.png", "timesformer_base_ats/ats_kept_counts.png"):
        assert want in rel, sorted(rel)
    assert sorted(rel) == sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))


def test_model_without_geometry_exits_nonzero(tmp_path: Path):
    res = run("--model-name", "conv3d_tiny", "--out", str(tmp_path))
    assert_clean_error(res, "Conv3DNet has no sampling geometry")
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("name, extra, cls", [
    ("frame_tcn_tiny", [], "FrameTCN"),
    ("vit_tiny_patch16_224", ["--model-kwargs", "img_size=32"], "VisionTransformer"),
    ("timesformer_base", ["--model-kwargs", "depth=2", "embed_dim=32", "num_heads=2", "img_size=32"], "TimeSformer"),
])
def test_other_models_without_geometry(tmp_path: Path, capsys, name, extra, cls):
    assert_clean_error(run_in_process(capsys, "--model-name", name, *extra, "--out", str(tmp_path)),
                       f"{cls} has no sampling geometry")
    assert not list(tmp_path.rglob("*.png"))


def test_image_and_video_files(tmp_path: Path, capsys):
    from datasets.encode import encode_video

    rng = np.random.default_rng(0)
    jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(jpg, quality=90)
    Image.fromarray(rng.integers(0, 256, (80, 60, 3), dtype=np.uint8)).save(png)
    res = run("--model-name", "sparseformer_tiny", *as_args(SF_KWARGS), "--out", str(tmp_path / "img"),
              str(jpg), str(png))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in printed_pngs(res))
    assert names == ["sample00_density.png", "sample00_rois.png", "sample01_density.png", "sample01_rois.png"]

    clip = tmp_path / "c.mp4"
    clip.write_bytes(encode_video(rng.integers(0, 256, (12, 40, 56, 3), dtype=np.uint8), 8))
    res = run("--model-name", "video_sparseformer_tiny", *as_args(VSF_KWARGS), "--out", str(tmp_path / "vid"),
              str(clip))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in printed_pngs(res)) == ["sample00_density.png", "sample00_frames.png"]

    res = run_in_process(capsys, "--model-name", "video_sparseformer_tiny", *as_args(VSF_KWARGS), "--out",
                         str(tmp_path), str(jpg))
    assert_clean_error(res, "a.jpg", "video files")
    res = run_in_process(capsys, "--model-name", "sparseformer_tiny", *as_args(SF_KWARGS), "--out", str(tmp_path),
                         str(tmp_path / "missing.png"))
    assert_clean_error(res, "missing.png", "no such file")


def _small_sparseformer_files(tmp_path: Path) -> tuple[torch.nn.Module, Path, Path]:
    """A trained-looking SparseFormer (geometry layers non-zero) saved as a final_model folder and a weights file."""
    import models
    from pipeline.config import ExperimentConfig, ModelConfig
    from pipeline.tracking.model_store import write_model_files

    torch.manual_seed(0)
    model = models.create_model("sparseformer_tiny", **SF_KWARGS).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0, 0.1)
    cfg = ExperimentConfig(model=ModelConfig(name="sparseformer_tiny",
                                             kwargs={k: v for k, v in SF_KWARGS.items() if k != "num_classes"}))
    folder = tmp_path / "final_model"
    write_model_files(folder, model, cfg, list("abcde"))
    weights = tmp_path / "weights.pth"
    torch.save(model.state_dict(), weights)
    return model, folder, weights


def test_local_model_folder_and_weights_file(tmp_path: Path, capsys):
    """The figures of a saved model are those of the model itself: the PNGs the job writes from the folder
    and from the weights file are byte-identical to ones drawn in-process from the original model."""
    from datasets.media_inputs import synthetic_media
    from pipeline.visualize import geometry_figures, model_media_spec

    model, folder, weights = _small_sparseformer_files(tmp_path)
    spec = model_media_spec(model)
    assert spec.shape == (3, 64, 64)
    mean, std = spec.mean, spec.std
    x = synthetic_media(2, spec, seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the job runs with --threads 1: same float reductions, same points, same pixels
    try:
        ref = {p.name: p.read_bytes() for p in geometry_figures(model, x, tmp_path / "ref", mean=mean, std=std,
                                                                   max_samples=2)}
    finally:
        torch.set_num_threads(threads)
    res = run("--model", str(folder), "--synthetic", "2", "--figures", "2", "--threads", "1", "--out",
              str(tmp_path / "a"))
    assert res.returncode == 0, res.stderr
    got = {p.name: p.read_bytes() for p in printed_pngs(res)}
    assert [p.parent.name for p in printed_pngs(res)] == ["final_model"] * 4
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref)

    res = run("--model", str(weights), "--model-name", "sparseformer_tiny", *as_args(SF_KWARGS), "--synthetic", "2",
              "--figures", "2", "--threads", "1", "--out", str(tmp_path / "b"))
    assert res.returncode == 0, res.stderr
    got = {p.name: p.read_bytes() for p in printed_pngs(res)}
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref)

    assert_clean_error(run_in_process(capsys, "--model", str(weights), "--out", str(tmp_path)), "--model-name")
    assert_clean_error(run_in_process(capsys, "--model", str(tmp_path / "nowhere"), "--out", str(tmp_path)),
                       "nowhere", "no such file or folder")


@pytest.mark.slow
def test_registered_model_and_run_figures(tmp_path: Path):
    """models:/NAME@ALIAS from a real MLflow registry (SQLite), and --run-id figures logged to the run."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import DataConfig, ExperimentConfig, ModelConfig, TrackingConfig
    from pipeline.tracking import Tracker
    from pipeline.tracking.model_store import log_final_model

    model, _, _ = _small_sparseformer_files(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "viz-job", "run-b", artifact_root=str(tmp_path / "artifacts"))
    for step in range(3):
        tracker.log_metrics({"train/loss": 2.0 - step / 2, "train/lr": 1e-3}, step=5 * step)
    cfg = ExperimentConfig(model=ModelConfig(name="sparseformer_tiny",
                                             kwargs={k: v for k, v in SF_KWARGS.items() if k != "num_classes"}),
                           data=DataConfig(kind="image", image_size=64), tracking=TrackingConfig(register="viz-sf"))
    summary = {"num_videos": 5, "top1": 0.4, "top5": 1.0, "mean_class_accuracy": 0.4,
               "per_class": {c: float(i % 2) for i, c in enumerate("abcde")}}
    out = log_final_model(tracker, model, cfg, list("abcde"), summary, str(tmp_path / "run"))
    assert out.get("registered_version") == 1, out
    tracker.close()

    res = run("--model", "models:/viz-sf@candidate", "--tracking-uri", uri, "--synthetic", "2", "--out",
              str(tmp_path / "reg"))
    assert res.returncode == 0, res.stderr
    assert {p.parent.name for p in printed_pngs(res)} == {"models_viz-sf_candidate"}
    assert_clean_error(run("--model", "models:/no-such-model@candidate", "--tracking-uri", uri, "--out",
                           str(tmp_path)), "no-such-model")

    run_id = tracker.run_id
    res = run("--run-id", run_id, "--tracking-uri", uri, "--log-to-run", "--out", str(tmp_path / "runfig"))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in printed_pngs(res)) == ["per_class_accuracy.png", "training_curves.png"]
    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(run_id, f"figures/run_{run_id}")}
    assert logged == {f"figures/run_{run_id}/per_class_accuracy.png", f"figures/run_{run_id}/training_curves.png"}


# ------------------------------------------------------------------------------------------ inputs (datasets.media_inputs)

@pytest.mark.parametrize("h, w, height, width, want", [
    (50, 70, 64, 64, 64),    # landscape onto a square: the short side becomes 64, the long floor(70 * 64 / 50) = 89
    (80, 60, 64, 48, 48),    # the same aspect as the target: 60 -> 48 and 80 -> 64 exactly
    (100, 100, 64, 48, 64),  # a square onto a wide target: the width (64 > 48) decides
    (30, 90, 32, 96, 32),    # 30 -> 32 and 90 -> 96
    (64, 80, 64, 64, 64),    # already covering: no resize
])
def test_cover_short_side(h, w, height, width, want):
    from datasets.media_inputs import cover_resize_crop, cover_short_side

    assert cover_short_side(h, w, height, width) == want
    x = torch.zeros(3, 2, h, w, dtype=torch.uint8)
    y = cover_resize_crop(x, height, width)
    assert tuple(y.shape) == (3, 2, height, width) and y.dtype == torch.uint8


def test_cover_resize_crop_takes_the_centre():
    from datasets.media_inputs import cover_resize_crop

    cols = torch.arange(80, dtype=torch.uint8).expand(3, 1, 64, 80)  # pixel value = its column
    y = cover_resize_crop(cols, 64, 64)  # short side already 64: no resize, left (80 - 64) // 2 = 8
    assert y[0, 0, 0].tolist() == list(range(8, 72))
    rows = torch.arange(70, dtype=torch.uint8)[:, None].expand(3, 1, 70, 48)
    y = cover_resize_crop(rows, 64, 48)  # top (70 - 64) // 2 = 3
    assert y[0, 0, :, 0].tolist() == list(range(3, 67))


@pytest.mark.parametrize("n, t, want", [
    (12, 4, [1, 4, 7, 10]),                     # stride 3, span 10, start (12 - 10) // 2 = 1
    (100, 8, [7, 19, 31, 43, 55, 67, 79, 91]),  # stride 12, span 85, start 15 // 2 = 7
    (8, 8, list(range(8))),                     # exactly T frames
    (3, 4, [0, 1, 2, 2]),                       # shorter than T: the last frame repeats
])
def test_whole_video_clip(n, t, want):
    from datasets.media_inputs import whole_video_clip

    assert whole_video_clip(n, t).indices.tolist() == want


def test_prepare_frames_normalises_with_the_spec_and_to_display_inverts_it():
    from datasets.media_inputs import MediaSpec, prepare_frames, to_display

    spec = MediaSpec((3, 4, 6), mean=(0.5, 0.25, 0.0), std=(0.25, 0.5, 1.0))
    white = np.full((1, 4, 6, 3), 255, np.uint8)
    assert torch.equal(prepare_frames(white, spec)[:, 0, 0], torch.tensor([2.0, 1.5, 1.0]))  # (1 - m) / s
    frames = np.random.default_rng(0).integers(0, 256, (1, 4, 6, 3), dtype=np.uint8)
    x = prepare_frames(frames, spec)
    assert x.shape == (3, 4, 6) and x.dtype == torch.float32
    assert np.array_equal(to_display(x[None], spec.mean, spec.std)[0].numpy(), frames[0])


def test_model_media_spec_reads_the_pretrained_cfg():
    import models
    from pipeline.visualize import model_media_spec

    model = models.create_model("video_sparseformer_tiny", **VSF_KWARGS)
    spec = model_media_spec(model)
    assert spec.shape == (3, 4, 32, 32) and spec.is_video and spec.num_frames == 4
    assert spec.mean == tuple(model.pretrained_cfg["mean"]) and spec.std == tuple(model.pretrained_cfg["std"])


def test_video_file_gives_the_whole_video_clip(tmp_path: Path):
    """The frames of a loaded clip are those :func:`whole_video_clip` names: frame k of the file is grey
    level 18 k, so the clip's mean levels read back its frame indices (up to the codec's error). 13 frames:
    stride 3, start (13 - 10) // 2 = 1 (segment centres would read frames 1, 4, 8, 11)."""
    from datasets.encode import encode_video
    from datasets.media_inputs import MediaSpec, load_media_files, to_display

    frames = np.stack([np.full((40, 56, 3), 18 * k, np.uint8) for k in range(13)])  # (13, 40, 56, 3)
    clip = tmp_path / "grey.mp4"
    clip.write_bytes(encode_video(frames, 8, crf=0))
    spec = MediaSpec((3, 4, 32, 32))
    x = load_media_files([clip], spec)
    assert x.shape == (1, 3, 4, 32, 32)
    levels = to_display(x, spec.mean, spec.std)[0].float().mean(dim=(1, 2, 3))  # (T,)
    assert torch.allclose(levels, torch.tensor([18.0, 72.0, 126.0, 180.0]), atol=3), levels  # frames 1, 4, 7, 10
    with pytest.raises(ValueError, match="the model takes image files"):
        load_media_files([clip], MediaSpec((3, 32, 32)))
