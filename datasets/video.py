"""Decode the frames a clip needs from encoded video bytes (mp4, webm, ...): the one-call forms.

torchvision's video API is gone (0.28), so webdataset's built-in video decoder cannot be used:
Glimpse decodes the bytes of a shard sample itself, with the backends of :mod:`datasets.decoders`
(torchcodec, PyAV, decord; ``decoder="auto"``: torchcodec where FFmpeg's libraries load, else PyAV).

- :func:`open_video` returns a :class:`~datasets.decoders.VideoSource` (frame count + ``get(indices)``)
  so that a caller opens each video once, reads its length, picks a clip and decodes it;
- :func:`decode_frames` / :func:`num_frames` are the one-call forms.

These decode in the calling process. The loaders decode through
:class:`datasets.decoders.watchdog.DecodeWatchdog` instead, which abandons a decode that hangs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from datasets.decoders import (
    VideoDecodeError,
    VideoSource,
    available_decoders,
    decoder_names,
    open_video_source,
    resolve_decoder,
)

__all__ = [
    "VideoDecodeError",
    "VideoSource",
    "available_decoders",
    "decode_frames",
    "num_frames",
    "open_video",
    "resolve_decoder",
]


@contextmanager
def open_video(data: bytes, *, decoder: str = "auto") -> Iterator[VideoSource]:
    """Open encoded video bytes for decoding; the decoder is released when the block exits.

    Raises :class:`VideoDecodeError` for bytes the backend cannot read (garbage, truncated file, no
    video stream). Out-of-range indices given to ``get`` raise ``IndexError``.

    Example::

        with open_video(mp4_bytes) as video:             # torchcodec, or PyAV without FFmpeg
            idx = sampler(video.num_frames, rng).indices   # e.g. [0, 4, 8, ...]
            frames = video.get(idx)                        # uint8 (T, H, W, 3)
    """
    if decoder not in decoder_names():
        raise ValueError(f"unknown video decoder {decoder!r}; choose one of {'|'.join(decoder_names())}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"video data must be bytes, got {type(data).__name__}")
    src = open_video_source(bytes(data), decoder)
    try:
        yield src
    finally:
        src.close()


def decode_frames(data: bytes, indices: Sequence[int], *, decoder: str = "auto") -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed): ``uint8 (len(indices), H, W, 3)``.

    Only the needed frames are decoded (each backend seeks to the key frame before them).
    ``decode_frames(b, [8, 0, 0])`` decodes frames 0 and 8 once each and returns
    ``[frame8, frame0, frame0]``.
    """
    with open_video(data, decoder=decoder) as video:
        return video.get(np.asarray(indices))


def num_frames(data: bytes, *, decoder: str = "auto") -> int:
    """The video's frame count (from its packets' timestamps; no frame is decoded)."""
    with open_video(data, decoder=decoder) as video:
        return video.num_frames
