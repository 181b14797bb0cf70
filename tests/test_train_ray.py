"""Training end to end on a real Ray cluster with real MLflow stores.

* ``ray job submit --working-dir .`` of ``jobs/train_kinetics.py`` against a ``ray start --head``;
* resume: N steps straight equal N/2 steps, a stop, and N/2 resumed steps, bit for bit;
* a worker killed mid-run: the run finishes from its checkpoint and the metric steps have no gaps or repeats;
* the registry against a real ``mlflow server``: register, alias, load by alias and version, re-evaluate;
* the demo preset learns the motion task well above chance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipeline.config import resolve_config
from pipeline.context import finalize
from pipeline.presets import KINETICS_PRESETS
from pipeline.tracking import RUN_NAME_TAG
from pipeline.train.launch import run_training
from tests.conftest import REPO, free_port, service_env

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, synthetic_root: Path, ray_cluster: dict, name: str, *extra: str, preset: str = "smoke"):
    overrides = [f"data.synthetic_root={synthetic_root}", f"cluster.storage_path={tmp_path / 'runs'}",
                 f"cluster.name={name}", f"cluster.address={ray_cluster['address']}",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    return finalize(resolve_config(KINETICS_PRESETS, preset, overrides))


def _latest_checkpoint(run_dir: Path) -> Path:
    ckpts = sorted(run_dir.glob("checkpoint_step*"))
    assert ckpts, f"no checkpoints under {run_dir}"
    return ckpts[-1]


def _run(tracking_uri: str, name: str):
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("glimpse")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return client, runs[0]


def test_job_submit_end_to_end(tmp_path, synthetic_root, ray_cluster):
    """The way users run it: ``ray job submit --working-dir . -- python jobs/train_kinetics.py``."""
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_cluster["dashboard"],
           "--working-dir", str(REPO), "--", "python", "jobs/train_kinetics.py", "--preset", "smoke",
           f"data.synthetic_root={synthetic_root}", f"cluster.storage_path={tmp_path / 'runs'}",
           f"tracking.tracking_uri={tracking}", "--name", "submitted", "--register", "submitted-model"]
    proc = subprocess.run(cmd, env=service_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    assert "final evaluation: top-1" in proc.stdout
    # A quiet console: rank 0's progress lines, none of Ray Train's per-report dumps, none of our warnings.
    out = proc.stdout + proc.stderr
    assert "epoch 1/2" in out and "samples_per_s" in out
    assert "TrainingReport(" not in out and "Reporting training result" not in out
    assert "FutureWarning" not in out and "DeprecationWarning" not in out
    client, run = _run(tracking, "submitted")
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "video_sparseformer_tiny"
    assert "eval/top1" in run.data.metrics and "model/params_m" in run.data.metrics
    assert run.data.tags["env.world_size"] == "1"
    version = client.get_model_version_by_alias("submitted-model", "candidate")
    assert version.run_id == run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts and "eval_results.json" in artifacts
    # The run's pictures: curves, per-class accuracy, and the VideoSparseFormer's tubes and points per frame.
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert {"figures/training_curves.png", "figures/per_class_accuracy.png", "figures/geometry"} <= figures
    assert client.list_artifacts(run.info.run_id, "figures/geometry"), "no geometry figures logged"


def test_resume_gives_identical_weights(tmp_path, synthetic_root, ray_cluster):
    common = ["train.deterministic=true", "train.checkpoint_every=2", "eval.at_end=false", "train.epochs=2"]
    straight = run_training(_cfg(tmp_path, synthetic_root, ray_cluster, "straight", *common))
    assert straight.error is None
    full = torch.load(_latest_checkpoint(Path(straight.run_dir)) / "state.pt", weights_only=True)
    total = full["step"]
    assert total >= 4, "the smoke preset must run at least 4 updates for this test to mean something"
    half = total // 2
    first = run_training(_cfg(tmp_path, synthetic_root, ray_cluster, "resumed", *common, f"train.stop_at_step={half}"))
    assert first.error is None
    assert torch.load(_latest_checkpoint(Path(first.run_dir)) / "state.pt", weights_only=True)["step"] == half
    second = run_training(_cfg(tmp_path, synthetic_root, ray_cluster, "resumed", *common))
    assert second.error is None
    resumed = torch.load(_latest_checkpoint(Path(second.run_dir)) / "state.pt", weights_only=True)
    assert resumed["step"] == total
    for key, value in full["model"].items():
        assert torch.equal(value, resumed["model"][key]), f"{key} differs after resume"
    # The metric history of the resumed run continues without gaps or repeats.
    client, run = _run(f"sqlite:///{tmp_path / 'mlflow.db'}", "resumed")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == total


def test_worker_failure_resumes_from_checkpoint(tmp_path, synthetic_root, ray_cluster):
    cfg = _cfg(tmp_path, synthetic_root, ray_cluster, "faulty", "cluster.num_workers=2", "cluster.max_failures=2",
               "train.checkpoint_every=2", "train.log_every=1", "train.fail_at_step=3", "train.epochs=2",
               "eval.at_end=false")
    result = run_training(cfg)
    assert result.error is None, result.error
    assert (Path(result.run_dir) / "fault_drill_done").read_text() == "3"  # the worker really died at step 3
    client, run = _run(result.tracking_uri, "faulty")
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    final = torch.load(_latest_checkpoint(Path(result.run_dir)) / "state.pt", weights_only=True)["step"]
    assert steps == list(range(1, final + 1)), f"gaps or repeats in the metric steps: {steps}"


def test_registry_on_a_real_mlflow_server(tmp_path, synthetic_root, ray_cluster, mlflow_server):
    from pipeline.evaluation.standalone import EvalRequest, run_evaluation
    from pipeline.tracking.model_store import load_model

    cfg = _cfg(tmp_path, synthetic_root, ray_cluster, "registered", f"tracking.tracking_uri={mlflow_server}",
               "tracking.register=glimpse-test", "tracking.aliases=candidate,staging")
    result = run_training(cfg)
    assert result.error is None and result.model["registered_version"] == 1
    client = MlflowClient(mlflow_server)
    run = client.get_run(client.get_model_version("glimpse-test", "1").run_id)
    logged_top1 = run.data.metrics["eval/top1"]
    for uri in ("models:/glimpse-test@candidate", "models:/glimpse-test@staging", "models:/glimpse-test/1"):
        model, meta = load_model(uri, tracking_uri=mlflow_server)
        assert meta["experiment"]["model"]["name"] == "video_sparseformer_tiny"
    # The registered model reproduces the logged evaluation (same data, views and aggregation).
    summary = run_evaluation(EvalRequest(model="models:/glimpse-test@candidate", tracking_uri=mlflow_server,
                                         output=str(tmp_path / "eval.json"), address=ray_cluster["address"]))
    assert summary["top1"] == pytest.approx(logged_top1, abs=1e-6)
    assert json.loads((tmp_path / "eval.json").read_text())["num_videos"] == summary["num_videos"]
    eval_exp = client.get_experiment_by_name("glimpse-eval")
    eval_run = client.search_runs([eval_exp.experiment_id], filter_string="attributes.run_name LIKE 'eval %'")[0]
    assert "figures/per_class_accuracy.png" in {a.path for a in client.list_artifacts(eval_run.info.run_id, "figures")}
    # MLflow's own loader (a torch.export program, no pickle) gives the same network.
    import mlflow.pytorch

    mlflow.set_tracking_uri(mlflow_server)
    native = mlflow.pytorch.load_model("models:/glimpse-test@candidate")
    x = torch.randn(1, 3, cfg.data.num_frames, cfg.data.crop_size, cfg.data.crop_size)
    with torch.no_grad():
        assert torch.allclose(native(x), model(x), atol=1e-5)


def test_training_survives_an_unreachable_tracking_server(tmp_path, synthetic_root, ray_cluster):
    cfg = _cfg(tmp_path, synthetic_root, ray_cluster, "offline", f"tracking.tracking_uri=http://127.0.0.1:{free_port()}",
               "train.epochs=1")
    result = run_training(cfg)
    assert result.error is None
    assert result.eval is not None and result.eval["num_videos"] > 0
    assert (Path(result.run_dir) / "final_model" / "glimpse_state.pt").is_file()  # the model is kept locally


def test_demo_preset_learns_motion(tmp_path, synthetic_root, ray_cluster):
    """The demo trains on motion classes that a frame-order-blind model cannot beat chance on."""
    cfg = _cfg(tmp_path, synthetic_root, ray_cluster, "demo", preset="demo")
    result = run_training(cfg)
    assert result.error is None
    chance = 1.0 / len(result.eval["per_class"])
    print(f"demo: top-1 {result.eval['top1']:.3f} (chance {chance:.3f}) over {result.eval['num_videos']} videos")
    assert result.eval["top1"] >= 2.5 * chance


def test_baseline_preset_trains_and_registers(tmp_path, synthetic_root, ray_cluster):
    """The model is a name in the config: the frame-level baseline runs the same pipeline unchanged."""
    cfg = _cfg(tmp_path, synthetic_root, ray_cluster, "baseline", "tracking.register=baseline-smoke",
               preset="baseline_smoke")
    result = run_training(cfg)
    assert result.error is None, result.error
    assert result.eval["num_videos"] == 24 and result.model["registered_version"] == 1
    client, run = _run(result.tracking_uri, "baseline")
    assert run.data.params["model.name"] == "frame_tcn_tiny"
    assert run.data.metrics["model/params_m"] > 0 and run.data.metrics["model/gflops"] > 0
