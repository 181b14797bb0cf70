"""jobs/make_shards.py as users run it: subprocesses, exit codes and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datasets.manifest import read_manifest

JOB = Path(__file__).resolve().parents[1] / "jobs" / "make_shards.py"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1, res.stderr
    for n in needles:
        assert n in lines[0], (n, res.stderr)


@pytest.mark.parametrize("command", [[], ["images"], ["kinetics"], ["synthetic"]])
def test_help(command):
    res = run(*command, "--help")
    assert res.returncode == 0 and "usage: make_shards.py" in res.stdout
    if command:
        assert "--max-count" in res.stdout and "--workers" in res.stdout and "--overwrite" in res.stdout


def test_missing_image_folder(tmp_path: Path):
    assert_clean_error(run("images", str(tmp_path / "no_such_root"), str(tmp_path / "out")), "no_such_root")


def test_empty_csv(tmp_path: Path):
    csv = tmp_path / "empty_annotations.csv"
    csv.write_text("")
    (tmp_path / "videos").mkdir()
    assert_clean_error(run("kinetics", str(csv), str(tmp_path / "videos"), str(tmp_path / "out")),
                       "empty_annotations.csv", "empty")


def test_unknown_class(tmp_path: Path):
    root = tmp_path / "imgs"
    for cls in ("ant", "bee", "wasp"):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((8, 8, 3), 100, np.uint8)).save(root / cls / "a.png")
    classes = tmp_path / "classes.txt"
    classes.write_text("ant\nbee\n")
    assert_clean_error(run("images", str(root), str(tmp_path / "out"), "--classes", str(classes)), "'wasp'")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_size_is_a_usage_error(tmp_path: Path):
    res = run("images", str(tmp_path), str(tmp_path / "o"), "--max-size", "lots")
    assert res.returncode == 2 and "lots" in res.stderr and "Traceback" not in res.stderr


def test_images_end_to_end_and_rerun(tmp_path: Path):
    root = tmp_path / "imgs"
    for i in range(6):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"c{i % 2}" / f"{i}.jpg")
    out = tmp_path / "out"
    res = run("images", str(root), str(out), "--max-count", "4", "--max-size", "1MB", "--workers", "2")
    assert res.returncode == 0, res.stderr
    assert "6 images, 2 classes, 2 shards" in res.stdout
    m = read_manifest(out)
    assert [s.count for s in m.shards] == [4, 2]
    assert m.created["args"]["max_size"] == 1_000_000 and "images" in m.created["command"]
    res = run("images", str(root), str(out), "--max-count", "4")
    assert res.returncode == 0 and "2 of 2 shards already finished" in res.stderr


def test_synthetic_smoke(tmp_path: Path):
    res = run("synthetic", str(tmp_path / "syn"), "--kind", "both", "--preset", "smoke", "--seed", "3")
    assert res.returncode == 0, res.stderr
    for kind, n_val in (("video", 24), ("image", 50)):
        m = read_manifest(tmp_path / "syn" / kind / "val")
        assert m.total_samples == n_val and m.info["seed"] == 3
    manifest = json.loads((tmp_path / "syn" / "video" / "train" / "manifest.json").read_text())
    assert manifest["classes"][:2] == ["left", "right"]
