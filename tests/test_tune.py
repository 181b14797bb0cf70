"""Ray Tune sweeps end to end on the session's real Ray head, with a real MLflow store.

* a sweep of four trainings of a tiny ATS ViT with ASHA: some stopped early, the others evaluated at
  two K ratios; one MLflow parent run, one nested child per trial, the frontier CSV/PNG, and the
  best point registered with alias ``best`` (it loads back at its K);
* an evaluation-only sweep over that registered model: evaluation only, no training step in any trial, and
  fewer measured GFLOPs at a smaller K;
* an evaluation-only sweep interrupted (SIGINT) after its first trial, then resumed: finished trials kept.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.presets import IMAGENET_PRESETS
from pipeline.sweep import Dimension, child_runs, load_sweep, run_sweep
from pipeline.sweep.presets import IMAGENET_SWEEPS
from tests.conftest import REPO, service_env

pytestmark = pytest.mark.slow


def _overrides(tmp: Path, synthetic_root: Path, ray_cluster: dict) -> list[str]:
    return [f"data.synthetic_root={synthetic_root}", f"cluster.storage_path={tmp / 'runs'}",
            f"cluster.address={ray_cluster['address']}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}"]


@pytest.fixture(scope="module")
def asha_sweep(tmp_path_factory, synthetic_root, ray_cluster):
    tmp = tmp_path_factory.mktemp("tune")
    # The demo images (1000 train / 200 val) so that one epoch of 20 steps separates good and zero learning rates.
    spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke", overrides=[
        *_overrides(tmp, synthetic_root, ray_cluster), "data.synthetic=demo", "data.samples_per_epoch=320"])
    # Four learning rates, two of them zero; ASHA (rf 4: the best quarter goes on) after epoch 1 of 2.
    from dataclasses import replace

    spec = replace(spec, dimensions=(Dimension("train.lr", "grid", (3e-3, 0.0, 2e-3, 0.0)),), reduction_factor=4,
                   max_concurrent=2, gflops_samples=16)
    result = run_sweep(spec, name="asha", register="tune-test", aliases=("best",))
    return tmp, spec, result


def test_asha_sweep_tracks_selects_and_registers(asha_sweep):
    tmp, spec, result = asha_sweep
    trials = {r["trial_id"] for r in result.rows}
    assert len(trials) == 4
    assert result.num_stopped >= 1, f"ASHA stopped nothing: {result.rows}"
    complete = [r for r in result.rows if r["status"] == "complete"]
    assert complete and {r["setting"] for r in complete} == {"ratio_0.5", "ratio_1"}
    for r in result.rows:  # every trial reports accuracy AND measured GFLOPs
        assert 0.0 <= r["top1"] <= 1.0 and r["gflops"] > 0, r
    for t in {r["trial_id"] for r in complete}:  # a smaller K costs less on the same model
        by = {r["setting"]: r for r in complete if r["trial_id"] == t}
        assert by["ratio_0.5"]["gflops"] < by["ratio_1"]["gflops"]

    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["glimpse.kind"] == "sweep"
    children = child_runs(result.tracking_uri, "glimpse", result.parent_run_id)
    assert len(children) == 4, "exactly one MLflow run per trial"
    assert {c.data.tags["glimpse.trial_id"] for c in children} == trials
    by_status = {c.data.tags["glimpse.trial_id"]: c for c in children}
    for r in complete:
        run = by_status[r["trial_id"]]
        assert run.info.status == "FINISHED" and run.data.params["train.lr"] == str(r["train.lr"])
        assert run.data.tags["glimpse.checkpoint"] == r["checkpoint"]  # the child references its checkpoint
        assert run.data.metrics[f"eval/top1/{r['setting']}"] == pytest.approx(r["top1"])
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]  # metrics by step
        geometry = {a.path for a in client.list_artifacts(run.info.run_id, "figures/geometry")}
        assert "figures/geometry/ats_kept_counts.png" in geometry  # ATS Fig. 6 over validation inputs
    for r in result.rows:
        if r["status"] == "stopped":
            assert by_status[r["trial_id"]].info.status == "KILLED"
            assert by_status[r["trial_id"]].data.tags["glimpse.tune.status"] == "stopped_early"

    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"frontier.csv", "frontier.png"} <= artifacts
    with open(result.csv_path) as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result.rows) and any(row["pareto"] == "1" for row in table)
    assert Path(result.png_path).read_bytes()[:4] == b"\x89PNG"

    # The best point is registered and loads back at its K.
    from models.ats import ats_stages
    from pipeline.tracking.model_store import load_model

    best = max(complete, key=lambda r: (r["top1"], -r["gflops"]))
    assert result.selected[0]["trial_id"] == best["trial_id"]
    version = client.get_model_version_by_alias("tune-test", "best")
    assert version.tags["trial_id"] == best["trial_id"] and version.tags["knob_setting"] == best["setting"]
    model, meta = load_model("models:/tune-test@best", tracking_uri=result.tracking_uri)
    ratio = float(best["setting"].split("_")[1])
    assert all(s.ats_ratio == ratio for s in ats_stages(model))
    assert meta["experiment"]["model"]["ats_ratio"] == ratio  # the knob is the config field that ran


def test_k_only_sweep_does_not_train(asha_sweep, ray_cluster, synthetic_root):
    tmp, spec, first = asha_sweep
    space = tmp / "konly.yaml"
    space.write_text("base: smoke\nspace: {model.ats_ratio: [0.25, 1.0]}\ngflops_samples: 16\n")
    k_spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "", space, _overrides(tmp, synthetic_root, ray_cluster),
                        model="models:/tune-test@best", max_concurrent=2)
    result = run_sweep(k_spec, name="konly", select="pareto")
    assert {r["setting"] for r in result.rows} == {"ratio_0.25", "ratio_1"}
    assert all(r["status"] == "complete" and r["epochs_done"] == 0 for r in result.rows)
    by = {r["setting"]: r for r in result.rows}
    assert by["ratio_0.25"]["gflops"] < by["ratio_1"]["gflops"]
    client = MlflowClient(result.tracking_uri)
    children = child_runs(result.tracking_uri, "glimpse", result.parent_run_id)
    assert len(children) == 2
    for c in children:  # no training step at all in these trials
        assert not any(k.startswith("train/") for k in c.data.metrics), c.data.metrics.keys()
        assert client.get_metric_history(c.info.run_id, "train/loss") == []
    # No Ray Train training run was made for them either: only evaluation runs.
    trials_dir = Path(result.experiment_path + ".trials")
    assert trials_dir.is_dir()
    assert not list(trials_dir.glob("*/checkpoint_step*"))
    # The selected model's first-sweep K is the one registered; the frontier here is the pareto set.
    assert result.selected and all(r["status"] == "complete" for r in result.selected)


def test_interrupted_sweep_resumes_keeping_finished_trials(asha_sweep, ray_cluster, synthetic_root):
    tmp, _, _ = asha_sweep
    space = tmp / "k.yaml"
    space.write_text("space: {model.ats_ratio: [0.25, 0.5, 1.0]}\nmax_concurrent: 1\ngflops_samples: 8\nbase: smoke\n")
    cmd = [sys.executable, str(REPO / "jobs" / "tune_imagenet.py"), "--space", str(space), "--model",
           "models:/tune-test@best", "--name", "resumable", *_overrides(tmp, synthetic_root, ray_cluster)]
    env = service_env()
    log = open(tmp / "resumable.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    trials_dir = tmp / "runs" / "resumable.trials"
    deadline = time.time() + 240
    while time.time() < deadline and not list(trials_dir.glob("*/sweep_result.json")):
        assert proc.poll() is None, (tmp / "resumable.log").read_text()[-3000:]
        time.sleep(1)
    done_first = list(trials_dir.glob("*/sweep_result.json"))
    assert done_first, "no trial finished in time"
    proc.send_signal(signal.SIGINT)  # Ctrl-C: Tune saves the experiment and stops
    assert proc.wait(timeout=120) != 0
    log.close()
    finished = {p: p.stat().st_mtime_ns for p in trials_dir.glob("*/sweep_result.json")}
    assert len(finished) < 3, "the sweep finished before it could be interrupted"

    k_spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "", space, _overrides(tmp, synthetic_root, ray_cluster),
                        model="models:/tune-test@best")
    result = run_sweep(k_spec, name="resumable", resume=True)
    assert sorted(r["setting"] for r in result.rows) == ["ratio_0.25", "ratio_0.5", "ratio_1"]
    assert all(r["status"] == "complete" for r in result.rows)
    for p, mtime in finished.items():  # finished trials were kept, not run again
        assert p.stat().st_mtime_ns == mtime
    children = child_runs(result.tracking_uri, "glimpse", result.parent_run_id)
    assert len(children) == 3, "one MLflow run per trial, also across the resume"
    assert json.loads(next(iter(finished)).read_text())["sweep/complete"] == 1
