"""torchcodec backend: PyTorch's decoder, on the FFmpeg shared libraries of the system (4 to 9).

``VideoDecoder(bytes, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC")``: the
bytes are decoded in memory; the exact mode scans the packets once when opened (no decoding), so
frame ``i`` is the ``i``-th presentation timestamp, and ``get_frames_at`` seeks to the key frame
before a needed frame only when that skips decoding. ``NHWC`` is FFmpeg's native layout: the
frames come out without a transpose.

torchcodec installs everywhere but needs FFmpeg's shared libraries (``libavcodec.so.N``...) at run
time; :meth:`TorchCodecBackend.available` loads them and decodes a tiny H.264 clip once per
process, which is what ``decoder=auto`` relies on.
"""

from __future__ import annotations

import functools

import numpy as np

from datasets.decoders.base import VideoDecodeError, check_indices, one_line, sorted_unique

__all__ = ["TorchCodecBackend", "TorchCodecSource"]


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    try:
        import torchcodec
        from torchcodec.decoders import VideoDecoder
    except Exception as e:  # noqa: BLE001 - ImportError, or torch/torchcodec version mismatch (OSError...)
        return False, f"torchcodec cannot be imported ({type(e).__name__}: {one_line(e)})"
    try:
        from torchcodec._logging import set_log_level
    except ImportError:  # pragma: no cover - other torchcodec layouts: its default is OFF anyway
        pass
    else:
        set_log_level("OFF")  # no FFmpeg or torchcodec messages on stderr: errors arrive as exceptions
    if getattr(torchcodec, "ffmpeg_major_version", None) is None:
        return False, "torchcodec found no FFmpeg shared libraries (libavcodec, libavformat, libavutil...)"
    from datasets.encode import encode_video  # PyAV's bundled encoder makes the probe clip

    clip = encode_video(np.full((2, 16, 16, 3), 128, np.uint8), 8)
    try:
        frames = VideoDecoder(clip, num_ffmpeg_threads=1, dimension_order="NHWC").get_frames_at([1]).data
    except Exception as e:  # noqa: BLE001 - an FFmpeg without an H.264 decoder, broken libraries...
        return False, f"torchcodec cannot decode H.264 with FFmpeg {torchcodec.ffmpeg_major_version} ({one_line(e)})"
    if tuple(frames.shape) != (1, 16, 16, 3):
        return False, f"torchcodec decoded a probe clip to shape {tuple(frames.shape)}"
    return True, ""


class TorchCodecBackend:
    name = "torchcodec"

    def available(self) -> tuple[bool, str]:
        return _probe()

    def open(self, data: bytes) -> TorchCodecSource:
        ok, why = _probe()
        if not ok:
            raise RuntimeError(f"decoder 'torchcodec' is not usable here: {why}")
        return TorchCodecSource(data)


class TorchCodecSource:
    """A torchcodec ``VideoDecoder`` over in-memory bytes. Use through :class:`TorchCodecBackend`."""

    decoder = "torchcodec"

    def __init__(self, data: bytes) -> None:
        from torchcodec.decoders import VideoDecoder

        if not data:
            raise VideoDecodeError("torchcodec cannot open 0 bytes")
        try:
            self._decoder = VideoDecoder(data, seek_mode="exact", num_ffmpeg_threads=1, dimension_order="NHWC",
                                         device="cpu")
        except (RuntimeError, ValueError) as e:
            raise VideoDecodeError(f"torchcodec cannot open {len(data)} bytes: {one_line(e)}") from None
        self.num_frames = len(self._decoder)
        if self.num_frames <= 0:
            self.close()
            raise VideoDecodeError(f"torchcodec found no frames in {len(data)} bytes")

    def get(self, indices: np.ndarray) -> np.ndarray:
        idx = check_indices(indices, self.num_frames)
        uniq, inverse = sorted_unique(idx)
        try:
            frames = self._decoder.get_frames_at(uniq.tolist()).data.numpy()  # (U, H, W, 3) uint8
        except (RuntimeError, ValueError, IndexError) as e:
            raise VideoDecodeError(f"torchcodec failed to decode frames {uniq[:5].tolist()}...: {one_line(e)}") from None
        return frames if inverse is None else frames[inverse]

    def close(self) -> None:
        self._decoder = None
