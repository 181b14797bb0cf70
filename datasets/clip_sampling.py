"""Clip samplers: which frame indices of a video make up a training clip or the evaluation clips.

PyTorchVideo style (``pytorchvideo/data/clip_sampling.py``): small callables returning a named
tuple, so that the arithmetic is testable on its own. A clip is ``T`` frames taken every ``s``
frames, i.e. it spans ``span = (T - 1) * s + 1`` frames of the video (the SparseFormer paper
trains on 32 frames at stride 4, span 125; TimeSformer on 8 frames at stride 32, span 225).

Videos shorter than the span repeat their last frame (PySlowFast's ``temporal_sampling`` clamps
indices to the last frame the same way): the clip keeps its stride, and indices past the end
read the last frame again.

Evaluation clips follow mmaction2 1.x's ``SampleFrames`` in test mode (``mmaction/datasets/transforms/
loading.py: SampleFrames._get_test_clips``, the 3D-recognizer branch without ``target_fps``): with
``delta = max(n - span, 0)``, clip ``k`` of ``K`` starts at ``round(k * (delta / (K - 1)))``, rounded as
NumPy rounds (half to even), so the first clip starts at frame 0 and the last one ends on the last frame;
a single clip (``K = 1``) is centred, ``start = delta // 2``. Glimpse computes the starts the same way, in
float64 with ``np.round``, so they equal mmaction2's for every video length. (PySlowFast's
``get_start_end_idx`` spaces its clips differently, at ``delta * k / K``; it is not the convention here.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "ClipInfo",
    "RandomClipSampler",
    "UniformClipSampler",
    "clip_span",
    "split_view_index",
    "union_indices",
    "view_index",
]


class ClipInfo(NamedTuple):
    """One clip of a video.

    Fields:
        indices: ``int64 (T,)`` frame indices in temporal order (repeats at the end for short videos).
        start: first frame index.
        end: one past the last frame read (``indices[-1] + 1``): the clip covers ``[start, end)``.
        clip_index: which of the ``K`` evaluation clips this is (``0`` for training clips).
    """

    indices: np.ndarray
    start: int
    end: int
    clip_index: int = 0


def clip_span(num_frames: int, stride: int) -> int:
    """Frames a clip of ``num_frames`` frames at ``stride`` covers: ``(T - 1) * s + 1``."""
    return (num_frames - 1) * stride + 1


def _check_geometry(num_frames: int, stride: int) -> None:
    if int(num_frames) != num_frames or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")


def _check_video_length(video_num_frames: int) -> None:
    if int(video_num_frames) != video_num_frames or video_num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got video_num_frames={video_num_frames!r}")


def _clip(start: int, num_frames: int, stride: int, video_num_frames: int, clip_index: int) -> ClipInfo:
    # Indices past the end repeat the last frame (PySlowFast); the stride is kept inside the video.
    indices = np.minimum(start + stride * np.arange(num_frames, dtype=np.int64), video_num_frames - 1)
    return ClipInfo(indices=indices, start=int(start), end=int(indices[-1]) + 1, clip_index=clip_index)


class RandomClipSampler:
    """Training clip: ``T`` frames at stride ``s`` from a uniformly random start.

    ``start`` is drawn uniformly from ``[0, max(0, n - span)]`` (both ends included), where ``n`` is
    the video's frame count and ``span = (T - 1) * s + 1``.

    Example (``T = 4``, ``s = 2``, span 7)::

        >>> sampler = RandomClipSampler(num_frames=4, stride=2)
        >>> clip = sampler(20, np.random.default_rng(0))   # start in [0, 13]
        >>> clip.indices - clip.start
        array([0, 2, 4, 6])
        >>> sampler(5, np.random.default_rng(0)).indices    # shorter than the span: start 0
        array([0, 2, 4, 4])
    """

    def __init__(self, num_frames: int, stride: int) -> None:
        _check_geometry(num_frames, stride)
        self.num_frames = int(num_frames)
        self.stride = int(stride)
        self.span = clip_span(self.num_frames, self.stride)

    def __call__(self, video_num_frames: int, rng: np.random.Generator) -> ClipInfo:
        _check_video_length(video_num_frames)
        delta = max(0, int(video_num_frames) - self.span)
        start = int(rng.integers(0, delta + 1))  # high is exclusive: delta itself is possible
        return _clip(start, self.num_frames, self.stride, int(video_num_frames), 0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_frames={self.num_frames}, stride={self.stride})"


class UniformClipSampler:
    """Evaluation clips: ``K`` clips of ``T`` frames at stride ``s``, spaced uniformly over the video.

    mmaction2's ``SampleFrames`` test mode (module docstring): with ``delta = max(n - span, 0)``, clip
    ``k`` starts at ``round(k * delta / (K - 1))`` (NumPy's round, half to even) for ``K > 1`` (first
    clip at the start, last clip flush with the end) and at ``delta // 2`` for ``K = 1`` (centred).
    Returns all ``K`` clips, in order.

    Example (``T = 4``, ``s = 2``, span 7, ``K = 3``, a 20-frame video, ``delta = 13``)::

        >>> [c.indices.tolist() for c in UniformClipSampler(4, 2, num_clips=3)(20)]   # 6.5 rounds to 6
        [[0, 2, 4, 6], [6, 8, 10, 12], [13, 15, 17, 19]]
        >>> UniformClipSampler(4, 2, num_clips=4).starts(20)   # 13/3 = 4.33, 8.67
        [0, 4, 9, 13]
        >>> UniformClipSampler(4, 2, num_clips=1)(20)[0].start   # centred: 13 // 2
        6
    """

    def __init__(self, num_frames: int, stride: int, num_clips: int = 1) -> None:
        _check_geometry(num_frames, stride)
        if int(num_clips) != num_clips or num_clips < 1:
            raise ValueError(f"num_clips must be a positive integer, got {num_clips!r}")
        self.num_frames = int(num_frames)
        self.stride = int(stride)
        self.num_clips = int(num_clips)
        self.span = clip_span(self.num_frames, self.stride)

    def starts(self, video_num_frames: int) -> list[int]:
        """The ``K`` start frames for a video of ``video_num_frames`` frames."""
        _check_video_length(video_num_frames)
        delta = max(0, int(video_num_frames) - self.span)
        if self.num_clips == 1:
            return [delta // 2]
        # float64 and np.round exactly as mmaction2 computes them (half to even: 6.5 -> 6, 7.5 -> 8)
        offsets = np.arange(self.num_clips) * (delta / float(self.num_clips - 1))
        return [int(v) for v in np.round(offsets)]

    def __call__(self, video_num_frames: int, rng: np.random.Generator | None = None) -> list[ClipInfo]:
        # ``rng`` is accepted (and ignored) so both samplers share one call signature.
        n = int(video_num_frames)
        return [_clip(s, self.num_frames, self.stride, n, k) for k, s in enumerate(self.starts(n))]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_frames={self.num_frames}, stride={self.stride}, "
            f"num_clips={self.num_clips})"
        )


def union_indices(clips: Sequence[ClipInfo]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Frames to decode once for several clips, and where each clip finds its frames in them.

    Returns ``(frames, positions)``: ``frames`` are the sorted unique indices of all clips (the
    order decoders want), and ``frames[positions[k]] == clips[k].indices``.

    Example::

        >>> frames, pos = union_indices([ClipInfo(np.array([0, 2, 4]), 0, 5), ClipInfo(np.array([4, 6, 6]), 4, 7, 1)])
        >>> frames.tolist(), [p.tolist() for p in pos]
        ([0, 2, 4, 6], [[0, 1, 2], [2, 3, 3]])
    """
    if not clips:
        raise ValueError("union_indices needs at least one clip")
    frames = np.unique(np.concatenate([c.indices for c in clips]))  # sorted
    positions = [np.searchsorted(frames, c.indices) for c in clips]
    return frames, positions


def view_index(clip_index: int, spatial_index: int, num_crops: int) -> int:
    """Flat view index of (temporal clip, spatial crop): views are clip-major, ``k * S + s``."""
    if not 0 <= spatial_index < num_crops:
        raise ValueError(f"spatial_index {spatial_index} out of range for num_crops={num_crops}")
    return clip_index * num_crops + spatial_index


def split_view_index(view: int, num_crops: int) -> tuple[int, int]:
    """Inverse of :func:`view_index`: ``view -> (clip_index, spatial_index)``."""
    if view < 0 or num_crops < 1:
        raise ValueError(f"invalid view {view} or num_crops {num_crops}")
    return view // num_crops, view % num_crops
