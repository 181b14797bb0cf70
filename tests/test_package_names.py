"""Our `datasets` package is the one imported, even with Hugging Face's `datasets` on the path."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_our_datasets_package_is_imported():
    import datasets

    assert getattr(datasets, "GLIMPSE_DATASETS", False) is True
    assert os.path.dirname(datasets.__file__) == str(REPO / "datasets")


def test_jobs_win_over_a_foreign_datasets_package(tmp_path):
    impostor = tmp_path / "datasets"
    impostor.mkdir()
    (impostor / "__init__.py").write_text("raise ImportError('this is not Glimpse datasets')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for job in ("train_kinetics.py", "make_shards.py", "evaluate_kinetics.py"):
        proc = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--help"], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "train_kinetics.py"), "--preset", "smoke",
                           "--print-config"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "video_sparseformer_tiny" in proc.stdout, proc.stderr[-2000:]
