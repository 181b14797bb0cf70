"""decord backend (optional: ``pip install 'glimpse[decord]'``), kept for comparison; never the default.

decord's last release is from 2021 and its tracker lists memory leaks (dmlc/decord#157, #208; here
about 14 KiB per *failed* decode, see ``jobs/benchmark_data.py --memory``), DataLoader deadlocks
(#220, #294) and a native loop that holds the GIL (#373). What this module does about them:

- ``VideoReader(io.BytesIO(data), num_threads=1)``: one decode thread, no read-ahead behind the
  consumer; frames copied out with ``asnumpy()``; the reader deleted as soon as the clip is decoded,
  so no reader crosses a fork;
- bytes that do not start like a video container are refused before decord sees them (decord
  echoes unreadable input to stderr, #299); decord's FFmpeg log is set to quiet;
- ``get_batch`` gets sorted unique indices (decord re-seeks on every backward jump);
- the decode watchdog (:mod:`datasets.decoders.watchdog`) runs it in a child process, which bounds
  a hang or a leak to that process.
"""

from __future__ import annotations

import io

import numpy as np

from datasets.decoders.base import VideoDecodeError, check_indices, one_line, sorted_unique

__all__ = ["DecordBackend", "DecordSource", "looks_like_container"]

_ISO_BMFF_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"styp"}


def looks_like_container(data: bytes) -> bool:
    """Whether ``data`` starts like a video container (mp4/mov, mkv/webm, avi, ts, flv, mpeg-ps)."""
    head = data[:12]
    return (
        head[4:8] in _ISO_BMFF_BOXES
        or head.startswith(b"\x1a\x45\xdf\xa3")  # Matroska / WebM (EBML)
        or (head.startswith(b"RIFF") and head[8:11] == b"AVI")
        or head.startswith((b"FLV", b"\x00\x00\x01\xba"))  # FLV, MPEG-PS
        or (len(data) > 188 and data[0] == 0x47 and data[188] == 0x47)  # MPEG-TS sync bytes
    )


class DecordBackend:
    name = "decord"

    def __init__(self) -> None:
        self._module = None

    def _decord(self):
        if self._module is None:
            import decord

            decord.logging.set_level(decord.logging.QUIET)
            self._module = decord
        return self._module

    def available(self) -> tuple[bool, str]:
        try:
            self._decord()
        except ImportError as e:
            return False, f"decord is not installed ({e}; pip install 'glimpse[decord]')"
        return True, ""

    def open(self, data: bytes) -> DecordSource:
        ok, why = self.available()
        if not ok:
            raise RuntimeError(f"decoder 'decord' is not usable here: {why}")
        return DecordSource(self._decord(), data)


class DecordSource:
    """decord ``VideoReader`` over in-memory bytes. Use through :class:`DecordBackend`."""

    decoder = "decord"

    def __init__(self, decord, data: bytes) -> None:
        if not looks_like_container(data):
            raise VideoDecodeError(f"decord cannot open {len(data)} bytes: not a video container")
        try:
            self._reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        except Exception as e:  # noqa: BLE001 - decord raises RuntimeError/DECORDError for unreadable input
            raise VideoDecodeError(f"decord cannot open {len(data)} bytes: {one_line(e)}") from None
        self.num_frames = len(self._reader)
        if self.num_frames <= 0:
            self.close()
            raise VideoDecodeError(f"decord found no frames in {len(data)} bytes")

    def get(self, indices: np.ndarray) -> np.ndarray:
        idx = check_indices(indices, self.num_frames)
        uniq, inverse = sorted_unique(idx)
        try:
            frames = self._reader.get_batch(uniq.tolist()).asnumpy()  # (U, H, W, 3) uint8, a copy
        except Exception as e:  # noqa: BLE001 - DECORDError/RuntimeError on corrupt packets
            raise VideoDecodeError(f"decord failed to decode frames {uniq[:5].tolist()}...: {one_line(e)}") from None
        return frames if inverse is None else frames[inverse]

    def close(self) -> None:
        self._reader = None  # drop the native reader now rather than at the next collection (#1)
