"""Synthetic datasets (datasets/synthetic.py): determinism, the time-reversal property, shards."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from datasets.encode import probe_video
from datasets.manifest import read_manifest, resolve_source
from datasets.synthetic import (
    IMAGE_CLASSES,
    REVERSAL_PAIRS,
    VIDEO_CLASSES,
    VIDEO_PRESETS,
    ensure_synthetic,
    make_synthetic,
    render_digit_image,
    render_moving_digit,
    sample_rng,
)


def read_all(folder: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for url in resolve_source(folder).urls:
        with tarfile.open(url) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return [samples[k] for k in sorted(samples)]


def tars(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}


# ----------------------------------------------------------------------------- the time-reversal property


def _valid_path(label: int, traj: np.ndarray, size: int) -> bool:
    """Hand-written support of each class's path distribution: direction, shape, inside the frame.

    ``traj`` rows are (x, y, glyph height) in pixels; the drawn glyph adds a 1-pixel outline.
    """
    x, y, s = traj[:, 0], traj[:, 1], traj[:, 2]
    dx, dy, ds = np.diff(x), np.diff(y), np.diff(s)
    half_h = 0.5 * s + 1
    half_w = 0.5 * s * 5 / 7 + 1
    inside = bool(np.all(x - half_w >= -0.5) and np.all(x + half_w <= size + 0.5)
                  and np.all(y - half_h >= -0.5) and np.all(y + half_h <= size + 0.5))
    name = VIDEO_CLASSES[label]
    if name in ("left", "right"):
        sign = -1 if name == "left" else 1
        ok = np.all(sign * dx > 0) and np.allclose(dy, 0) and np.allclose(ds, 0)
    elif name in ("up", "down"):
        sign = -1 if name == "up" else 1
        ok = np.all(sign * dy > 0) and np.allclose(dx, 0) and np.allclose(ds, 0)
    elif name in ("clockwise", "counterclockwise"):
        # seen from any point inside the circle (the path's centroid is one) an orbit turns monotonically
        vx, vy = x - x.mean(), y - y.mean()
        cross = vx[:-1] * vy[1:] - vy[:-1] * vx[1:]  # > 0: clockwise on screen (y points down)
        radius = np.hypot(vx, vy)
        sign = 1 if name == "clockwise" else -1
        ok = np.all(sign * cross > 0) and np.allclose(ds, 0) and radius.max() > 2
    else:
        sign = 1 if name == "grow" else -1
        ok = np.all(sign * ds > 0) and np.allclose(dx, 0) and np.allclose(dy, 0)
    return bool(ok) and inside


@pytest.mark.parametrize("first,second", REVERSAL_PAIRS)
def test_partner_class_is_exact_time_reversal(first, second):
    """P(clip | second) = P(reversed clip | first): with the same random state the partner class
    renders exactly the reversed frames, so a frame-order-blind model sees identical inputs."""
    for index in range(4):
        f1, t1, d1 = render_moving_digit(first, sample_rng(3, "video", "train", index), 32, 10)
        f2, t2, d2 = render_moving_digit(second, sample_rng(3, "video", "train", index), 32, 10)
        assert d1 == d2
        np.testing.assert_array_equal(f2, f1[::-1])
        np.testing.assert_array_equal(t2, t1[::-1])
        # identical frame multisets: any order-agnostic statistic is equal
        np.testing.assert_array_equal(np.sort(f1.reshape(10, -1), axis=0), np.sort(f2.reshape(10, -1), axis=0))


@pytest.mark.parametrize("label", range(len(VIDEO_CLASSES)))
def test_paths_follow_their_class_and_reversal_swaps_it(label):
    size, T = 64, 16
    partner = label + 1 if label % 2 == 0 else label - 1
    for index in range(6):
        rng = sample_rng(0, "video", "val", 100 + index)
        frames, traj, _ = render_moving_digit(label, rng, size, T)
        assert frames.shape == (T, size, size, 3) and frames.dtype == np.uint8
        assert _valid_path(label, traj, size), (VIDEO_CLASSES[label], traj[[0, -1]])
        assert _valid_path(partner, traj[::-1], size)  # the reversed clip is a valid partner clip
        assert not _valid_path(partner, traj, size)


def test_frames_change_over_time_and_differ_between_samples():
    f, _, _ = render_moving_digit(0, sample_rng(0, "video", "train", 0), 32, 8)
    g, _, _ = render_moving_digit(0, sample_rng(0, "video", "train", 1), 32, 8)
    assert np.abs(f[0].astype(int) - f[-1].astype(int)).mean() > 1
    assert np.abs(f.astype(int) - g.astype(int)).mean() > 10


def test_render_rejects_bad_labels():
    with pytest.raises(ValueError, match="label"):
        render_moving_digit(8, sample_rng(0, "video", "train", 0))
    with pytest.raises(ValueError, match="digit"):
        render_digit_image(10, sample_rng(0, "image", "train", 0))


# ----------------------------------------------------------------------------- shards


def test_make_synthetic_video_smoke(tmp_path: Path):
    folders = make_synthetic(tmp_path, "video", "smoke", seed=0)
    assert set(folders) == {"video/train", "video/val"}
    p = VIDEO_PRESETS["smoke"]
    for split, n in (("train", p.num_train), ("val", p.num_val)):
        m = read_manifest(folders[f"video/{split}"])
        assert m.kind == "video" and m.classes == list(VIDEO_CLASSES) and m.total_samples == n
        assert len(m.shards) == -(-n // p.shard_size) and m.info["reversal_pairs"] == [list(x) for x in REVERSAL_PAIRS]
        assert (m.info["preset"], m.info["seed"], m.info["split"]) == ("smoke", 0, split)
    samples = read_all(folders["video/train"])
    labels = [int(s["cls"]) for s in samples]
    assert np.bincount(labels).tolist() == [p.num_train // 8] * 8  # balanced
    for s in samples[:8]:
        meta = json.loads(s["json"])
        info = probe_video(s["mp4"])
        assert (info.num_frames, info.width, info.height) == (p.num_frames, p.size, p.size)
        assert meta["num_frames"] == p.num_frames and meta["fps"] == p.fps == info.fps
        assert meta["label"] == VIDEO_CLASSES[int(s["cls"])]
        traj = np.array(meta["trajectory"])
        assert traj.shape == (p.num_frames, 3)
        assert _valid_path(int(s["cls"]), traj, p.size)
    with av.open(io.BytesIO(samples[0]["mp4"])) as c:
        assert sum(1 for _ in c.decode(video=0)) == p.num_frames


def test_make_synthetic_images_smoke(tmp_path: Path):
    folders = make_synthetic(tmp_path, "image", "smoke", seed=0)
    m = read_manifest(folders["image/val"])
    assert m.kind == "image" and m.classes == list(IMAGE_CLASSES) and m.total_samples == 50
    samples = read_all(folders["image/val"])
    exts = [next(e for e in s if e in ("jpg", "png")) for s in samples]
    assert exts.count("png") == 10 and exts.count("jpg") == 40
    for s, ext in zip(samples, exts):
        img = Image.open(io.BytesIO(s[ext]))
        assert img.size == (32, 32) and img.format == {"jpg": "JPEG", "png": "PNG"}[ext]
        assert json.loads(s["json"])["label"] == IMAGE_CLASSES[int(s["cls"])]


def test_synthetic_is_deterministic(tmp_path: Path):
    a = make_synthetic(tmp_path / "a", "both", "smoke", seed=7)
    b = make_synthetic(tmp_path / "b", "both", "smoke", seed=7, max_count=1000)  # other sharding
    c = make_synthetic(tmp_path / "c", "video", "smoke", seed=8)
    for name in ("video/train", "image/val"):
        samples_a, samples_b = read_all(a[name]), read_all(b[name])
        assert samples_a == samples_b  # same seed -> identical sample bytes whatever the sharding
    d = make_synthetic(tmp_path / "d", "video", "smoke", seed=7)
    assert tars(a["video/train"]) == tars(d["video/train"])  # and identical shard files
    assert read_all(c["video/train"])[0]["mp4"] != read_all(a["video/train"])[0]["mp4"]


def test_unknown_preset_and_kind(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown video preset 'huge'"):
        make_synthetic(tmp_path, "video", "huge")
    with pytest.raises(ValueError, match="'audio'"):
        make_synthetic(tmp_path, "audio", "smoke")


def _ensure(root: str) -> str:
    return str(ensure_synthetic(root, "video", "smoke", seed=1))


def test_ensure_synthetic_builds_once_and_is_race_safe(tmp_path: Path):
    root = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:  # two processes race to build the same dataset
        paths = pool.map(_ensure, [str(root), str(root)])
    assert paths == [str(root / "video")] * 2
    assert sorted(p.name for p in root.iterdir()) == ["video"]  # temp build folders are gone
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")}
    assert ensure_synthetic(root, "video", "smoke", seed=1) == root / "video"  # no-op
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.tar")} == before
    assert read_manifest(root / "video" / "val").total_samples == VIDEO_PRESETS["smoke"].num_val
    with pytest.raises(ValueError, match="preset.*use another root"):
        ensure_synthetic(root, "video", "smoke", seed=2)
