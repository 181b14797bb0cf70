"""In-memory video encoding and probing with PyAV.

Three small helpers used by the shard builders, the synthetic datasets and the tests:

- :func:`encode_video`: ``uint8 (T, H, W, 3)`` RGB frames -> mp4 bytes (H.264 by default);
- :func:`probe_video`: mp4 (or any container FFmpeg reads) bytes -> :class:`VideoInfo`;
- :func:`reencode_short_side`: scale a clip so its shorter side is ``short_side`` pixels,
  keeping the frame rate and (up to rounding to even sizes) the aspect ratio.

Everything happens in memory (``io.BytesIO``); nothing touches the file system.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from fractions import Fraction

import av
import numpy as np

from datasets.decoders.base import VideoDecodeError

__all__ = ["VideoInfo", "VideoDecodeError", "encode_video", "probe_video", "reencode_short_side"]

# Pixel formats with 2x2 chroma subsampling need even frame sizes.
_EVEN_SIZE_PIX_FMTS = {"yuv420p", "yuvj420p", "nv12", "yuv420p10le"}


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a clip.

    ``duration`` is in seconds: the container's (or stream's) duration when known, else
    ``num_frames / fps``.
    """

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int


# /proc/cpuinfo flag -> x264 CPU capability name (x264's own names, see x264_cpu_names).
_X264_CPU_NAMES = (
    ("sse", "MMX2"), ("sse", "SSE"), ("sse2", "SSE2"), ("pni", "SSE3"), ("ssse3", "SSSE3"),
    ("sse4_1", "SSE4.1"), ("sse4_2", "SSE4.2"), ("avx", "AVX"), ("fma", "FMA3"), ("bmi1", "BMI1"),
    ("bmi2", "BMI2"), ("avx2", "AVX2"), ("abm", "LZCNT"),
)


@functools.lru_cache(maxsize=1)
def _x264_params() -> str | None:
    """x264 CPU flags without AVX-512, or ``None`` to let x264 detect them.

    Why: on AVX-512 machines x264 (as bundled with PyAV 18) produced *different bytes for the same
    frames* at small sizes (32x32 clips: about 1 run in 10, depending on what was encoded before in
    the process), i.e. its AVX-512 code reads memory it never wrote. Synthetic shards must be
    byte-identical across runs, so we list every capability the CPU has except AVX-512; measured
    speed is the same as x264's auto detection on this machine.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    except OSError:
        return None
    if "avx512f" not in flags:
        return None
    names = [name for flag, name in _X264_CPU_NAMES if flag in flags]
    return "asm=" + ",".join(names)


def _x264_options(crf: int, keyframe_interval: int | None = None) -> dict[str, str]:
    # threads=1: x264's bitstream depends on its thread count, and we want identical bytes for
    # identical frames on any machine with the same library versions (synthetic data determinism).
    opts = {"crf": str(int(crf)), "threads": "1"}
    params = [p for p in [_x264_params()] if p]
    if keyframe_interval is not None:  # a key frame exactly every N frames (no scene-cut key frames)
        params.append(f"keyint={int(keyframe_interval)}:min-keyint={int(keyframe_interval)}:scenecut=0")
    if params:
        opts["x264-params"] = ":".join(params)
    return opts


def _rate(fps: float) -> Fraction:
    """A frame rate as the exact fraction containers store (29.97 -> 30000/1001)."""
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive finite number, got {fps!r}")
    return Fraction(fps).limit_denominator(1001)


def encode_video(
    frames: np.ndarray,
    fps: float,
    *,
    codec: str = "libx264",
    crf: int = 23,
    pix_fmt: str = "yuv420p",
    pad_odd: bool = False,
    keyframe_interval: int | None = None,
) -> bytes:
    """Encode RGB frames to an mp4 file in memory.

    Args:
        frames: ``uint8`` array ``(T, H, W, 3)``, RGB, ``T >= 1``.
        fps: frame rate written to the container (e.g. ``8`` or ``29.97``).
        codec: FFmpeg encoder name (``libx264``, ``mpeg4``, ...).
        crf: constant rate factor for x264 (0 = lossless, 23 = FFmpeg's default, 51 = worst).
        pix_fmt: encoder pixel format. ``yuv420p`` (the default, what every player reads) needs even
            ``H`` and ``W``.
        pad_odd: with an even-size pixel format and an odd ``H`` or ``W``, pad the last row/column by
            edge replication instead of raising.
        keyframe_interval: x264 only: a key frame every this many frames (default: x264's, at most every
            250 frames and at scene cuts). Small intervals make decoders seek (the decoder tests use 10).

    Returns:
        The mp4 file as bytes. Output is deterministic for identical inputs, library versions and
        CPU features (x264 runs single-threaded and without AVX-512 here, see ``_x264_params``).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(
            f"frames must be uint8 (T, H, W, 3) with T >= 1, got dtype={frames.dtype} shape={frames.shape}"
        )
    _, h, w, _ = frames.shape
    if pix_fmt in _EVEN_SIZE_PIX_FMTS and (h % 2 or w % 2):
        if not pad_odd:
            raise ValueError(
                f"pix_fmt={pix_fmt!r} needs even frame sizes, got H={h} W={w}; "
                "crop or resize the frames, or pass pad_odd=True"
            )
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=_rate(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, pix_fmt
        if codec == "libx264":
            stream.options = _x264_options(crf, keyframe_interval)
        else:
            stream.thread_count = 1
        for frame in frames:
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in stream.encode(vf):
                container.mux(packet)
        for packet in stream.encode(None):  # flush delayed frames (B-frames, lookahead)
            container.mux(packet)
    return buf.getvalue()


def _open(data: bytes) -> av.container.InputContainer:
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except (av.error.FFmpegError, ValueError) as e:
        raise VideoDecodeError(f"cannot open video ({len(data)} bytes): {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"no video stream in {len(data)} bytes of {container.format.name!r}")
    return container


def probe_video(data: bytes) -> VideoInfo:
    """Read the frame count, frame rate, duration and size of an encoded video.

    ``num_frames`` is the container's frame count when it records one (mp4 does), else the
    number of demuxed video packets (no decoding). Raises :class:`VideoDecodeError` for bytes
    FFmpeg cannot read.
    """
    container = _open(data)
    try:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        num_frames = int(stream.frames or 0)
        if num_frames <= 0:
            num_frames = sum(1 for p in container.demux(stream) if p.size > 0)
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = num_frames / fps if fps else 0.0
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot read video stream ({len(data)} bytes): {e}") from e
    finally:
        container.close()
    if num_frames <= 0 or width <= 0 or height <= 0:
        raise VideoDecodeError(
            f"video has no frames or no size ({len(data)} bytes): frames={num_frames} size={width}x{height}"
        )
    if fps <= 0:
        fps = num_frames / duration if duration > 0 else 0.0
    return VideoInfo(num_frames=num_frames, fps=fps, duration=duration, width=width, height=height)


def _even(x: float) -> int:
    return max(2, int(round(x / 2.0)) * 2)


def reencode_short_side(data: bytes, short_side: int, *, crf: int = 23) -> bytes:
    """Re-encode a video so that its shorter side is ``short_side`` pixels (H.264, yuv420p, mp4).

    The frame rate is kept and the longer side follows the aspect ratio, rounded to an even
    number (yuv420p). All frames are kept; audio is dropped. Raises :class:`VideoDecodeError`
    for unreadable input.
    """
    if short_side < 2:
        raise ValueError(f"short_side must be >= 2, got {short_side}")
    container = _open(data)
    try:
        src = container.streams.video[0]
        src.thread_type = "AUTO"
        rate = src.average_rate or src.guessed_rate or Fraction(25)
        w, h = src.codec_context.width, src.codec_context.height
        if w <= h:
            new_w, new_h = _even(short_side), _even(h * short_side / w)
        else:
            new_w, new_h = _even(w * short_side / h), _even(short_side)
        out_buf = io.BytesIO()
        with av.open(out_buf, mode="w", format="mp4") as out:
            dst = out.add_stream("libx264", rate=rate)
            dst.width, dst.height, dst.pix_fmt = new_w, new_h, "yuv420p"
            dst.options = _x264_options(crf)
            time_base = Fraction(1) / rate
            for i, frame in enumerate(container.decode(src)):
                scaled = frame.reformat(width=new_w, height=new_h, format="yuv420p")
                # Renumber frames at the source rate: keeps fps and frame count, drops timestamp jitter.
                scaled.pts, scaled.time_base = i, time_base
                for packet in dst.encode(scaled):
                    out.mux(packet)
            for packet in dst.encode(None):
                out.mux(packet)
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"cannot re-encode video ({len(data)} bytes): {e}") from e
    finally:
        container.close()
    return out_buf.getvalue()
