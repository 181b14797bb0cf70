"""Sweep specs without Ray: search-space parsing and validation, presets, Pareto front and selection."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.config import ConfigError, apply_params, resolve_config
from pipeline.knobs import KnobSetting
from pipeline.presets import IMAGENET_PRESETS, KINETICS_PRESETS
from pipeline.sweep import load_sweep, pareto_front, parse_space, select_rows
from pipeline.sweep.presets import IMAGENET_SWEEPS, KINETICS_SWEEPS

BASE = resolve_config(IMAGENET_PRESETS, "smoke")


def test_parse_space_all_kinds_and_k_axis():
    dims, ks = parse_space({"train.lr": {"loguniform": [1e-4, 1e-2]}, "train.weight_decay": {"uniform": [0, 0.1]},
                            "train.epochs": {"grid": [1, 2]}, "model.kwargs.depth": [2, 4],
                            "train.optimizer": {"choice": ["adamw", "sgd"]},
                            "model.ats_ratio": {"grid": [0.5, [0.25, 0.75]]}, "model.ats_k": [16]}, BASE)
    assert [(d.key, d.kind, d.values) for d in dims] == [
        ("train.lr", "loguniform", (1e-4, 1e-2)), ("train.weight_decay", "uniform", (0.0, 0.1)),
        ("train.epochs", "grid", (1, 2)), ("model.kwargs.depth", "grid", (2, 4)),
        ("train.optimizer", "choice", ("adamw", "sgd"))]
    assert [s.label for s in ks] == ["ratio_0.5", "ratio_0.25-0.75", "k_16"]
    assert ks[1] == KnobSetting("model.ats_ratio", (0.25, 0.75))
    assert ks[2].overrides() == {"model.ats_k": 16, "model.ats_ratio": None}  # a K clears the ratio
    at = apply_params(BASE, ks[2].overrides())  # the settings are real config fields
    assert at.model.ats_k == 16 and at.model.ats_ratio is None


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
    ({"model.ats_kk": [3]}, "model.ats_kk"),
    ({"model.ats_ratio": {"grid": [1.5]}}, "ratio rho in (0, 1]"),
    ({"model.ats_k": {"grid": [0]}}, "positive integer K"),
    ({"model.ats_k": {"grid": [[16, 0]]}}, "positive integer K"),
    ({"model.ats_ratio": {"choice": [0.5]}}, "use grid"),
    ({"ats.kk": [3]}, "ats.kk"),
    ({"ats.ratio": [0.5]}, "'ats.ratio' is now the config field 'model.ats_ratio'"),  # the old keys, renamed
    ({"ats.k": [16]}, "'ats.k' is now the config field 'model.ats_k'"),
    ({"model.ats_ratio": [0.5, 0.5]}, "repeated knob settings"),
])
def test_bad_spaces_are_rejected_naming_the_key(space, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_space(space, BASE)


def test_every_preset_parses():
    for sweeps, presets in ((IMAGENET_SWEEPS, IMAGENET_PRESETS), (KINETICS_SWEEPS, KINETICS_PRESETS)):
        for name, preset in sweeps.items():
            spec = load_sweep(sweeps, presets, name, model="models:/m@best" if preset.get("needs_model") else "")
            assert spec.dimensions or spec.knob_settings, name
    smoke = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke")
    assert smoke.base.model.name == "deit_tiny_ats" and smoke.base.model.kwargs["patch_size"] == 4
    assert [s.label for s in smoke.knob_settings] == ["ratio_0.5", "ratio_1"]


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


def test_trial_config_is_finalised_per_trial(tmp_path):
    from pipeline.sweep.trial import TrialPlan, trial_config

    spec = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke", overrides=[f"cluster.storage_path={tmp_path}"])
    plan = TrialPlan(sweep="s", base=spec.base, parent_run_id="p", tracking_uri="sqlite:///x.db",
                     trial_storage=str(tmp_path / "s.trials"), knob_settings=spec.knob_settings)
    cfg = trial_config(plan, {"train.lr": 0.5, "model.kwargs.img_size": 48}, "t1")
    assert cfg.train.lr == 0.5 and cfg.cluster.name == "s-t1" and cfg.cluster.storage_path == str(tmp_path / "s.trials")
    assert cfg.data.image_size == 48  # the geometry of this trial's model, not the base's 32
    assert cfg.tracking.register == "" and cfg.tracking.tracking_uri == "sqlite:///x.db" and not cfg.eval.at_end
    assert trial_config(plan, {}, "t2").data.image_size == 32 and spec.base.data.image_size == 0  # base untouched


def test_knob_eval_loads_ema_weights_through_the_one_loader(tmp_path):
    import torch

    from pipeline.modeling import build_model
    from pipeline.sweep.knob_eval import load_for_eval
    from pipeline.sweep.register import _selected_config
    from pipeline.train import checkpointing

    cfg = load_sweep(IMAGENET_SWEEPS, IMAGENET_PRESETS, "smoke").base
    model = build_model(cfg.model, 3)
    ema = {k: v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta = {"experiment": cfg.to_dict(), "num_classes": 3, "classes": ["a", "b", "c"]}
    checkpointing.save_state(tmp_path, {"model": model.state_dict(), "ema": ema, "step": 7}, meta)
    loaded, got_meta, step = load_for_eval(str(tmp_path), "", "cpu")
    assert step == 7 and got_meta["classes"] == ["a", "b", "c"]
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())  # the EMA copy, not the raw weights
    # The selected point's config carries its knob as the real field, so a registered model loads at it.
    selected = _selected_config(meta, KnobSetting("model.ats_ratio", 0.5), "reg", ["best"])
    assert selected.model.ats_ratio == 0.5 and selected.model.ats_k is None
    assert selected.tracking.register == "reg" and selected.tracking.aliases == ("best",)


def test_frontier_csv_and_plot(tmp_path):
    import csv

    from pipeline.sweep.report import plot_frontier, write_frontier_csv

    rows = [dict(r) for r in ROWS]
    path = write_frontier_csv(rows, tmp_path / "frontier.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial_id"] for r in table if r["pareto"] == "1"] == ["a", "b", "d"]  # f is stopped: not on the front
    png = plot_frontier(rows, select_rows(rows, "best"), tmp_path / "frontier.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_tome_and_evit_knobs_are_config_fields_sweep_axes_and_set_the_model():
    """ToMe's r and EViT's keep rate: knobs like ATS's K (a sweep's inference axis, applied by build_model),
    and fewer measured GFLOPs at more reduction."""
    from models.flops import count_flops
    from pipeline.modeling import build_model

    _, settings = parse_space({"model.tome_r": {"grid": [0, 4, [2, 4, 6, 0]]}, "model.evit_keep_rate": [0.5]}, BASE)
    assert [s.label for s in settings] == ["r_0", "r_4", "r_2-4-6-0", "keep_0.5"]
    small = "model.kwargs={img_size: 32, patch_size: 4, depth: 4, embed_dim: 64, num_heads: 2}"
    flops = {}
    for name, key, values in (("deit_small_tome", "model.tome_r", (0, 8)),
                              ("deit_small_evit", "model.evit_keep_rate", (1.0, 0.5))):
        for value in values:
            cfg = resolve_config(IMAGENET_PRESETS, "smoke", [f"model.name={name}", small, f"{key}={value}"])
            model = build_model(cfg.model, num_classes=10).eval()
            assert getattr(model, key.split(".")[1]) == value  # set on the model as configured
            flops[name, value] = count_flops(model, torch.randn(1, 3, 32, 32)).gflops
    assert flops["deit_small_tome", 8] < flops["deit_small_tome", 0]
    assert flops["deit_small_evit", 0.5] < flops["deit_small_evit", 1.0]


@pytest.mark.parametrize("override, message", [
    ("model.tome_r=-1", "tokens r >= 0"), ("model.evit_keep_rate=0", "keep rate in (0, 1]"),
    ("model.evit_keep_rate=[0.5, 1.5]", "keep rate in (0, 1]")])
def test_bad_tome_and_evit_knobs_name_the_field(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        resolve_config(IMAGENET_PRESETS, "smoke", ["model.name=deit_small_tome", override])
