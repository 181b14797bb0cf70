"""Configuration: presets, dotted overrides, and errors that name the key."""

import pytest

from pipeline.cli import resolve_from_args, training_parser
from pipeline.config import (
    ConfigError,
    ExperimentConfig,
    load_yaml,
    parse_overrides,
    parse_value,
    parse_views,
    resolve_config,
)
from pipeline.presets import IMAGENET_PRESETS, KINETICS_PRESETS


@pytest.mark.parametrize("presets", [KINETICS_PRESETS, IMAGENET_PRESETS])
def test_every_preset_resolves(presets):
    for name in presets:
        cfg = resolve_config(presets, name)
        assert isinstance(cfg, ExperimentConfig)
        assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg  # round trip through plain dicts (Ray, checkpoints)


def test_overrides_are_typed_and_nested():
    cfg = resolve_config(KINETICS_PRESETS, "smoke", ["train.epochs=7", "train.lr=0.5", "model.kwargs.img_size=64",
                                                     "tracking.aliases=a,b", "train.deterministic=true"])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.lr, float) and cfg.train.lr == 0.5
    assert cfg.model.kwargs["img_size"] == 64 and cfg.model.kwargs["dims"] == [64, 128]  # merged, not replaced
    assert cfg.tracking.aliases == ("a", "b")
    assert cfg.train.deterministic is True


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key train.epoch"),
    ("trian.epochs=3", "unknown key trian"),
    ("train.epochs=abc", "train.epochs: expected an integer"),
    ("train.epochs=0", "train.epochs: must be > 0"),
    ("train.optimizer=lamb", "train.optimizer: 'lamb' is not one of"),
    ("eval.views=4by3", "eval.views"),
    ("train.lr=-1", "train.lr: must be >= 0"),
    ("train.lr=1e-6", "train.min_lr .1e-05. is above train.lr .1e-06."),
    ("noequals", "not of the form key.sub=value"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_config(KINETICS_PRESETS, "smoke", [override])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="presets: smoke, demo"):
        resolve_config(KINETICS_PRESETS, "nope")


def test_flat_params_and_yaml_file(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  epochs: 4\ndata:\n  num_frames: 4\n")
    cfg = resolve_config(KINETICS_PRESETS, "smoke", ["train.epochs=5"], config_file=f)
    assert cfg.train.epochs == 5 and cfg.data.num_frames == 4  # overrides win over the file
    flat = cfg.flat()
    assert flat["train.epochs"] == 5 and flat["model.name"] == "video_sparseformer_tiny"


def test_parse_helpers():
    assert parse_views("4x3") == (4, 3) and parse_views("1X1") == (1, 1)
    with pytest.raises(ConfigError):
        parse_views("2x2")
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_exponent_floats_parse_as_numbers(tmp_path):
    """``1e-3`` is a float on the command line, in a value and in a YAML file (YAML 1.1 reads a string)."""
    assert parse_value("1e-3") == 0.001 and isinstance(parse_value("5E-5"), float)
    assert parse_value("{lr: 1e-3}") == {"lr": 0.001}
    cfg = resolve_config(KINETICS_PRESETS, "smoke", ["train.lr=1e-3"])
    assert cfg.train.lr == 0.001
    f = tmp_path / "exp.yaml"
    f.write_text("train:\n  lr: 1e-3\n  min_lr: 1E-6\n  epochs: 3\n")
    cfg = resolve_config(KINETICS_PRESETS, "smoke", config_file=f)
    assert (cfg.train.lr, cfg.train.min_lr, cfg.train.epochs) == (0.001, 1e-6, 3)
    assert load_yaml("a: 1e3\nb: 7\nc: x1e3") == {"a": 1000.0, "b": 7, "c": "x1e3"}


def test_overrides_go_anywhere_on_the_command_line():
    parser = training_parser("train", KINETICS_PRESETS, "demo")
    argv = ["train.epochs=3", "--preset", "smoke", "--name", "my-run", "train.lr=1e-3", "--register", "m",
            "model.kwargs.img_size=64"]
    args = parser.parse_args(argv)
    assert (args.preset, args.name, args.register) == ("smoke", "my-run", "m")
    cfg = resolve_from_args(args, KINETICS_PRESETS)
    assert cfg.train.epochs == 3 and cfg.train.lr == 0.001 and cfg.model.kwargs["img_size"] == 64
    assert cfg.cluster.name == "my-run" and cfg.tracking.register == "m"
