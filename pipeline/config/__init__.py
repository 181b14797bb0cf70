"""Typed experiment configuration: flat dataclasses per concern, named presets, dotted overrides.

A job resolves its configuration once (preset, then ``key.sub=value`` overrides from the command
line), :func:`pipeline.context.finalize` fills in what the model and the run decide (name, storage,
data geometry, evaluation views), the job prints it, and the same dict goes to every Ray worker, to
MLflow and into every checkpoint. Nothing mutates a resolved config (STYLE.md #16).

    cfg = resolve_config(KINETICS_PRESETS, "demo", ["train.epochs=3", "model.name=frame_tcn_small"])
"""

from pipeline.config.checks import parse_views
from pipeline.config.overrides import (
    as_assignments,
    load_yaml,
    nest,
    parse_assignments,
    parse_key_values,
    parse_overrides,
    parse_value,
    set_dotted,
)
from pipeline.config.resolve import Preset, apply_params, merge, resolve_config
from pipeline.config.schema import (
    ClusterConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    ExperimentConfig,
    ModelConfig,
    TrackingConfig,
    TrainConfig,
    flatten,
)

__all__ = ["ClusterConfig", "ConfigError", "DataConfig", "EvalConfig", "ExperimentConfig", "ModelConfig", "Preset",
           "TrackingConfig", "TrainConfig", "apply_params", "as_assignments", "flatten", "load_yaml", "merge", "nest",
           "parse_assignments", "parse_key_values", "parse_overrides", "parse_value", "parse_views",
           "resolve_config", "set_dotted"]
