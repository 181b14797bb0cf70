"""Video decoder backends behind one interface: torchcodec, PyAV, decord; selected by ``VideoSpec.decoder``.

- ``torchcodec`` (PyTorch's decoder, on the system's FFmpeg shared libraries): the default wherever
  those libraries load;
- ``pyav`` (FFmpeg bundled in PyAV's wheels): always there;
- ``decord`` (optional extra ``glimpse[decord]``): kept for comparison, never chosen by ``auto``
  (it leaks memory on failed decodes, see :mod:`datasets.decoders.decord_backend`);
- ``auto``: torchcodec if it loads and decodes a probe clip, else PyAV, with ONE logged notice per
  process saying why and how to get FFmpeg.

Every backend decodes from the bytes of the tar member (no temporary file), decodes only the frames
asked for (seeking to the key frame before them), uses one FFmpeg thread (one core per loader
worker), and returns the same RGB frames for the same indices: bit-equal on H.264 clips
(``tests/test_decoders.py``). Backend objects are created in the process that decodes, on first use
(:func:`registry.get_backend`); what crosses a pickle or a fork is only a decoder *name*.

:func:`open_video_source` opens bytes in this process; :class:`datasets.decoders.watchdog.DecodeWatchdog`
runs the same decode in a child process with a timeout.
"""

from __future__ import annotations

import logging
import threading

from datasets.decoders.base import (
    DecoderBackend,
    DecoderCrash,
    DecodeTimeout,
    VideoDecodeError,
    VideoSource,
    check_indices,
    one_line,
)
from datasets.decoders.registry import AUTO, decoder_names, get_backend, register_decoder

__all__ = [
    "AUTO",
    "FFMPEG_HELP",
    "DecodeTimeout",
    "DecoderBackend",
    "DecoderCrash",
    "VideoDecodeError",
    "VideoSource",
    "available_decoders",
    "check_indices",
    "decoder_available",
    "decoder_names",
    "get_backend",
    "one_line",
    "open_video_source",
    "quiet_native_logs",
    "register_decoder",
    "resolve_decoder",
]

logger = logging.getLogger(__name__)

FFMPEG_HELP = ("install FFmpeg's shared libraries for torchcodec: `make install` (as root on Debian/Ubuntu), "
               "`apt-get install ffmpeg`, or `conda install -c conda-forge ffmpeg`")
_lock = threading.Lock()
_auto_choice: str | None = None
_quieted = False


def decoder_available(name: str) -> tuple[bool, str]:
    """``(ok, reason)`` for a concrete decoder name in this process."""
    try:
        backend = get_backend(name)
    except ValueError as e:
        return False, str(e)
    return backend.available()


def available_decoders() -> list[str]:
    """The concrete backends that decode in this process (built-in first, in preference order)."""
    return [n for n in decoder_names() if n != AUTO and decoder_available(n)[0]]


def resolve_decoder(name: str) -> str:
    """A concrete backend name for ``name``: ``auto`` becomes ``torchcodec`` or, without FFmpeg, ``pyav``.

    The fallback is logged once per process (a WARNING naming the cause and the fix). A concrete name
    that cannot decode here raises ``RuntimeError`` with the reason (an explicit choice is never swapped).
    """
    global _auto_choice
    if name != AUTO:
        ok, why = decoder_available(name)
        if not ok:
            hint = f"; {FFMPEG_HELP}" if name == "torchcodec" else ""
            raise RuntimeError(f"video decoder {name!r} is not usable here: {why}{hint}")
        return name
    with _lock:
        if _auto_choice is None:
            ok, why = decoder_available("torchcodec")
            _auto_choice = "torchcodec" if ok else "pyav"
            if not ok:
                logger.warning("decoder=auto: decoding video with PyAV, because %s. For torchcodec (the "
                               "default), %s.", why, FFMPEG_HELP)
        return _auto_choice


def quiet_native_logs() -> None:
    """Turn FFmpeg's own stderr logging off in this process, for PyAV's bundled copy (torchcodec's and
    decord's are set by their backends when loaded): decode errors reach the loader as exceptions and are
    logged as one line naming the shard and key."""
    global _quieted
    if _quieted:
        return
    from datasets.decoders.pyav_backend import quiet_pyav

    quiet_pyav()
    _quieted = True


def open_video_source(data: bytes, decoder: str) -> VideoSource:
    """Open encoded video bytes with a concrete backend (``auto`` is resolved first) in this process."""
    quiet_native_logs()
    return get_backend(resolve_decoder(decoder)).open(data)
