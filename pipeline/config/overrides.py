"""The one ``KEY=VALUE`` parser: command-line overrides, sweep overrides and search-space keys,
``--model-kwargs``.

A value is read as a Python literal when it is one (``3``, ``1e-3``, ``None``, ``(32, 64)``), else as
YAML (``true``, ``[32, 64]``, ``{img_size: 32}``), else kept as the string (``avg``, ``2x1``,
``models:/m@best``). Keys are dotted paths into the nested config (``model.kwargs.img_size``).

    >>> parse_assignments(["train.lr=1e-3", "model.kwargs.dims=(32, 64)", "eval.views=2x1"])
    {'train.lr': 0.001, 'model.kwargs.dims': (32, 64), 'eval.views': '2x1'}
    >>> nest({"a.b.c": 1, "a.d": "x"})
    {'a': {'b': {'c': 1}, 'd': 'x'}}
"""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from pipeline.config.schema import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: ``1e-3`` and ``5E-5`` are numbers (YAML 1.1, PyYAML's
    default, needs a dot in the mantissa and reads ``1e-3`` as the string '1e-3')."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"
               r"|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """YAML as Glimpse reads it everywhere (config files, sweep files, values): ``1e-3`` is a float."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def parse_value(text: str) -> Any:
    """A command-line value: a Python literal, else YAML (:func:`load_yaml`), else the string itself ("" stays "").

    >>> parse_value("1e-3"), parse_value("{lr: 1e-3}"), parse_value("2x1")
    (0.001, {'lr': 0.001}, '2x1')
    """
    text = text.strip()
    if not text:
        return ""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        return text


def _check_key(key: str, item: str) -> str:
    key = key.strip()
    if not key or not all(key.split(".")):
        raise ConfigError(f"{item!r}: empty key part")
    return key


def parse_assignments(items: Sequence[str], *, form: str = "key.sub=value") -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}`` (in order; a later key wins)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form {form}")
        out[_check_key(key, item)] = parse_value(raw)
    return out


def as_assignments(value: Mapping[str, Any] | Sequence[str] | None, where: str) -> dict[str, Any]:
    """Overrides given as ``KEY=VALUE`` strings or as a mapping of dotted keys (sweep files): flat dict."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {_check_key(str(k), str(k)): v for k, v in value.items()}
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return parse_assignments(value)
    raise ConfigError(f"{where}: overrides must be a mapping or a list of key=value strings, got {value!r}")


def set_dotted(data: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with the dotted ``key`` set to ``value`` (sections made as needed)."""
    out = copy.deepcopy(dict(data))
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {p} is not a section")
    node[parts[-1]] = value
    return out


def nest(assignments: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys -> one nested dict."""
    out: dict[str, Any] = {}
    for key, value in assignments.items():
        out = set_dotted(out, key, value)
    return out


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "model.kwargs.img_size=64"]`` -> the nested dict to merge into a config."""
    return nest(parse_assignments(items))


def parse_key_values(items: Sequence[str], option: str = "--model-kwargs") -> dict[str, Any]:
    """``["img_size=64", "dims=(32, 64)", "global_pool=avg"]`` -> constructor kwargs (one level)."""
    try:
        return parse_assignments(items, form="KEY=VALUE")
    except ConfigError as exc:
        raise ConfigError(f"{option} expects KEY=VALUE: {exc}") from None
