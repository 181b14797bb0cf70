"""Defaults <- preset <- YAML file <- dotted overrides, validated into one ExperimentConfig."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config.overrides import as_assignments, load_yaml, set_dotted
from pipeline.config.schema import ConfigError, ExperimentConfig

Preset = Mapping[str, Any]


def merge(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """``patch`` merged into ``base``: mappings key by key, everything else replaced."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), dict) else v
    return out


def apply_params(base: ExperimentConfig | Mapping[str, Any], params: Mapping[str, Any]) -> ExperimentConfig:
    """The base config with each dotted ``key: value`` of ``params`` set, validated (the base is unchanged)."""
    data = base.to_dict() if isinstance(base, ExperimentConfig) else dict(base)
    for key, value in params.items():
        data = set_dotted(data, key, value)
    return ExperimentConfig.from_dict(data)


def resolve_config(presets: Mapping[str, Preset], preset: str,
                   overrides: Sequence[str] | Mapping[str, Any] = (),
                   config_file: str | Path | None = None) -> ExperimentConfig:
    """Defaults <- preset <- YAML file <- dotted overrides (``KEY=VALUE`` strings or a mapping)."""
    if preset not in presets:
        raise ConfigError(f"unknown preset {preset!r}; presets: {', '.join(presets)}")
    data = merge(ExperimentConfig().to_dict(), presets[preset])
    if config_file:
        loaded = load_yaml(Path(config_file).read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{config_file}: expected a mapping at top level")
        data = merge(data, loaded)
    for key, value in as_assignments(overrides, "overrides").items():
        data = _merge_dotted(data, key, value)
    return ExperimentConfig.from_dict(data)


def _merge_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """Set ``key``; a mapping value is merged into the section already there (``model.kwargs={depth: 2}``)."""
    node: Any = data
    for p in key.split("."):
        node = node.get(p) if isinstance(node, Mapping) else None
    if isinstance(value, Mapping) and isinstance(node, Mapping):
        value = merge(node, value)
    return set_dotted(data, key, value)
