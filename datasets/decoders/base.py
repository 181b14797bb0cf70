"""What every video decoder backend provides, and the helpers they share.

A backend (``name``, ``available()``, ``open(data)``) opens the encoded bytes of one tar member
(mp4, webm, ...) in memory, with no temporary file, and returns a :class:`VideoSource`: the frame
count, and ``get(indices)`` decoding only the frames asked for. Frame ``i`` is the ``i``-th frame in
presentation order (sorted timestamps), for every backend: on the same H.264 clips they return
bit-equal RGB frames (``tests/test_decoders.py`` checks it, seeks included).

Errors: bytes a backend cannot open or decode raise :class:`VideoDecodeError` with a one-line
message (no C++ source paths, no stack); out-of-range indices raise ``IndexError``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = [
    "DecodeTimeout",
    "DecoderBackend",
    "DecoderCrash",
    "VideoDecodeError",
    "VideoSource",
    "check_indices",
    "one_line",
    "sorted_unique",
]


class VideoDecodeError(ValueError):
    """Bytes that FFmpeg cannot open or decode as a video (garbage, truncated file, no video stream)."""


class DecodeTimeout(VideoDecodeError):
    """A decode that did not finish within the watchdog's timeout (its process was killed)."""


class DecoderCrash(VideoDecodeError):
    """The process decoding a clip died (a signal such as SIGSEGV, or an exit) before answering."""


class VideoSource(Protocol):
    """An opened video: its frame count and a way to decode frames by index."""

    decoder: str
    num_frames: int

    def get(self, indices: np.ndarray) -> np.ndarray:
        """Frames at ``indices`` (any order, repeats allowed) as ``uint8 (len(indices), H, W, 3)`` RGB."""
        ...

    def close(self) -> None:
        """Release the native decoder now (not whenever the garbage collector runs)."""
        ...


class DecoderBackend(Protocol):
    """One decoding library behind the common interface."""

    name: str

    def available(self) -> tuple[bool, str]:
        """``(True, "")`` when the backend can decode in this process, else ``(False, why)``."""
        ...

    def open(self, data: bytes) -> VideoSource:
        """Open encoded video bytes; :class:`VideoDecodeError` when they cannot be read as a video."""
        ...


def check_indices(indices: Sequence[int] | np.ndarray, n: int) -> np.ndarray:
    """Validate requested frame indices against a video of ``n`` frames; returns an int64 array."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"frame indices must be a non-empty 1-D sequence, got shape {idx.shape}")
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"frame indices must be integers, got dtype {idx.dtype}")
    bad = idx[(idx < 0) | (idx >= n)]
    if bad.size:
        raise IndexError(
            f"frame indices {bad[:5].tolist()}{'...' if bad.size > 5 else ''} out of range "
            f"for a video of {n} frames (valid: 0..{n - 1})"
        )
    return idx.astype(np.int64, copy=False)


def sorted_unique(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(sorted unique indices, positions re-expanding them to ``idx``, or ``None`` when ``idx`` is already
    sorted and unique): ``u[inv] == idx``. Decoders read forward, so they are asked for ``u``."""
    if idx.size == 1 or bool(np.all(idx[1:] > idx[:-1])):
        return idx, None
    uniq, inverse = np.unique(idx, return_inverse=True)
    return uniq, inverse.reshape(-1)


# "SingleStreamDecoder, /path/to/SingleStreamDecoder.cpp:68, Failed to open input buffer: ..." (torchcodec)
# "[18:32:41] /github/workspace/src/video/video_reader.cc:83: ERROR opening: ..." (decord, dmlc logging)
_NATIVE_PREFIX = re.compile(r"^(?:\w+, )?(?:\[[\d:]+\] )?\S+\.(?:cpp|cc|c|h):\d+:?,? ")
# "[Errno 1094995529] Invalid data found when processing input: '<none>'" (PyAV's FFmpegError)
_ERRNO = re.compile(r"^\[Errno -?\d+\] (.*?)(?:: '<none>')?$")


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception from a native decoder as one short line: first line, source-file prefixes removed."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    while True:
        stripped = _NATIVE_PREFIX.sub("", text, count=1)
        if stripped == text:
            break
        text = stripped
    text = _ERRNO.sub(r"\1", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
