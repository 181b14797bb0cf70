"""Video decoding through ``datasets.video``: every backend (torchcodec, PyAV, decord, auto) on index order
and repeats, sorted unique indices handed to the libraries, errors, partial downloads, decord's known
issues (odd widths, echoed input, fork deadlocks, memory in long-lived workers)."""

import io
import os
import time

import av
import numpy as np
import pytest

from datasets.decoders import decoder_available
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

BACKENDS = ("torchcodec", "pyav", "decord", "auto")


def need(decoder: str) -> None:
    if decoder == "auto":
        return
    ok, why = decoder_available(decoder)
    if not ok:
        pytest.skip(f"decoder {decoder!r} is not available here: {why}")


@pytest.fixture(scope="module")
def indexed():
    return indexed_video(40)


@pytest.fixture(scope="module")
def textured():
    return textured_video(24, size=64, seed=3)


@pytest.mark.parametrize("decoder", BACKENDS)
def test_frame_count(indexed, decoder):
    need(decoder)
    assert num_frames(indexed, decoder=decoder) == 40


@pytest.mark.parametrize("decoder", BACKENDS)
def test_requested_order_and_repeats(indexed, decoder):
    need(decoder)
    indices = [17, 0, 5, 5, 39, 16, 17]
    frames = decode_frames(indexed, indices, decoder=decoder)
    assert frames.shape == (7, 32, 64, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == indices
    assert np.abs(frames.astype(int) - indexed_frames(40)[indices]).mean() < 3


def test_decord_receives_sorted_unique_indices(indexed, monkeypatch):
    need("decord")
    import decord

    calls = []
    real = decord.VideoReader

    class RecordingReader(real):  # the real decord reader, recording what get_batch is asked for
        def get_batch(self, indices):
            calls.append(list(indices))
            return super().get_batch(indices)

    monkeypatch.setattr(decord, "VideoReader", RecordingReader)
    frames = decode_frames(indexed, [30, 2, 30, 9, 2], decoder="decord")
    assert calls == [[2, 9, 30]]  # decord re-seeks on backward jumps: sorted, each frame once
    assert frame_ids(frames) == [30, 2, 30, 9, 2]


def test_torchcodec_receives_sorted_unique_indices(indexed, monkeypatch):
    need("torchcodec")
    import torchcodec.decoders

    calls = []
    real = torchcodec.decoders.VideoDecoder

    class RecordingDecoder(real):  # the real torchcodec decoder, recording what get_frames_at is asked for
        def get_frames_at(self, indices):
            calls.append(list(indices))
            return super().get_frames_at(indices)

    monkeypatch.setattr(torchcodec.decoders, "VideoDecoder", RecordingDecoder)
    frames = decode_frames(indexed, [30, 2, 30, 9, 2], decoder="torchcodec")
    assert calls == [[2, 9, 30]]
    assert frame_ids(frames) == [30, 2, 30, 9, 2]


@pytest.mark.parametrize("decoder", ["torchcodec", "decord", "auto"])
def test_backends_agree_with_pyav_on_real_motion(textured, decoder):
    need(decoder)
    indices = [0, 3, 7, 8, 15, 23]
    a = decode_frames(textured, indices, decoder=decoder)
    b = decode_frames(textured, indices, decoder="pyav")
    assert a.shape == b.shape == (6, 64, 64, 3)
    assert np.array_equal(a, b)  # bit-equal (tests/test_decoders.py measures it over seeks and sizes)


@pytest.mark.parametrize("decoder", BACKENDS)
def test_out_of_range_indices(indexed, decoder):
    need(decoder)
    with pytest.raises(IndexError, match=r"out of range for a video of 40 frames"):
        decode_frames(indexed, [0, 40], decoder=decoder)
    with pytest.raises(IndexError):
        decode_frames(indexed, [-1], decoder=decoder)
    with pytest.raises(ValueError, match="non-empty"):
        decode_frames(indexed, [], decoder=decoder)


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


@pytest.mark.parametrize("decoder", BACKENDS)
def test_undecodable_bytes(indexed, decoder):
    need(decoder)
    for bad in (b"", b"not a video at all" * 50, os.urandom(3000), indexed[: len(indexed) // 2]):
        with pytest.raises(VideoDecodeError):
            decode_frames(bad, [0], decoder=decoder)
    with pytest.raises(VideoDecodeError):  # opens, but the packets are zeros
        decode_frames(_corrupt_middle(textured_video(24, seed=1)), list(range(0, 24, 3)), decoder=decoder)


def test_decord_never_sees_bytes_that_are_not_a_container(capfd):
    """decord echoes unreadable input to stderr (dmlc/decord#299): the decord backend refuses such bytes
    itself; auto (torchcodec or PyAV) rejects them quietly."""
    garbage = b"GARBAGE-NOT-A-VIDEO " * 64
    with pytest.raises(VideoDecodeError, match="cannot open"):
        decode_frames(garbage, [0])
    if decoder_available("decord")[0]:
        with pytest.raises(VideoDecodeError, match="decord cannot open 1280 bytes: not a video container"):
            decode_frames(garbage, [0], decoder="decord")
    assert "GARBAGE-NOT-A-VIDEO" not in capfd.readouterr().err


@pytest.mark.parametrize("decoder", ["torchcodec", "pyav", "auto"])
def test_partial_download_keeps_its_complete_frames(decoder):
    """A fragmented mp4 cut in half (a partial download): the frames that are complete decode, the
    cut-off ones raise. decord rejects the whole file (checked below), one reason it is not the default."""
    need(decoder)
    frames = indexed_frames(24, 64, 64).copy()
    noise = np.random.default_rng(0).integers(0, 256, (24, 32, 64, 3), dtype=np.uint8)
    frames[:, 32:] = noise  # the top half keeps the frame index; the noise gives the frames real size
    data = _fragmented_mp4(frames)
    truncated = data[: len(data) // 2]
    with open_video(truncated, decoder=decoder) as v:
        assert 0 < v.num_frames < 24
        got = v.get(np.array([8, 0, 2, 4]))
    assert frame_ids(got[:, :32]) == [8, 0, 2, 4]
    with pytest.raises(VideoDecodeError, match="failed"):  # the cut-off frames stay undecodable
        decode_frames(truncated, [0, 11], decoder=decoder)
    if decoder_available("decord")[0]:
        with pytest.raises(VideoDecodeError):
            decode_frames(truncated, [8, 0, 2, 4], decoder="decord")


def test_odd_widths_decode_in_every_default_backend():
    """decord 0.6 fails get_batch on some frame widths (48: 'DECORDArrayCopyFromTo: The size must exactly
    match'); torchcodec and PyAV (auto) decode them."""
    data = indexed_video(12, height=32, width=48)
    for decoder in ("torchcodec", "pyav", "auto"):
        if decoder_available(decoder)[0] or decoder == "auto":
            frames = decode_frames(data, [3, 0, 11], decoder=decoder)
            assert frames.shape == (3, 32, 48, 3) and frame_ids(frames) == [3, 0, 11]
    if decoder_available("decord")[0]:
        with pytest.raises(VideoDecodeError, match="decord failed"):
            decode_frames(data, [0, 3], decoder="decord")


def test_bad_arguments(indexed):
    with pytest.raises(ValueError, match="unknown video decoder 'torchvision'"):
        decode_frames(indexed, [0], decoder="torchvision")
    with pytest.raises(TypeError):
        decode_frames("video.mp4", [0])


# ----------------------------------------------------------------------------- forks and long-lived workers


def _video_shards(tmp_path, n_videos=12, frames=16):
    shards = [[video_sample(f"{s}-{i}", i % 3, textured_video(frames, size=32, seed=s * 100 + i))
               for i in range(n_videos // 3)] for s in range(3)]
    return write_shards(tmp_path / "shards", shards, "video", ["a", "b", "c"])


@pytest.mark.timeout(180)
@pytest.mark.parametrize("decoder", ["torchcodec", "pyav", "decord"])
@pytest.mark.parametrize("watchdog", [True, False])
def test_no_deadlock_in_forked_workers_after_use_in_parent(tmp_path, decoder, watchdog):
    """dmlc/decord#294: a decoder used in the parent, then forked DataLoader workers decode with it."""
    need(decoder)
    folder = _video_shards(tmp_path)
    decode_frames(textured_video(16, size=32), [0, 5, 9], decoder=decoder)  # the decoder active pre-fork
    spec = VideoSpec(num_frames=4, stride=2, crop_size=32, train_short_side=(32, 36), eval_short_side=32,
                     decoder=decoder, decode_timeout_s=30.0 if watchdog else 0.0)
    for _ in range(2):
        ds = build_video_dataset(folder, train=True, spec=spec, batch_size=2, samples_per_epoch=24)
        loader = make_loader(ds, num_workers=2, multiprocessing_context="fork")
        assert sum(1 for _ in loader) == 12
    decode_frames(textured_video(16, size=32), [1, 2], decoder=decoder)  # and the parent still decodes
    assert ds.stats.total() == 0


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return out


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
@pytest.mark.parametrize("decoder", ["torchcodec", "pyav", "decord"])
def test_memory_flat_over_thousands_of_decodes_in_one_worker(tmp_path, decoder):
    """dmlc/decord#1, #157, #208: the RSS of a long-lived worker and of its decode process must not grow
    with the number of decodes (4,000 here)."""
    need(decoder)
    folder = _video_shards(tmp_path, n_videos=30, frames=24)
    spec = VideoSpec(num_frames=8, stride=2, crop_size=32, train_short_side=(32, 40), eval_short_side=32,
                     decoder=decoder)
    batch, steps = 10, 400  # 4000 decodes in a single worker process
    ds = build_video_dataset(folder, train=True, spec=spec, batch_size=batch, samples_per_epoch=batch * steps,
                             shuffle_buffer=16)
    it = iter(make_loader(ds, num_workers=1, prefetch_factor=2))
    worker_pid = it._workers[0].pid  # the DataLoader's worker process
    samples, t0 = [], time.monotonic()
    for step, b in enumerate(it):
        assert b["video"].shape == (batch, 3, 8, 32, 32)
        if step % 50 == 0 or step == steps - 2:  # the worker may have exited after the last batch
            kids = _children(worker_pid)  # its decode process (the watchdog's)
            samples.append((step, _rss_kib(worker_pid), sum(_rss_kib(k) for k in kids), len(kids)))
    assert step == steps - 1
    del it
    after = [s for s in samples if s[0] >= 100]
    warm = dict((s[0], s) for s in samples)[100]
    growth_worker = (max(s[1] for s in after) - warm[1]) / 1024
    growth_decoder = (max(s[2] for s in after) - warm[2]) / 1024
    print(f"{decoder}: (step, worker RSS KiB, decode process RSS KiB, processes): {samples}; growth after "
          f"warm-up {growth_worker:.1f} / {growth_decoder:.1f} MiB, {time.monotonic() - t0:.0f}s")
    assert all(s[3] == 1 for s in samples)  # one decode process, the same all along
    # 3000 decodes after warm-up: a leak of even 10 KiB per decode would add ~30 MiB.
    assert growth_worker < 12 and growth_decoder < 12, samples
    assert ds.stats.total() == 0
