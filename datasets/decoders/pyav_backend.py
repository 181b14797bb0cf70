"""PyAV backend: FFmpeg through PyAV's own bundled libraries, always installed (``av`` is a dependency).

Opening indexes the stream without decoding anything: every packet is demuxed once for its
timestamp and key-frame flag, so frame ``i`` is the ``i``-th smallest presentation timestamp (the
numbering torchcodec's exact mode and decord use). ``get`` then decodes only what it must: for each
needed frame in increasing order it either keeps decoding forward (the next needed frame is in the
same group of pictures) or seeks to the key frame at or before it (it is past the next key frame),
and converts to RGB only the frames asked for. Streams whose packets carry no timestamps are decoded
sequentially from the start instead.

One FFmpeg thread (decoder ``thread_count = 1``, swscale ``threads=1``): a loader worker uses one core.
"""

from __future__ import annotations

import io

import numpy as np

from datasets.decoders.base import VideoDecodeError, check_indices, one_line, sorted_unique

__all__ = ["PyAVBackend", "PyAVSource"]


class PyAVBackend:
    name = "pyav"

    def available(self) -> tuple[bool, str]:
        try:
            import av  # noqa: F401
        except ImportError as e:  # pragma: no cover - av is a hard dependency
            return False, f"PyAV is not installed ({e})"
        return True, ""

    def open(self, data: bytes) -> PyAVSource:
        return PyAVSource(data)


def quiet_pyav() -> None:
    """Silence FFmpeg's own log inside PyAV's bundled libavutil (errors reach us as exceptions)."""
    import av.logging

    av.logging.set_libav_level(av.logging.PANIC)


def _rgb(frame) -> np.ndarray:
    """``uint8 (H, W, 3)`` RGB of a decoded frame, converted by swscale on ONE thread.

    PyAV's default (``threads=0``: one swscale thread per CPU) starts threads for every conversion:
    measured 55-117 us per 32x32 frame against 10 us single-threaded, and a worker would use every core.
    """
    global _SWSCALE_THREADS_ARG
    if _SWSCALE_THREADS_ARG:
        try:
            return frame.to_ndarray(format="rgb24", threads=1)
        except TypeError:  # a PyAV without the argument (older than the tested 18): its default then
            _SWSCALE_THREADS_ARG = False
    return frame.to_ndarray(format="rgb24")


_SWSCALE_THREADS_ARG = True


class PyAVSource:
    """PyAV container over in-memory bytes. Use through :class:`PyAVBackend`."""

    decoder = "pyav"

    def __init__(self, data: bytes) -> None:
        import av  # local: keeps importing the package light when another backend decodes

        self._av = av
        self._container = None
        try:
            self._container = av.open(io.BytesIO(data), mode="r")
            if not self._container.streams.video:
                raise VideoDecodeError(f"no video stream in {len(data)} bytes")
            self._stream = self._container.streams.video[0]
            self._stream.thread_count = 1  # one core per loader worker
            pts, key = self._index()
        except VideoDecodeError:
            self.close()
            raise
        except (av.error.FFmpegError, ValueError, UnicodeDecodeError) as e:
            self.close()
            raise VideoDecodeError(f"PyAV cannot open {len(data)} bytes: {one_line(e)}") from None
        if pts is None:  # no timestamps: count packets, decode sequentially
            self.num_frames = int(key)
            self._pts = None
        else:
            self.num_frames = len(pts)
            self._pts = pts
            self._index_of = {int(p): i for i, p in enumerate(pts)}
            self._keys = key  # sorted frame indices of the key frames
        if self.num_frames <= 0:
            self.close()
            raise VideoDecodeError(f"PyAV found no frames in {len(data)} bytes")

    def _index(self) -> tuple[np.ndarray | None, np.ndarray | int]:
        """(sorted presentation timestamps, frame indices of key frames), or ``(None, packet count)``."""
        stamps, keys, count = [], [], 0
        for packet in self._container.demux(self._stream):
            if packet.size == 0:
                continue  # the flush packet at the end
            count += 1
            if packet.pts is None:
                stamps = None
            elif stamps is not None:
                stamps.append(packet.pts)
                if packet.is_keyframe:
                    keys.append(packet.pts)
        if stamps is None or not keys:
            return None, count
        pts = np.sort(np.asarray(stamps, dtype=np.int64))
        return pts, np.searchsorted(pts, np.sort(np.asarray(keys, dtype=np.int64)))

    def get(self, indices: np.ndarray) -> np.ndarray:
        idx = check_indices(indices, self.num_frames)
        uniq, inverse = sorted_unique(idx)
        try:
            frames = self._decode_sequential(uniq) if self._pts is None else self._decode_seeking(uniq)
        except self._av.error.FFmpegError as e:
            raise VideoDecodeError(f"PyAV failed to decode frames {uniq[:5].tolist()}...: {one_line(e)}") from None
        return frames if inverse is None else frames[inverse]

    def _decode_seeking(self, uniq: np.ndarray) -> np.ndarray:
        out: list[np.ndarray] = []
        frames = None  # the decode iterator, positioned after frame ``last``
        last = -1
        for target in uniq.tolist():
            key = int(self._keys[max(np.searchsorted(self._keys, target, side="right") - 1, 0)])
            if frames is None or key > last:  # the target is past the next key frame: jump there
                self._container.seek(int(self._pts[key]), stream=self._stream, backward=True, any_frame=False)
                frames = self._container.decode(self._stream)
                last = -1
            for frame in frames:
                i = self._index_of.get(frame.pts, -1) if frame.pts is not None else -1
                if i < 0:
                    continue
                last = i
                if i >= target:
                    break
            else:
                raise VideoDecodeError(f"video ended before frame {target} (container lists {self.num_frames})")
            if last != target:
                raise VideoDecodeError(f"frame {target} is missing from the decoded stream (got frame {last})")
            out.append(_rgb(frame))  # (H, W, 3): only needed frames are converted
        return np.stack(out)  # (U, H, W, 3)

    def _decode_sequential(self, uniq: np.ndarray) -> np.ndarray:
        self._container.seek(0)
        out: list[np.ndarray] = []
        want = iter(uniq.tolist())
        target = next(want)
        for i, frame in enumerate(self._container.decode(self._stream)):
            if i == target:
                out.append(_rgb(frame))
                target = next(want, -1)
                if target < 0:
                    return np.stack(out)
        raise VideoDecodeError(f"video ended before frame {target} (container lists {self.num_frames})")

    def close(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            container.close()
