"""Names of the video decoder backends, and how a name becomes a backend object (no decoder is imported here).

:class:`datasets.specs.VideoSpec` validates ``decoder=`` against :func:`decoder_names` without
loading any decoding library; :func:`get_backend` imports a backend's module on first use, in the
process that decodes (a DataLoader worker, or the decode process of a watchdog).

A backend is any object with ``name``, ``available() -> (ok, reason)`` and ``open(data) -> source``
(see :class:`datasets.decoders.base.DecoderBackend`). :func:`register_decoder` adds one; the tests use
it for decoders made to hang or crash. A registered backend is known to the processes forked after
the registration (DataLoader workers, decode processes), not to spawned ones.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AUTO", "BUILTIN_DECODERS", "decoder_names", "get_backend", "register_decoder"]

AUTO = "auto"
# name -> "module:class" of the built-in backends, imported lazily.
BUILTIN_DECODERS: dict[str, str] = {
    "torchcodec": "datasets.decoders.torchcodec_backend:TorchCodecBackend",
    "pyav": "datasets.decoders.pyav_backend:PyAVBackend",
    "decord": "datasets.decoders.decord_backend:DecordBackend",
}
_registered: dict[str, Any] = {}  # name -> backend object (tests, plug-ins)
_instances: dict[str, Any] = {}  # built-in backends created in this process


def decoder_names() -> tuple[str, ...]:
    """Every value ``VideoSpec.decoder`` accepts: ``auto``, the built-in backends, then registered ones."""
    return (AUTO, *BUILTIN_DECODERS, *(n for n in _registered if n not in BUILTIN_DECODERS))


def register_decoder(name: str, backend: Any) -> None:
    """Make ``backend`` selectable as ``decoder=name`` (a new name; the built-in ones cannot be replaced)."""
    if name == AUTO or name in BUILTIN_DECODERS:
        raise ValueError(f"{name!r} is a built-in decoder name and cannot be re-registered")
    for attr in ("available", "open"):
        if not callable(getattr(backend, attr, None)):
            raise TypeError(f"a decoder backend needs an {attr}() method, {type(backend).__name__} has none")
    _registered[name] = backend


def get_backend(name: str) -> Any:
    """The backend object called ``name`` (not ``auto``: resolve it first), created once per process."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN_DECODERS:
        raise ValueError(f"unknown video decoder {name!r}; choose one of {'|'.join(decoder_names())}")
    if name not in _instances:
        module, cls = BUILTIN_DECODERS[name].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]
