"""Configuration: presets, dotted overrides, and errors that name the key."""

import pytest

from pipeline.config import ConfigError, ExperimentConfig, parse_overrides, parse_views, resolve_config
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
