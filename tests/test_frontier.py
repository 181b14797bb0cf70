"""The accuracy-GFLOPs frontier job on real digits: its invariants, its files and its MLflow run."""

from __future__ import annotations

import csv

import mlflow
import pytest
import torch

from pipeline.frontier import FrontierConfig, evit_locations, run_frontier

TINY = FrontierConfig(epochs=2, embed_dim=32, depth=3, num_heads=2, flops_samples=4, ats_k=(48, 16),
                      ats_ratio=(1.0, 0.6), tome_r=(0, 4, 8), evit_keep_rate=(1.0, 0.7, 0.4))


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("frontier")
    uri = f"sqlite:///{out / 'mlflow.db'}"
    return run_frontier(TINY, out / "run", tracking_uri=uri), uri


def test_full_token_points_equal_the_unreduced_model(summary):
    s, _ = summary
    firsts = {}
    for row in s["rows"]:
        firsts.setdefault(row["method"], row)
    assert set(firsts) == {"ats", "ats_multi", "tome", "evit"}
    for method in ("ats", "tome", "evit"):  # keep_all / r = 0 / kappa = 1: nothing reduced
        assert firsts[method]["top1"] == s["base_top1"], method
        assert firsts[method]["gflops"] == pytest.approx(s["base_gflops"], rel=1e-6), method


def test_gflops_fall_monotonically_along_every_knob(summary):
    s, _ = summary
    for method in ("ats", "ats_multi", "tome", "evit"):
        g = [r["gflops"] for r in s["rows"] if r["method"] == method]
        assert all(a >= b for a, b in zip(g, g[1:])) and g[-1] < g[0], (method, g)
    tome = [r["gflops"] for r in s["rows"] if r["method"] == "tome"]
    assert all(a > b for a, b in zip(tome, tome[1:]))  # ToMe removes r tokens in every block: strictly less


def test_csv_png_and_mlflow_run(summary):
    s, uri = summary
    with open(s["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(s["rows"]) == 3 + 2 + 3 + 3
    assert open(s["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(uri)
    run = client.get_run(s["run_id"])
    assert run.data.metrics["base/top1"] == pytest.approx(s["base_top1"])
    assert {a.path for a in client.list_artifacts(s["run_id"], "frontier")} == {"frontier/frontier.csv",
                                                                                "frontier/frontier.png"}
    assert len(client.get_metric_history(s["run_id"], "tome/gflops")) == 3
    assert s["train_samples"] + s["test_samples"] == 1797  # every digit scikit-learn ships


def test_evit_locations_scale_with_depth():
    assert evit_locations(12) == (3, 6, 9)
    assert evit_locations(6) == (2, 3, 4)
    assert evit_locations(3) == (1, 2)
