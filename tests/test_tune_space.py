"""Sweep specs without Ray: search-space parsing and validation, presets, Pareto front and selection."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, resolve_config
from pipeline.presets import IMAGENET_PRESETS, KINETICS_PRESETS
from pipeline.tune import KSetting, apply_params, load_sweep, pareto_front, parse_space, select_rows
from pipeline.tune_presets import IMAGENET_SWEEPS, KINETICS_SWEEPS

BASE = resolve_config(IMAGENET_PRESETS, "smoke")


def test_parse_space_all_kinds_and_k_axis():
    dims, ks = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.weight_decay": {"uniform": [0, 0.1]},
                            "train.epochs": {"grid": [1, 2]}, "model.kwargs.depth": [2, 4],
                            "train.optimizer": {"choice": ["adamw", "sgd"]},
                            "ats.ratio": {"grid": [0.5, [0.25, 0.75]]}, "ats.k": [16]}, BASE)
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("train.lr", "loguniform", (1e-4, 1e-2)), ("train.weight_decay", "uniform", (0.0, 0.1)),
        ("train.epochs", "grid", (1, 2)), ("model.kwargs.depth", "grid", (2, 4)),
        ("train.optimizer", "choice", ("adamw", "sgd"))]
    assert [s.label for s in ks] == ["ratio_0.5", "ratio_0.25-0.75", "k_16"]
    assert ks[1] == KSetting(ratio=(0.25, 0.75)) and ks[2].model_kwargs() == {"ats_k": 16, "ats_ratio": None}


@pytest.mark.parametrize("space, message", [
    ({"train.lrr": {"grid": [0.1]}}, "train.lrr"),  # unknown key, named
    ({"trian.lr": [0.1]}, "trian"),
    ({"train.lr": {"grid": []}}, "empty grid"),
    ({"train.epochs": {"choice": []}}, "empty choice"),
    ({"train.epochs": {"grid": [0]}}, "train.epochs"),  # out of range for the config
    ({"train.optimizer": {"choice": ["adam"]}}, "train.optimizer"),
    ({"train.lr": {"uniform": [0.1, 0.01]}}, "low < high"),
    ({"train.lr": {"loguniform": [0, 0.01]}}, "low > 0"),
    ({"train.lr": {"normal": [0, 1]}}, "train.lr"),
    ({"ats.ratio": {"grid": [1.5]}}, "ratio rho in (0, 1]"),
    ({"ats.k": {"grid": [0]}}, "positive integer K"),
    ({"ats.ratio": {"choice": [0.5]}}, "use grid"),
    ({"ats.kk": [3]}, "ats.kk"),
    ({"ats.ratio": [0.5, 0.5]}, "repeated K settings"),
])
def test_bad_spaces_are_rejected_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_space(space, BASE)


def test_every_preset_parses():
    for sweeps, presets in ((IMAGENET_SWEEPS, IMAGENET_PRESETS), (KINETICS_SWEEPS, KINETICS_PRESETS)):
        for name, preset in sweeps.items():
            spec = load_sweep(sweeps, presets, name, model="models:/m@best" if preset.get("needs_model") else "")
            assert spec.dimensions or spec.k_settings, name
    smoke = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke")
    assert smoke.base.model.name == "deit_tiny_ats" and smoke.base.model.kwargs["patch_size"] == 4
    assert [s.label for s in smoke.k_settings] == ["ratio_0.5", "ratio_1"]


def test_k_only_rules_and_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="give --model"):
        load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "ats_ratio")
    with pytest.raises(ConfigError, match="does not train"):
        load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke", model="models:/m@best")
    f = tmp_path / "sweep.yaml"
    f.write_text("base: smoke\noverrides: {train.epochs: 3}\nspace:\n  train.lr: {loguniform: [1.0e-4, 1.0e-2]}\n"
                 "num_samples: 5\nasha: {grace_period: 2}\n")
    spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "", f, ["cluster.num_workers=2"])
    assert spec.base.train.epochs == 3 and spec.base.cluster.num_workers == 2
    assert spec.num_samples == 5 and spec.grace_period == 2 and spec.dimensions[0].kind == "loguniform"
    f.write_text("space: {train.lr: [0.1]}\nsamples: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'samples'"):
        load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "", f)


def test_apply_params_sets_nested_keys():
    cfg = apply_params(BASE, {"train.lr": 0.5, "model.kwargs.depth": 3})
    assert cfg.train.lr == 0.5 and cfg.model.kwargs["depth"] == 3 and cfg.model.kwargs["patch_size"] == 8
    assert BASE.train.lr != 0.5  # the base is not mutated


ROWS = [  # hand-made points: (top1, gflops)
    {"trial_id": "a", "status": "complete", "top1": 0.70, "gflops": 2.0},
    {"trial_id": "b", "status": "complete", "top1": 0.72, "gflops": 3.0},
    {"trial_id": "c", "status": "complete", "top1": 0.69, "gflops": 2.5},  # dominated by a
    {"trial_id": "d", "status": "complete", "top1": 0.60, "gflops": 1.0},
    {"trial_id": "e", "status": "complete", "top1": 0.72, "gflops": 4.0},  # as accurate as b, dearer
    {"trial_id": "f", "status": "stopped", "top1": 0.99, "gflops": 0.5},  # stopped early: not selectable
]


def test_pareto_front_and_selection():
    assert [r["trial_id"] for r in pareto_front(ROWS[:5])] == ["d", "a", "b"]
    assert [r["trial_id"] for r in select_rows(ROWS, "best")] == ["b"]
    assert [r["trial_id"] for r in select_rows(ROWS, "budget", 2.6)] == ["a"]
    assert [r["trial_id"] for r in select_rows(ROWS, "pareto")] == ["d", "a", "b"]
    with pytest.raises(ValueError, match="cheapest costs 0.5"):
        select_rows(ROWS, "budget", 0.1)
    with pytest.raises(ValueError, match="nothing to select"):
        select_rows(ROWS[5:], "best")
