"""Video decoding: decord vs PyAV agreement, index order/repeats, errors, fallback, decord's leak and fork issues."""

import io
import logging
import os
import time

import av
import numpy as np
import pytest

import datasets.video as video_mod
from datasets.loader import VideoSpec, build_video_dataset, make_loader
from datasets.video import VideoDecodeError, decode_frames, num_frames, open_video
from tests.media_fixtures import (
    frame_ids,
    indexed_frames,
    indexed_video,
    textured_video,
    video_sample,
    write_shards,
)

pytestmark = pytest.mark.skipif(not video_mod.decord_available(), reason="decord is not installed")
BACKENDS = ("decord", "pyav", "auto")


@pytest.fixture(scope="module")
def indexed():
    return indexed_video(40)


@pytest.fixture(scope="module")
def textured():
    return textured_video(24, size=64, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frame_count(indexed, backend):
    assert num_frames(indexed, backend=backend) == 40


@pytest.mark.parametrize("backend", BACKENDS)
def test_requested_order_and_repeats(indexed, backend):
    indices = [17, 0, 5, 5, 39, 16, 17]
    frames = decode_frames(indexed, indices, backend=backend)
    assert frames.shape == (7, 32, 64, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == indices
    assert np.abs(frames.astype(int) - indexed_frames(40)[indices]).mean() < 3


def test_decord_receives_sorted_unique_indices(indexed, monkeypatch):
    calls = []
    real = video_mod._decord.VideoReader

    class RecordingReader(real):  # the real decord reader, recording what get_batch is asked for
        def get_batch(self, indices):
            calls.append(list(indices))
            return super().get_batch(indices)

    monkeypatch.setattr(video_mod._decord, "VideoReader", RecordingReader)
    frames = decode_frames(indexed, [30, 2, 30, 9, 2], backend="decord")
    assert calls == [[2, 9, 30]]  # decord re-seeks on backward jumps: sorted, each frame once
    assert frame_ids(frames) == [30, 2, 30, 9, 2]


def test_decord_and_pyav_agree_on_real_motion(textured):
    indices = [0, 3, 7, 8, 15, 23]
    a = decode_frames(textured, indices, backend="decord").astype(np.float64)
    b = decode_frames(textured, indices, backend="pyav").astype(np.float64)
    assert a.shape == b.shape == (6, 64, 64, 3)
    assert np.abs(a - b).mean() < 3.0  # < 3/255 on [0, 1] pixels


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_indices(indexed, backend):
    with pytest.raises(IndexError, match=r"out of range for a video of 40 frames"):
        decode_frames(indexed, [0, 40], backend=backend)
    with pytest.raises(IndexError):
        decode_frames(indexed, [-1], backend=backend)
    with pytest.raises(ValueError, match="non-empty"):
        decode_frames(indexed, [], backend=backend)


def _fragmented_mp4(frames: np.ndarray) -> bytes:
    """mp4 with moov first and one fragment per key frame: a truncated copy stays partly readable."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4", options={"movflags": "frag_keyframe+empty_moov"}) as c:
        s = c.add_stream("libx264", rate=8)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.codec_context.gop_size = 4
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


def _corrupt_middle(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 4 : len(b) // 2] = bytes(len(b) // 2 - len(b) // 4)
    return bytes(b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_undecodable_bytes(indexed, backend):
    for bad in (b"", b"not a video at all" * 50, os.urandom(3000), indexed[: len(indexed) // 2]):
        with pytest.raises(VideoDecodeError):
            decode_frames(bad, [0], backend=backend)
    with pytest.raises(VideoDecodeError):  # opens, but the packets are zeros
        decode_frames(_corrupt_middle(textured_video(24, seed=1)), list(range(0, 24, 3)), backend=backend)


def test_auto_keeps_garbage_away_from_decord(capfd):
    """decord echoes unreadable input to stderr (dmlc/decord#299); auto mode sends bytes that do not
    start like a container to PyAV instead."""
    garbage = b"GARBAGE-NOT-A-VIDEO " * 64
    with pytest.raises(VideoDecodeError, match="PyAV cannot open"):
        decode_frames(garbage, [0])
    assert "GARBAGE-NOT-A-VIDEO" not in capfd.readouterr().err
    with pytest.raises(VideoDecodeError, match="decord cannot open"):
        decode_frames(garbage, [0], backend="decord")
    assert "GARBAGE-NOT-A-VIDEO" in capfd.readouterr().err  # the decord behaviour being avoided


def test_auto_falls_back_to_pyav_when_decord_fails(caplog):
    """A fragmented mp4 cut in half (a partial download): decord rejects the whole batch, PyAV
    decodes the frames that are complete."""
    frames = indexed_frames(24, 64, 64).copy()
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 64, 3), dtype=np.uint8)
    frames[:, 32:] = noise  # the top half keeps the frame index; the noise gives the frames real size
    data = _fragmented_mp4(frames)
    truncated = data[: len(data) // 2]
    wanted = [8, 0, 2, 4]
    with pytest.raises(VideoDecodeError):
        decode_frames(truncated, wanted, backend="decord")
    with caplog.at_level(logging.DEBUG, logger="datasets.video"):
        with open_video(truncated) as v:
            got = v.get(np.array(wanted))
            assert v.backend == "pyav"
    assert frame_ids(got[:, :32]) == wanted
    assert sum("decoding this sample with PyAV" in r.message for r in caplog.records) == 1
    with pytest.raises(VideoDecodeError, match="PyAV failed"):  # the cut-off frames stay undecodable
        decode_frames(truncated, [0, 11], backend="auto")


def test_auto_falls_back_when_decord_decodes_wrongly_sized_frames(caplog):
    """decord 0.6 fails get_batch on some frame widths (48: 'DECORDArrayCopyFromTo: The size must
    exactly match'); auto mode must still decode those videos, with PyAV."""
    data = indexed_video(12, height=32, width=48)
    with pytest.raises(VideoDecodeError, match="decord failed"):
        decode_frames(data, [0, 3], backend="decord")
    with caplog.at_level(logging.DEBUG, logger="datasets.video"):
        frames = decode_frames(data, [3, 0, 11])
    assert frames.shape == (3, 32, 48, 3) and frame_ids(frames) == [3, 0, 11]
    assert any("decoding this sample with PyAV" in r.message for r in caplog.records)


def test_bad_arguments(indexed):
    with pytest.raises(ValueError, match="unknown video backend"):
        decode_frames(indexed, [0], backend="torchvision")
    with pytest.raises(TypeError):
        decode_frames("video.mp4", [0])


# ----------------------------------------------------------------------------- decord's known issues


def _video_shards(tmp_path, n_videos=12, frames=16):
    shards = [[video_sample(f"{s}-{i}", i % 3, textured_video(frames, size=32, seed=s * 100 + i))
               for i in range(n_videos // 3)] for s in range(3)]
    return write_shards(tmp_path / "shards", shards, "video", ["a", "b", "c"])


@pytest.mark.timeout(120)
def test_no_deadlock_in_forked_workers_after_decord_use_in_parent(tmp_path):
    """dmlc/decord#294: decord used in the parent, then forked DataLoader workers decode with it."""
    folder = _video_shards(tmp_path)
    decode_frames(textured_video(16, size=32), [0, 5, 9], backend="decord")  # decord active pre-fork
    spec = VideoSpec(num_frames=4, stride=2, crop_size=32, train_short_side=(32, 36), eval_short_side=32,
                     backend="decord")
    for _ in range(2):
        ds = build_video_dataset(folder, train=True, spec=spec, batch_size=2, samples_per_epoch=24)
        loader = make_loader(ds, num_workers=2, multiprocessing_context="fork")
        assert sum(1 for _ in loader) == 12
    decode_frames(textured_video(16, size=32), [1, 2], backend="decord")  # and the parent still decodes
    assert ds.stats.total() == 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_memory_flat_over_thousands_of_decodes_in_one_worker(tmp_path):
    """dmlc/decord#1, #157, #208: RSS of a long-lived worker must not grow with the number of decodes."""
    folder = _video_shards(tmp_path, n_videos=30, frames=24)
    spec = VideoSpec(num_frames=8, stride=2, crop_size=32, train_short_side=(32, 40), eval_short_side=32,
                     backend="decord")
    batch, steps = 10, 400  # 4000 decodes in a single worker process
    ds = build_video_dataset(folder, train=True, spec=spec, batch_size=batch, samples_per_epoch=batch * steps,
                             shuffle_buffer=16)
    it = iter(make_loader(ds, num_workers=1, prefetch_factor=2))
    worker_pid = it._workers[0].pid  # the DataLoader's worker process
    samples, t0 = [], time.monotonic()
    for step, b in enumerate(it):
        assert b["video"].shape == (batch, 3, 8, 32, 32)
        if step % 50 == 0 or step == steps - 2:  # the worker may have exited after the last batch
            samples.append((step, _rss_kib(worker_pid)))
    assert step == steps - 1
    del it
    warm = dict(samples)[100]
    peak_after = max(r for s, r in samples if s >= 100)
    growth_mib = (peak_after - warm) / 1024
    print(f"worker RSS (KiB) by step: {samples}; growth after warm-up {growth_mib:.1f} MiB, "
          f"{time.monotonic() - t0:.0f}s")
    # 3000 decodes after warm-up: a leak of even 10 KiB per VideoReader would add ~30 MiB.
    assert growth_mib < 12, samples
    assert ds.stats.total() == 0
