"""Sharded loaders: exactly-once evaluation, equal training steps per rank, determinism, resuming,
and every bad-data case with its count (DataLoader workers 0 and 2)."""

import io
import logging
import pickle
import shutil
import tarfile
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from webdataset.tariterators import tarfile_samples

from datasets.clip_sampling import UniformClipSampler
from datasets.loader import (
    DataStats,
    ImageSpec,
    VideoSpec,
    build_image_dataset,
    build_video_dataset,
    make_loader,
)
from datasets.manifest import ManifestError
from datasets.streams import TarFormatError, iter_tar_members, shard_samples
from tests.decoder_backends import COUNTING, counting_backend
from tests.media_fixtures import image_bytes, image_sample, textured_video, video_sample, write_shards

CLASSES = ["a", "b", "c"]
SPEC = VideoSpec(num_frames=4, stride=2, crop_size=24, train_short_side=(24, 28), eval_short_side=24)
EVAL_SPEC = VideoSpec(num_frames=4, stride=2, crop_size=24, train_short_side=(24, 28), eval_short_side=28,
                      num_clips=2, num_crops=3)


def _video(key: str, frames: int, seed: int) -> dict:
    return video_sample(key, seed % 3, textured_video(frames, size=32, seed=seed))


@pytest.fixture(scope="module")
def clean_videos(tmp_path_factory):
    """3 shards of 5, 4 and 2 videos, 5 to 14 frames long (short and long against the span of 7)."""
    sizes, shards, lengths, seed = (5, 4, 2), [], {}, 0
    for s, n in enumerate(sizes):
        shard = []
        for i in range(n):
            seed += 1
            lengths[f"vid-s{s}-{i}"] = 5 + seed % 10
            shard.append(_video(f"s{s}-{i}", 5 + seed % 10, seed))
        shards.append(shard)
    folder = write_shards(tmp_path_factory.mktemp("clean") / "train", shards, "video", CLASSES)
    return folder, list(lengths), lengths


class Evil:
    """Unpickling this creates ``marker``: proof that a shard entry was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


BAD_VIDEO_REASONS = {"decode_error": 2, "missing_label": 1, "unknown_extension": 2, "bad_label": 2,
                     "missing_data": 1}


@pytest.fixture(scope="module")
def dirty_videos(tmp_path_factory):
    """Good videos mixed with every kind of bad sample, several of them last in their shard."""
    root = tmp_path_factory.mktemp("dirty")
    marker = root / "UNPICKLED"
    good = textured_video(10, size=32, seed=7)
    evil = pickle.dumps(Evil(marker))
    shard0 = [
        _video("g0", 9, 1),
        video_sample("garbage", 0, b"\x00\x01 definitely not an mp4 " * 40),
        _video("g1", 12, 2),
        video_sample("nolabel", None, good),
        video_sample("pickled", 1, good, pyd=evil),  # never unpickled: unknown extension
        video_sample("truncated", 2, good[: len(good) // 2]),  # last in its shard
    ]
    shard1 = [
        _video("g2", 8, 3),
        video_sample("badlabel", 0, good, cls=b"seven"),
        video_sample("outofrange", 0, good, cls=b"7"),  # the manifest has 3 classes
        {"__key__": "nodata", "cls": b"1"},
        _video("g3", 14, 4),
        video_sample("pth", 1, good, pth=evil),
    ]
    shard2 = [_video("g4", 6, 5), _video("g5", 11, 6)]
    folder = write_shards(root / "train", [shard0, shard1, shard2], "video", CLASSES)
    return folder, marker, [f"vid-g{i}" for i in range(6)]


def _eval_views(folder, spec, world, workers, batch_size=4, stats=None):
    items = []
    for rank in range(world):
        ds = build_video_dataset(folder, train=False, spec=spec, batch_size=batch_size, rank=rank,
                                 world_size=world, stats=stats)
        for b in make_loader(ds, num_workers=workers):
            n = len(b["video_id"])
            assert b["video"].shape == (n, 3, spec.num_frames, spec.crop_size, spec.crop_size)
            assert b["video"].dtype == torch.float32 and 1 <= n <= batch_size
            assert b["num_views"] == spec.num_views
            items += list(zip(b["video_id"], b["clip_index"].tolist(), b["spatial_index"].tolist(),
                              b["label"].tolist()))
    return items


@pytest.mark.parametrize("workers", [0, 1, 2])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_visits_every_view_exactly_once(clean_videos, world, workers):
    folder, ids, _ = clean_videos
    items = _eval_views(folder, EVAL_SPEC, world, workers)
    views = Counter((v, k, s) for v, k, s, _ in items)
    expected = {(v, k, s) for v in ids for k in range(2) for s in range(3)}
    assert set(views) == expected  # nothing dropped (11 videos x 2 clips x 3 crops)
    assert max(views.values()) == 1  # nothing duplicated, no padding
    assert len(items) == len(ids) * 6


def test_eval_single_view_exactly_once_small_batches(clean_videos):
    folder, ids, _ = clean_videos
    for world, workers in ((4, 2), (1, 0)):
        items = _eval_views(folder, SPEC, world, workers, batch_size=3)
        assert sorted(v for v, *_ in items) == sorted(ids)


def test_eval_views_are_k_uniform_clips_times_s_crops(clean_videos):
    folder, ids, lengths = clean_videos
    ds = build_video_dataset(folder, train=False, spec=EVAL_SPEC, batch_size=6)  # one video per batch
    sampler = UniformClipSampler(4, 2, num_clips=2)
    seen = []
    for batch in ds:
        vid = batch["video_id"][0]
        seen.append(vid)
        assert batch["video_id"] == [vid] * 6
        assert batch["clip_index"].tolist() == [0, 0, 0, 1, 1, 1]
        assert batch["spatial_index"].tolist() == [0, 1, 2, 0, 1, 2]
        clips = sampler(lengths[vid])  # hand-checked in test_clip_sampling.py
        for view in range(6):
            assert batch["frame_index"][view].tolist() == clips[view // 3].indices.tolist()
        # 32x32 frames scaled to 28x28: the three 24-pixel crops start at x = 0, 2, 4
        assert not torch.equal(batch["video"][0], batch["video"][2])
    assert seen == ids


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_equal_full_batches_per_rank(clean_videos, world, workers):
    folder, ids, _ = clean_videos
    samples, bs = 22, 2
    for rank in range(world):
        ds = build_video_dataset(folder, train=True, spec=SPEC, batch_size=bs, rank=rank, world_size=world,
                                 samples_per_epoch=samples, shuffle_buffer=4)
        assert ds.steps_per_epoch == samples // (world * bs) == len(ds)
        batches = list(make_loader(ds, num_workers=workers))
        assert len(batches) == ds.steps_per_epoch
        for b in batches:
            assert b["video"].shape == (bs, 3, 4, 24, 24) and b["label"].shape == (bs,)
            assert set(b["video_id"]) <= set(ids)
            # frame indices: 4 at stride 2, clamped to the video's last frame
            fi = b["frame_index"]
            assert fi.shape == (bs, 4) and bool((fi.diff(dim=1) >= 0).all())


def _train_run(folder, workers, decoder=None, **kw):
    args = dict(train=True, spec=SPEC, batch_size=2, samples_per_epoch=20, shuffle_buffer=4, seed=3)
    args.update(kw)
    if decoder is not None:
        args["spec"] = replace(args["spec"], decoder=decoder)
    ds = build_video_dataset(folder, **args)
    return [(b["video_id"], b["frame_index"], b["video"]) for b in make_loader(ds, num_workers=workers)], ds


def _same(run_a, run_b) -> bool:
    return len(run_a) == len(run_b) and all(
        ia == ib and torch.equal(fa, fb) and torch.equal(va, vb) for (ia, fa, va), (ib, fb, vb) in zip(run_a, run_b)
    )


def test_train_deterministic_and_seeded(clean_videos):
    folder, _, _ = clean_videos
    a, _ = _train_run(folder, 2)
    b, _ = _train_run(folder, 2)
    assert _same(a, b)
    c, _ = _train_run(folder, 2, epoch=1)
    d, _ = _train_run(folder, 2, seed=4)
    assert not _same(a, c) and not _same(a, d)
    # Shuffling happens: the first epoch does not follow shard order.
    order = [v for ids, _, _ in a for v in ids]
    assert order[:5] != [f"vid-s0-{i}" for i in range(5)]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_start_batch_resumes_the_same_stream(clean_videos, workers):
    folder, _, _ = clean_videos
    full, _ = _train_run(folder, workers)
    assert len(full) == 10
    for k in (1, 3, 10):
        resumed, ds = _train_run(folder, workers, start_batch=k)
        assert _same(resumed, full[k:]), f"start_batch={k} workers={workers}"


def test_start_batch_skips_before_decoding(clean_videos):
    """Counted by a decoder backend that counts the videos it opens, in whatever process decodes them."""
    folder, _, _ = clean_videos
    opened = counting_backend().opened
    opened.value = 0
    full, _ = _train_run(folder, 0, decoder=COUNTING)
    assert opened.value == 20
    opened.value = 0
    resumed, _ = _train_run(folder, 0, start_batch=7, decoder=COUNTING)
    assert len(resumed) == 3 and opened.value == 6  # only the 3 remaining batches of 2 were decoded
    assert _same(resumed, full[7:])


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_bad_samples_skipped_and_counted(dirty_videos, workers, caplog):
    folder, marker, good_ids = dirty_videos
    for world in (1, 2):
        stats = DataStats()
        with caplog.at_level(logging.WARNING, logger="datasets.loader"):
            items = _eval_views(folder, SPEC, world, workers, batch_size=2, stats=stats)
        assert sorted(v for v, *_ in items) == good_ids  # every good video once, no bad one
        counts = {k: v for k, v in stats.snapshot().items() if v}
        assert counts == BAD_VIDEO_REASONS, (world, workers)
        assert stats.total() == 8
    assert not marker.exists()  # the pickled entries were never unpickled
    if workers == 0:  # in-process: the warnings name the shard and the key
        text = "\n".join(r.getMessage() for r in caplog.records)
        assert "'truncated' in shard" in text and "shards-000000.tar" in text and "decode_error" in text
        assert "'nolabel'" in text and "missing_label" in text and "'pickled'" in text


@pytest.mark.parametrize("workers", [0, 2])
def test_train_replaces_bad_samples_and_keeps_batches_full(dirty_videos, workers):
    folder, marker, good_ids = dirty_videos
    stats = DataStats()
    ds = build_video_dataset(folder, train=True, spec=SPEC, batch_size=3, samples_per_epoch=42,
                             shuffle_buffer=0, stats=stats)
    batches = list(make_loader(ds, num_workers=workers))
    assert len(batches) == 14 and all(b["video"].shape[0] == 3 for b in batches)
    seen = Counter(v for b in batches for v in b["video_id"])
    assert set(seen) == set(good_ids)  # 42 clips > 3 passes over 14 samples: every good video appears
    counts = stats.snapshot()
    for reason, n in BAD_VIDEO_REASONS.items():
        assert counts[reason] >= n, counts  # each bad sample met at least once (at least one full pass)
    assert counts["bad_image"] == counts["shard_error"] == 0
    assert not marker.exists()


def test_train_with_bad_samples_is_deterministic_and_resumable(dirty_videos):
    folder, _, _ = dirty_videos
    full, _ = _train_run(folder, 2, samples_per_epoch=24, shuffle_buffer=3)
    again, _ = _train_run(folder, 2, samples_per_epoch=24, shuffle_buffer=3)
    assert _same(full, again)
    for k in (2, 5):
        resumed, _ = _train_run(folder, 2, samples_per_epoch=24, shuffle_buffer=3, start_batch=k)
        assert _same(resumed, full[k:])


def test_truncated_shard_counted_once(clean_videos, tmp_path):
    folder, _, _ = clean_videos
    src = folder / "shards-000000.tar"
    broken = tmp_path / "broken" / "shards-000000.tar"
    broken.parent.mkdir()
    data = src.read_bytes()
    with tarfile.open(src) as t:  # a cut just before the mp4 of sample 3, after its cls and json
        boundary = next(m.offset for m in t.getmembers() if m.name == "s0-3.mp4")
    for cut in (int(len(data) * 0.6), boundary):  # inside a member; at a member boundary
        broken.write_bytes(data[:cut])
        for workers in (0, 2):
            stats = DataStats()
            ds = build_video_dataset([str(broken)], train=False, spec=SPEC, batch_size=2, stats=stats)
            got = [v for b in make_loader(ds, num_workers=workers) for v in b["video_id"]]
            assert {k: v for k, v in stats.snapshot().items() if v} == {"shard_error": 1}  # no partial sample
            assert 0 < len(got) < 5 and sorted(got) == [f"vid-s0-{i}" for i in range(len(got))]


def test_errors_name_the_source(clean_videos, tmp_path):
    folder, _, _ = clean_videos
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "shards-000001.tar", bare / "x-000001.tar")
    with pytest.raises(ValueError, match=r"samples_per_epoch is required for .*bare"):
        build_video_dataset(str(bare), train=True, spec=SPEC, batch_size=2)
    ds = build_video_dataset(str(bare), train=True, spec=SPEC, batch_size=2, samples_per_epoch=4)
    assert ds.steps_per_epoch == 2 and ds.classes is None
    with pytest.raises(ValueError, match="holds video shards, not image shards"):
        build_image_dataset(folder, train=False, spec=ImageSpec(size=16), batch_size=2)
    with pytest.raises(ValueError, match="less than one batch per rank"):
        build_video_dataset(folder, train=True, spec=SPEC, batch_size=4, world_size=4, samples_per_epoch=12)
    with pytest.raises(ValueError, match="start_batch"):
        build_video_dataset(folder, train=False, spec=SPEC, batch_size=2, start_batch=1)
    with pytest.raises(ManifestError):
        build_video_dataset(tmp_path / "missing", train=True, spec=SPEC, batch_size=2)


# ----------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    shard0 = [image_sample(f"i{i}", i % 3, image_bytes(i % 3, seed=i), ext=("jpg", "png", "webp")[i % 3])
              for i in range(7)]
    png = image_bytes(1, fmt="PNG", seed=99)
    shard1 = [
        image_sample("corrupt", 0, b"\xff\xd8\xff\xe0 not really a jpeg" * 10),
        image_sample("i7", 1, image_bytes(1, fmt="BMP", seed=7), ext="bmp"),
        image_sample("cutpng", 1, png[: len(png) // 2], ext="png"),
        image_sample("extra", 2, image_bytes(2, seed=8), txt=b"caption"),
        image_sample("i8", 2, image_bytes(2, seed=9), ext="jpeg"),
        image_sample("nolabel", None, image_bytes(0, seed=10)),
    ]
    folder = write_shards(tmp_path_factory.mktemp("img") / "train", [shard0, shard1], "image", CLASSES)
    return folder, [f"i{i}" for i in range(9)]


@pytest.mark.parametrize("workers", [0, 2])
def test_image_eval_exactly_once_with_bad_images_counted(images, workers):
    folder, good = images
    spec = ImageSpec(size=16, crop_pct=0.875)
    stats, keys = DataStats(), []
    for rank in range(2):
        ds = build_image_dataset(folder, train=False, spec=spec, batch_size=4, rank=rank, world_size=2, stats=stats)
        for b in make_loader(ds, num_workers=workers):
            assert b["image"].shape[1:] == (3, 16, 16) and b["image"].dtype == torch.float32
            keys += b["key"]
    assert sorted(keys) == good
    assert {k: v for k, v in stats.snapshot().items() if v} == {
        "bad_image": 2, "unknown_extension": 1, "missing_label": 1}


def test_image_train_deterministic_with_randaugment(images):
    folder, good = images
    spec = ImageSpec(size=16)  # RandAugment on

    def run(workers, seed=0):
        ds = build_image_dataset(folder, train=True, spec=spec, batch_size=3, samples_per_epoch=12, seed=seed,
                                 shuffle_buffer=4)
        # workers=None: iterate in this process without a DataLoader (which draws a base seed from torch)
        batches = ds if workers is None else make_loader(ds, num_workers=workers)
        return [(b["key"], b["image"]) for b in batches]

    a, b = run(2), run(2)
    assert len(a) == 4 and all(x.shape == (3, 3, 16, 16) for _, x in a)
    assert all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(a, b))
    assert not all(torch.equal(xa, xc) for (_, xa), (_, xc) in zip(a, run(2, seed=1)))
    assert {k for keys, _ in a for k in keys} <= set(good)
    # Seeding per sample must not disturb the caller's global random streams (in-process loading).
    in_process = run(0)  # one stream, like a DataLoader without workers
    torch.manual_seed(123)
    np.random.seed(123)
    assert all(ka == kb and torch.equal(xa, xb) for (ka, xa), (kb, xb) in zip(in_process, run(None)))
    after = (torch.rand(1).item(), np.random.rand())
    torch.manual_seed(123)
    np.random.seed(123)
    assert after == (torch.rand(1).item(), np.random.rand())


def test_decode_image_rejects_other_formats():
    from datasets.samples import decode_image
    from datasets.stats import BadSample

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(BadSample, match="cannot decode image"):
        decode_image(buf.getvalue())  # GIF is not among the formats Pillow is allowed to parse


# ----------------------------------------------------------------------------- tar reading


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_fast_tar_reader_matches_webdataset(tmp_path, fmt):
    """Long names (pax 'path', GNU 'L' entries, ustar prefix), sizes and meta files, as webdataset reads them."""
    path = tmp_path / "s.tar"
    long = 40 if fmt == tarfile.USTAR_FORMAT else 150
    with tarfile.open(path, "w", format=fmt) as t:
        for i in range(4):
            key = "d" * 60 + "/" + "k" * long + str(i)
            for ext, data in (("MP4", bytes(range(256)) * i + b"x"), ("cls", str(i).encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        for name in ("__meta__", "folder"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.REGTYPE if name == "__meta__" else tarfile.DIRTYPE
            t.addfile(info, io.BytesIO(b""))
    errors = []
    ours = list(shard_samples(str(path), lambda url, e: errors.append(e)))
    assert ours == list(tarfile_samples([{"url": str(path)}])) and not errors
    assert len(ours) == 4 and ours[2]["mp4"] == bytes(range(256)) * 2 + b"x"  # extensions lower-cased


def test_fast_tar_reader_rejects_broken_tars(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(TarFormatError, match="checksum"):
        list(iter_tar_members(io.BytesIO(garbage.read_bytes()), "garbage.tar"))
    errors = []
    assert list(shard_samples(str(garbage), lambda url, e: errors.append((url, e)))) == []
    assert len(errors) == 1 and errors[0][0] == str(garbage)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("a.mp4")
        info.size = 5000
        t.addfile(info, io.BytesIO(bytes(5000)))
    with pytest.raises(TarFormatError, match="truncated"):
        list(iter_tar_members(io.BytesIO(buf.getvalue()[:3000]), "cut.tar"))
    cut_at_boundary = buf.getvalue()[: 512 + 5120]  # header + padded data, no end-of-archive blocks
    with pytest.raises(TarFormatError, match="end-of-archive"):
        list(iter_tar_members(io.BytesIO(cut_at_boundary), "cut.tar"))


def test_normalized_stack_equals_stack_then_normalize():
    from datasets.loader import NormalizedStack
    from datasets.transforms import normalize

    rng = np.random.default_rng(0)
    frames = [torch.from_numpy(rng.integers(0, 256, (4, 10, 12, 3), dtype=np.uint8)) for _ in range(3)]
    clips = [f.permute(3, 0, 1, 2)[..., 1:9, 2:10] for f in frames]  # strided (C, T, H, W) crops
    clips[1] = clips[1].flip(-1)  # a contiguous one too
    out = NormalizedStack(SPEC.mean, SPEC.std)(clips)
    assert out.shape == (3, 3, 4, 8, 8) and out.is_contiguous()
    assert torch.allclose(out, normalize(torch.stack(clips), SPEC.mean, SPEC.std), atol=1e-5)


@pytest.mark.parametrize("workers", [0, 2])
def test_uint8_output_normalised_on_the_device_equals_float_output(clean_videos, images, workers):
    """output="uint8": raw pixels in the batch (a quarter of the bytes), and normalize_batch(x, mean, std)
    gives exactly the output="float" batch. Images: timm's float path, to float rounding."""
    from datasets.transforms import normalize_batch

    folder, _, _ = clean_videos
    for train, spec in ((True, SPEC), (False, EVAL_SPEC)):
        kw = dict(train=train, batch_size=4, seed=5, samples_per_epoch=20 if train else None)
        as_float = list(make_loader(build_video_dataset(folder, spec=spec, **kw), num_workers=workers))
        as_uint8 = list(make_loader(build_video_dataset(folder, spec=replace(spec, output="uint8"), **kw),
                                    num_workers=workers))
        assert len(as_float) == len(as_uint8) > 0
        for f, u in zip(as_float, as_uint8):
            assert u["video"].dtype == torch.uint8 and u["video"].shape == f["video"].shape
            assert f["video_id"] == u["video_id"] and torch.equal(f["frame_index"], u["frame_index"])
            assert torch.equal(normalize_batch(u["video"], spec.mean, spec.std), f["video"])
    image_folder, _ = images
    spec = ImageSpec(size=16, crop_pct=0.875)
    f = next(iter(build_image_dataset(image_folder, train=False, spec=spec, batch_size=4)))
    u = next(iter(build_image_dataset(image_folder, train=False, spec=replace(spec, output="uint8"), batch_size=4)))
    assert u["image"].dtype == torch.uint8 and f["key"] == u["key"]
    assert torch.allclose(normalize_batch(u["image"], spec.mean, spec.std), f["image"], atol=1e-5)
