"""Clip-index arithmetic, as tables of hand-computed expectations (short, exact-length, long videos)."""

import numpy as np
import pytest

from datasets.clip_sampling import (
    ClipInfo,
    RandomClipSampler,
    UniformClipSampler,
    clip_span,
    split_view_index,
    union_indices,
    view_index,
)


class FixedStart:
    """A numpy-Generator stand-in whose ``integers(0, high)`` returns a chosen value (and records ``high``)."""

    def __init__(self, value: int) -> None:
        self.value, self.highs = value, []

    def integers(self, low, high):
        self.highs.append(high)
        assert low == 0 and 0 <= self.value < high
        return self.value


# (T, s, video frames, start drawn) -> expected indices; span = (T - 1) * s + 1
RANDOM_TABLE = [
    # short videos (n < span): start 0 is the only choice; indices past the end repeat the last frame
    (4, 2, 5, 0, [0, 2, 4, 4]),
    (4, 4, 6, 0, [0, 4, 5, 5]),
    (8, 4, 1, 0, [0] * 8),
    # exact length (n == span): start 0, last index is the last frame
    (4, 2, 7, 0, [0, 2, 4, 6]),
    (32, 4, 125, 0, list(range(0, 125, 4))),
    # long videos: any start in [0, n - span]
    (4, 2, 20, 13, [13, 15, 17, 19]),
    (4, 2, 20, 5, [5, 7, 9, 11]),
    (8, 32, 300, 75, [75 + 32 * i for i in range(8)]),
    (1, 4, 10, 9, [9]),
]


@pytest.mark.parametrize("T,s,n,start,expected", RANDOM_TABLE)
def test_random_clip_table(T, s, n, start, expected):
    rng = FixedStart(start)
    clip = RandomClipSampler(num_frames=T, stride=s)(n, rng)
    assert rng.highs == [max(0, n - clip_span(T, s)) + 1]  # uniform over [0, n - span], both ends included
    assert clip.indices.tolist() == expected
    assert clip.start == start and clip.end == expected[-1] + 1 and clip.clip_index == 0
    assert clip.indices.dtype == np.int64


def test_random_clip_covers_every_start_uniformly():
    sampler = RandomClipSampler(num_frames=4, stride=2)  # span 7
    rng = np.random.default_rng(0)
    starts = np.array([sampler(10, rng).start for _ in range(4000)])  # starts in [0, 3]
    counts = np.bincount(starts, minlength=4)
    assert set(starts.tolist()) == {0, 1, 2, 3}
    assert counts.min() > 850  # ~1000 each
    assert all(sampler(7, rng).start == 0 for _ in range(50))  # exact length: only start 0


# (T, s, K, video frames) -> expected starts (mmaction2 SampleFrames test mode: np.round(k * delta / (K - 1));
# half to even; K = 1 centred)
UNIFORM_TABLE = [
    (4, 2, 3, 20, [0, 6, 13]),  # delta 13: 0, round(6.5) = 6 (half to even), 13
    (4, 2, 3, 22, [0, 8, 15]),  # delta 15: round(7.5) = 8 (half to even)
    (4, 2, 1, 20, [6]),  # centred: 13 // 2
    (4, 2, 2, 20, [0, 13]),
    (4, 2, 4, 20, [0, 4, 9, 13]),  # 13/3 = 4.33, 8.67 -> 9 (rounded, not floored)
    (4, 2, 3, 7, [0, 0, 0]),  # exact length: every clip is the whole video
    (4, 2, 1, 7, [0]),
    (4, 2, 3, 5, [0, 0, 0]),  # short: every clip starts at 0 and repeats the last frame
    (8, 32, 4, 300, [0, 25, 50, 75]),  # delta 75
    (32, 4, 1, 300, [87]),  # delta 175 -> 87
]


@pytest.mark.parametrize("T,s,K,n,starts", UNIFORM_TABLE)
def test_uniform_clip_table(T, s, K, n, starts):
    clips = UniformClipSampler(T, s, num_clips=K)(n)
    assert [c.start for c in clips] == starts
    assert [c.clip_index for c in clips] == list(range(K))
    for c, st in zip(clips, starts):
        assert c.indices.tolist() == [min(st + s * i, n - 1) for i in range(T)]
        assert c.end == c.indices[-1] + 1
    if n >= clip_span(T, s) and K > 1:
        assert clips[-1].indices[-1] == n - 1  # the last clip ends on the last frame


def test_uniform_short_video_indices():
    clips = UniformClipSampler(4, 2, num_clips=2)(5)
    assert [c.indices.tolist() for c in clips] == [[0, 2, 4, 4], [0, 2, 4, 4]]


def test_union_indices_sorted_and_gathers_each_clip():
    clips = UniformClipSampler(4, 3, num_clips=3)(16)  # span 10, delta 6: starts 0, 3, 6
    frames, positions = union_indices(clips)
    assert frames.tolist() == [0, 3, 6, 9, 12, 15]
    for c, pos in zip(clips, positions):
        assert frames[pos].tolist() == c.indices.tolist()
    repeated = [ClipInfo(np.array([0, 2, 4, 4]), 0, 5)]
    frames, positions = union_indices(repeated)
    assert frames.tolist() == [0, 2, 4] and positions[0].tolist() == [0, 1, 2, 2]


def test_view_index_round_trip():
    S = 3
    views = [(k, s) for k in range(4) for s in range(S)]
    assert [view_index(k, s, S) for k, s in views] == list(range(12))
    assert [split_view_index(v, S) for v in range(12)] == views
    with pytest.raises(ValueError):
        view_index(0, 3, 3)


@pytest.mark.parametrize("bad", [dict(num_frames=0, stride=1), dict(num_frames=4, stride=0),
                                 dict(num_frames=2.5, stride=1)])
def test_invalid_geometry(bad):
    with pytest.raises(ValueError):
        RandomClipSampler(**bad)
    with pytest.raises(ValueError):
        UniformClipSampler(**bad)


def test_invalid_video_length_and_clips():
    with pytest.raises(ValueError, match="at least one frame"):
        RandomClipSampler(4, 2)(0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="num_clips"):
        UniformClipSampler(4, 2, num_clips=0)


def test_docstring_examples_are_correct():
    import doctest

    import datasets.clip_sampling as module

    result = doctest.testmod(module, extraglobs={"np": np})
    assert result.attempted >= 6 and result.failed == 0
