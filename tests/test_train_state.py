"""One training step: TrainState's state dict resumes bit for bit, and the plain loop runs the worker's step.

* N updates straight equal N/2 updates, a ``state_dict()`` saved and loaded (``weights_only=True``) into a
  freshly built state, and N/2 more: weights, optimiser moments and losses bit-equal (no Ray involved);
* the benchmark's plain loop logs exactly the losses that a Ray Train run of the same config logs to
  MLflow (slow: a real Ray cluster).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

from pipeline.config import resolve_config
from pipeline.context import build_run_context, finalize
from pipeline.presets import KINETICS_PRESETS
from pipeline.train.benchmark import PlainHooks, plain_loop, run_plain
from pipeline.train.setup import epoch_length


def _cfg(tmp_path: Path, synthetic_root: Path, *extra: str, preset: str = "baseline_smoke"):
    overrides = [f"data.synthetic_root={synthetic_root}", f"cluster.storage_path={tmp_path / 'runs'}",
                 "cluster.name=state", "train.deterministic=true", "train.epochs=2", "train.log_every=1",
                 f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *extra]
    return finalize(resolve_config(KINETICS_PRESETS, preset, overrides))


def _train(cfg, run, until: int, saved: dict | None = None):
    """Build a fresh state (resumed from ``saved``), train up to update ``until``; the state and its losses."""
    hooks = PlainHooks(warmup=0, steps=until, log_every=1)
    return run_plain(cfg, run, hooks, saved), hooks.losses


def _round_trip(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("preset", ["baseline_smoke", "smoke"])
def test_state_dict_resume_is_bit_exact(tmp_path, synthetic_root, preset):
    cfg = _cfg(tmp_path, synthetic_root, preset=preset)
    run = build_run_context(cfg)
    per_epoch = epoch_length(cfg, run, 0, 1)
    total = cfg.train.epochs * per_epoch
    half = per_epoch + 1  # mid-epoch: the resumed loader starts inside the second epoch
    assert 1 < half < total
    straight, straight_losses = _train(cfg, run, total)
    assert straight.step == total
    first, first_losses = _train(cfg, run, half)
    assert (first.step, first.epoch, first.batch_in_epoch) == (half, 1, 1)
    second, second_losses = _train(cfg, run, total, saved=_round_trip(first.state_dict()))
    assert second.step == total
    assert {**first_losses, **second_losses} == straight_losses
    assert sorted(straight_losses) == list(range(1, total + 1))
    for key, value in straight.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[key]), f"{key} differs after resume"
    moments = straight.optimizer.state_dict()["state"], second.optimizer.state_dict()["state"]
    for index, slots in moments[0].items():
        for name, value in slots.items():
            assert torch.equal(value, moments[1][index][name]), f"optimiser state {index}.{name} differs"
    assert straight.scheduler.state_dict()["last_epoch"] == second.scheduler.state_dict()["last_epoch"] == total


@pytest.mark.slow
def test_plain_loop_runs_the_workers_step(tmp_path, synthetic_root, ray_cluster):
    """Same config and seed: the plain loop's losses are the Ray worker's logged ``train/loss``, bit for bit."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import RUN_NAME_TAG
    from pipeline.train.launch import run_training

    cfg = _cfg(tmp_path, synthetic_root, f"cluster.address={ray_cluster['address']}", "eval.at_end=false",
               "train.val_every=0", preset="smoke")
    result = run_training(cfg)
    assert result.error is None, result.error
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    mlrun = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = 'state'")[0]
    ray_losses = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss")}
    total = max(ray_losses)
    _, plain_losses = plain_loop(cfg, steps=total - 1, warmup=1)
    assert sorted(plain_losses) == sorted(ray_losses) == list(range(1, total + 1))
    assert plain_losses == ray_losses
