"""Shard writing, manifests and source resolution: datasets/{encode,writer,manifest,build}.py.

All data is made here: images with Pillow, mp4 clips with PyAV.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from datasets.build import (
    BuildError,
    build_image_shards,
    build_kinetics_shards,
    clip_name,
)
from datasets.encode import VideoDecodeError, encode_video, probe_video, reencode_short_side
from datasets.manifest import (
    FORMAT,
    Manifest,
    ManifestError,
    ShardInfo,
    read_manifest,
    resolve_source,
    write_manifest,
)
from datasets.writer import (
    PlanItem,
    SkipSample,
    parse_size,
    plan_shards,
    sanitize_key,
    write_shard,
    write_shards,
)

# ----------------------------------------------------------------------------- helpers


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} of one shard, read with plain tarfile."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def all_samples(folder: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    for p in sorted(folder.glob("shards-*.tar")):
        out.update(tar_samples(p))
    return out


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shards-*.tar"))}


def save_image(path: Path, seed: int, size: tuple[int, int] = (24, 16), fmt: str = "JPEG") -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """3 classes, 10 images (jpg, JPEG, png), one nested, one non-image file, one loose file."""
    root = tmp_path / "imgs"
    files = {
        "cat/c1.jpg": "JPEG", "cat/c2.JPEG": "JPEG", "cat/c3.png": "PNG", "cat/sub/c4.jpg": "JPEG",
        "dog/d1.jpg": "JPEG", "dog/d2.png": "PNG", "dog/d3.jpg": "JPEG",
        "emu/e1.jpg": "JPEG", "emu/e2.jpg": "JPEG", "emu/e3.jpeg": "JPEG",
    }
    for i, (rel, fmt) in enumerate(sorted(files.items())):
        save_image(root / rel, seed=i, size=(16 + 8 * i, 16), fmt=fmt)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "README").write_text("loose file")
    return root


def moving_frames(t: int = 12, h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[:] = rng.integers(0, 255, 3, dtype=np.uint8)
    for i in range(t):
        frames[i, 10:20, 2 * i:2 * i + 10] = 255
    return frames


@pytest.fixture
def kinetics(tmp_path: Path) -> tuple[Path, Path]:
    """CSV with 5 rows: 2 good clips (top level, label folder with underscores), 1 missing,
    1 garbage .mp4, 1 row of another split."""
    videos = tmp_path / "videos"
    (videos / "playing_drums").mkdir(parents=True)
    rows = [
        ("abseiling", "aaa", 0, 10, "train"),
        ("playing drums", "b-b_b", 5, 15, "train"),
        ("abseiling", "missing1", 1, 11, "train"),
        ("yoga", "garbage", 2, 12, "train"),
        ("yoga", "valclip", 3, 13, "val"),
    ]
    (videos / f"{clip_name('aaa', 0, 10)}.mp4").write_bytes(encode_video(moving_frames(12, seed=1), 10))
    (videos / "playing_drums" / f"{clip_name('b-b_b', 5, 15)}.mp4").write_bytes(
        encode_video(moving_frames(8, 64, 96, seed=2), 25))
    (videos / f"{clip_name('garbage', 2, 12)}.mp4").write_bytes(b"\x00not a video" * 50)
    (videos / f"{clip_name('valclip', 3, 13)}.mp4").write_bytes(encode_video(moving_frames(6, seed=3), 8))
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split,is_cc\n"
                   + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]},{r[4]},0\n" for r in rows))
    return csv, videos


# ----------------------------------------------------------------------------- encode / probe


def test_encode_probe_round_trip():
    frames = moving_frames(12, 48, 64)
    data = encode_video(frames, 10)
    assert data[4:8] == b"ftyp"  # an mp4 container
    info = probe_video(data)
    assert (info.num_frames, info.width, info.height) == (12, 64, 48)
    assert info.fps == pytest.approx(10.0)
    assert info.duration == pytest.approx(1.2)
    with av.open(io.BytesIO(data)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6  # lossy but close
    assert encode_video(frames, 10) == data  # deterministic


def test_encode_is_deterministic_when_interleaved():
    """Regression: x264's AVX-512 path gave different bytes for the same 32x32 frames depending on
    what the process encoded before (about 1 in 10). encode_video disables it."""
    rng = np.random.default_rng(5)
    f = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    g = rng.integers(0, 255, (16, 32, 32, 3), dtype=np.uint8)
    ref = encode_video(f, 8, crf=18)
    for _ in range(20):
        encode_video(g, 8, crf=18)
        assert encode_video(f, 8, crf=18) == ref


def test_encode_ntsc_rate_and_mpeg4():
    info = probe_video(encode_video(moving_frames(6), 29.97))
    assert info.fps == pytest.approx(29.97, abs=1e-3) and info.num_frames == 6
    assert probe_video(encode_video(moving_frames(5), 15, codec="mpeg4")).num_frames == 5


def test_probe_counts_packets_when_container_has_no_frame_count():
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as c:  # mkv records no per-stream frame count
        stream = c.add_stream("mpeg4", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for f in moving_frames(9):
            for p in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in stream.encode(None):
            c.mux(p)
    with av.open(io.BytesIO(buf.getvalue())) as c:
        assert c.streams.video[0].frames == 0
    info = probe_video(buf.getvalue())
    assert (info.num_frames, info.width, info.height) == (9, 64, 48)
    assert info.fps == pytest.approx(12)


def test_encode_rejects_bad_input():
    with pytest.raises(ValueError, match="even frame sizes.*H=47"):
        encode_video(moving_frames(4, 47, 64), 8)
    assert probe_video(encode_video(moving_frames(4, 47, 63), 8, pad_odd=True)).width == 64
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((4, 16, 16, 3), np.float32), 8)
    with pytest.raises(ValueError, match="fps"):
        encode_video(moving_frames(2), 0)


def test_probe_garbage_and_truncated():
    with pytest.raises(VideoDecodeError):
        probe_video(b"garbage" * 100)
    data = encode_video(moving_frames(12), 10)
    with pytest.raises(VideoDecodeError):
        probe_video(data[: len(data) // 3])


def test_reencode_short_side_keeps_fps_and_aspect():
    data = encode_video(moving_frames(10, 48, 64), 12)
    small = reencode_short_side(data, 24)
    info = probe_video(small)
    assert (info.width, info.height, info.num_frames) == (32, 24, 10)
    assert info.fps == pytest.approx(12)
    portrait = probe_video(reencode_short_side(encode_video(moving_frames(4, 100, 50), 8), 20))
    assert (portrait.width, portrait.height) == (20, 40)
    odd = probe_video(reencode_short_side(encode_video(moving_frames(4, 48, 70), 8), 30))
    assert (odd.width, odd.height) == (44, 30)  # 70 * 30 / 48 = 43.75 -> even 44


# ----------------------------------------------------------------------------- writer


@pytest.mark.parametrize("text,expected", [
    ("1GB", 10**9), ("500MB", 500 * 10**6), ("64k", 64000), ("2GiB", 2 * 2**30), ("1.5MB", 1_500_000),
    ("123", 123), ("0", None), (None, None),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_parse_size_error():
    with pytest.raises(ValueError, match="'lots'"):
        parse_size("lots")


def test_sanitize_key():
    assert sanitize_key("n01440764/n01440764_10026") == "n01440764__n01440764_10026"
    assert sanitize_key("a b.c/d") == "a_b_c__d"
    assert "." not in sanitize_key("x.y.z") and "/" not in sanitize_key("x/y")


def _items(sizes):
    return [PlanItem(key=f"k{i:03d}", size=s, payload={"i": i}) for i, s in enumerate(sizes)]


@pytest.mark.parametrize("sizes,max_count,max_size,expected", [
    ([4, 4, 4, 4, 4], 3, 10, [2, 2, 1]),
    ([4, 4, 4, 4, 4], 3, None, [3, 2]),
    ([4, 4, 4, 4, 4], 10, 8, [2, 2, 1]),
    ([1, 20, 1, 1], 10, 5, [1, 1, 2]),  # a sample larger than max_size gets its own shard
    ([5], 1, 1, [1]),
    ([1] * 7, 7, None, [7]),
])
def test_plan_shards_table(sizes, max_count, max_size, expected):
    plans = plan_shards(_items(sizes), max_count=max_count, max_size=max_size)
    assert [len(p.items) for p in plans] == expected
    assert [p.name for p in plans] == [f"shards-{i:06d}.tar" for i in range(len(expected))]
    again = plan_shards(_items(sizes), max_count=max_count, max_size=max_size)
    assert [p.fingerprint for p in plans] == [p.fingerprint for p in again]
    other = plan_shards(_items(sizes), max_count=max_count, max_size=max_size, options={"short_side": 320})
    assert plans[0].fingerprint != other[0].fingerprint


def test_plan_rejects_duplicate_keys():
    with pytest.raises(ValueError, match="duplicate sample key 'k'"):
        plan_shards([PlanItem("k", 1, 0), PlanItem("k", 1, 1)], max_count=5)


def _payload_sample(payload):
    if payload.get("skip"):
        raise SkipSample("told to skip")
    if payload.get("boom"):
        raise RuntimeError("simulated crash")
    return {"txt": str(payload["i"]).encode(), "cls": b"0"}


def test_exception_mid_shard_leaves_no_tar(tmp_path: Path):
    items = [PlanItem(f"k{i}", 1, {"i": i, "boom": i == 2}) for i in range(4)]
    (plan,) = plan_shards(items, max_count=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_shard(tmp_path, plan, _payload_sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .tar, and the .tmp is cleaned up


def test_crash_in_later_shard_keeps_earlier_and_rerun_completes(tmp_path: Path):
    items = [PlanItem(f"k{i}", 1, {"i": i, "boom": i == 5}) for i in range(6)]
    plans = plan_shards(items, max_count=2)
    with pytest.raises(RuntimeError):
        write_shards(tmp_path, plans, _payload_sample)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shards-000000.tar", "shards-000001.tar"]
    assert not list(tmp_path.glob("*.tmp"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    fixed = [PlanItem(f"k{i}", 1, {"i": i}) for i in range(6)]
    results = write_shards(tmp_path, plan_shards(fixed, max_count=2), _payload_sample)
    assert [r.reused for r in results] == [False, False, False]  # payload changed -> new fingerprints
    # with an unchanged plan, finished shards survive: crash again in the last shard only
    (tmp_path / "shards-000002.tar").unlink()
    (tmp_path / "shards-000002.tar.tmp").write_bytes(b"partial garbage from a killed run")
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    results = write_shards(tmp_path, plan_shards(fixed, max_count=2), _payload_sample)
    assert [r.reused for r in results] == [True, True, False]
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shards-00000[01].tar")} == {
        k: v for k, v in mtimes.items() if k != "shards-000002.tar"}
    assert not list(tmp_path.glob("*.tmp"))
    assert tar_samples(tmp_path / "shards-000002.tar") == {"k4": {"cls": b"0", "txt": b"4"},
                                                           "k5": {"cls": b"0", "txt": b"5"}}


def test_tar_without_done_marker_is_rebuilt(tmp_path: Path):
    plans = plan_shards([PlanItem(f"k{i}", 1, {"i": i}) for i in range(3)], max_count=2)
    write_shards(tmp_path, plans, _payload_sample)
    (tmp_path / "shards-000001.tar.done").unlink()  # crash between rename and marker
    results = write_shards(tmp_path, plans, _payload_sample)
    assert [r.reused for r in results] == [True, False]


def test_skip_sample_is_recorded(tmp_path: Path):
    items = [PlanItem(f"k{i}", 1, {"i": i, "skip": i == 1}) for i in range(3)]
    (res,) = write_shards(tmp_path, plan_shards(items, max_count=5), _payload_sample)
    assert res.count == 2 and res.skipped == [{"key": "k1", "reason": "told to skip"}]
    assert sorted(tar_samples(tmp_path / res.name)) == ["k0", "k2"]
    (again,) = write_shards(tmp_path, plan_shards(items, max_count=5), _payload_sample)
    assert again.reused and again.skipped == res.skipped


# ----------------------------------------------------------------------------- images


def test_image_round_trip(image_tree: Path, tmp_path: Path):
    out = tmp_path / "shards"
    m = build_image_shards(image_tree, out, max_count=4)
    assert m.kind == "image" and m.classes == ["cat", "dog", "emu"]
    assert [s.count for s in m.shards] == [4, 4, 2] and m.total_samples == 10
    samples = all_samples(out)
    assert len(samples) == 10
    for key, s in samples.items():
        meta = json.loads(s["json"])
        (ext,) = set(s) - {"cls", "json"}
        src = image_tree / meta["path"]
        assert s[ext] == src.read_bytes(), key  # bytes unchanged
        assert ext == src.suffix[1:].lower()
        assert meta["label"] == src.relative_to(image_tree).parts[0]
        assert int(s["cls"]) == m.classes.index(meta["label"])
    assert "cat__sub__c4" in samples  # nested file, sanitised key
    assert samples["cat__c2"].keys() == {"jpeg", "cls", "json"}
    # webdataset groups members into the same samples
    n = sum(1 for _ in wds.WebDataset(resolve_source(out).urls, shardshuffle=False))
    assert n == 10


def test_image_manifest_contents(image_tree: Path, tmp_path: Path):
    out = tmp_path / "shards"
    build_image_shards(image_tree, out, max_count=3)
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == FORMAT and raw["kind"] == "image"
    assert raw["total_samples"] == 10 == sum(s["count"] for s in raw["shards"])
    assert raw["total_bytes"] == sum((out / s["name"]).stat().st_size for s in raw["shards"])
    assert all(s["bytes"] == (out / s["name"]).stat().st_size for s in raw["shards"])
    assert set(raw["created"]) >= {"command", "args", "time", "versions"}
    assert raw["created"]["args"]["max_count"] == 3 and "av" in raw["created"]["versions"]
    m = read_manifest(out)
    assert m.location == str(out.resolve()) and m.urls()[0] == str(out.resolve() / "shards-000000.tar")


def test_image_key_collisions_are_disambiguated(tmp_path: Path):
    root = tmp_path / "r"
    for rel in ("a/x.jpg", "a/x.png", "a/y.z.jpg", "a/y_z.jpg"):
        save_image(root / rel, seed=len(rel), fmt="PNG" if rel.endswith("png") else "JPEG")
    build_image_shards(root, tmp_path / "o", max_count=10)
    samples = all_samples(tmp_path / "o")
    assert len(samples) == 4
    assert {json.loads(s["json"])["path"] for s in samples.values()} == {"a/x.jpg", "a/x.png", "a/y.z.jpg", "a/y_z.jpg"}


def test_image_classes_file_order_and_unknown_class(image_tree: Path, tmp_path: Path):
    cls_file = tmp_path / "classes.txt"
    cls_file.write_text("# my order\nemu\ncat\ndog\nzebra\n")
    m = build_image_shards(image_tree, tmp_path / "o", max_count=100, classes=cls_file)
    assert m.classes == ["emu", "cat", "dog", "zebra"]
    for s in all_samples(tmp_path / "o").values():
        assert int(s["cls"]) == m.classes.index(json.loads(s["json"])["label"])
    cls_file.write_text("cat\nemu\n")
    with pytest.raises(BuildError, match="class folder 'dog'"):
        build_image_shards(image_tree, tmp_path / "o2", max_count=100, classes=cls_file)


def test_image_errors(tmp_path: Path):
    with pytest.raises(BuildError, match="nope"):
        build_image_shards(tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(BuildError, match="no images"):
        build_image_shards(tmp_path / "empty", tmp_path / "o")


def test_rerun_skips_finished_shards_and_overwrite_rebuilds(image_tree: Path, tmp_path: Path):
    out = tmp_path / "o"
    build_image_shards(image_tree, out, max_count=4)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    data = shard_bytes(out)
    m = build_image_shards(image_tree, out, max_count=4)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")} == before
    assert m.total_samples == 10
    # a new image sorting last only changes the last shard
    save_image(image_tree / "emu" / "zz.jpg", seed=99)
    build_image_shards(image_tree, out, max_count=4)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert after["shards-000000.tar"] == before["shards-000000.tar"]
    assert after["shards-000001.tar"] == before["shards-000001.tar"]
    assert after["shards-000002.tar"] != before["shards-000002.tar"]
    assert read_manifest(out).total_samples == 11
    (image_tree / "emu" / "zz.jpg").unlink()
    m = build_image_shards(image_tree, out, max_count=4, overwrite=True)
    assert shard_bytes(out) == data  # rebuilt, identical bytes
    assert all(p.stat().st_mtime_ns != before[p.name] for p in out.glob("*.tar"))


def test_workers_two_equals_one(image_tree: Path, tmp_path: Path):
    m1 = build_image_shards(image_tree, tmp_path / "w1", max_count=3, workers=1)
    m2 = build_image_shards(image_tree, tmp_path / "w2", max_count=3, workers=2)
    assert shard_bytes(tmp_path / "w1") == shard_bytes(tmp_path / "w2")
    assert m1.shards == m2.shards and len(m1.shards) == 4


def test_max_size_splitting(image_tree: Path, tmp_path: Path):
    files = sorted((p for p in image_tree.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")),
                   key=lambda p: sanitize_key(p.relative_to(image_tree).as_posix().rsplit(".", 1)[0]))
    sizes = [p.stat().st_size for p in files]
    limit = max(sizes) + min(sizes)
    m = build_image_shards(image_tree, tmp_path / "o", max_count=100, max_size=limit)
    expected = [len(p.items) for p in plan_shards(_items(sizes), max_count=100, max_size=limit)]
    assert [s.count for s in m.shards] == expected and len(expected) > 2
    size_of = {json.dumps(p.relative_to(image_tree).as_posix()): p.stat().st_size for p in files}
    for shard in (tmp_path / "o").glob("*.tar"):
        src = [size_of[json.dumps(json.loads(s["json"])["path"])] for s in tar_samples(shard).values()]
        assert sum(src) <= limit or len(src) == 1


# ----------------------------------------------------------------------------- kinetics


def test_kinetics_round_trip_and_report(kinetics, tmp_path: Path):
    csv, videos = kinetics
    out = tmp_path / "k"
    m = build_kinetics_shards(csv, videos, out, split="train", max_count=10)
    assert m.kind == "video" and m.classes == ["abseiling", "playing drums", "yoga"]  # sorted CSV labels
    assert m.total_samples == 2
    samples = all_samples(out)
    a = samples["aaa_000000_000010"]
    assert a["mp4"] == (videos / "aaa_000000_000010.mp4").read_bytes()
    assert int(a["cls"]) == 0
    meta = json.loads(a["json"])
    assert meta == {"video_id": "aaa_000000_000010", "label": "abseiling", "fps": 10.0, "num_frames": 12,
                    "duration": pytest.approx(1.2), "width": 64, "height": 48, "youtube_id": "aaa",
                    "time_start": 0, "time_end": 10, "split": "train"}
    b = json.loads(samples["b-b_b_000005_000015"]["json"])
    assert (b["label"], b["num_frames"], b["fps"], b["width"]) == ("playing drums", 8, 25.0, 96)
    assert int(samples["b-b_b_000005_000015"]["cls"]) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["counts"] == {"rows": 4, "planned": 3, "written": 2, "missing": 1, "unreadable": 1,
                                "duplicates": 0}
    assert report["missing"][0]["file"] == "missing1_000001_000011.mp4"
    assert report["unreadable"][0]["key"] == "garbage_000002_000012"
    # a re-run reuses the shard and still reports the unreadable clip
    build_kinetics_shards(csv, videos, out, split="train", max_count=10)
    assert json.loads((out / "report.json").read_text())["counts"]["unreadable"] == 1


def test_kinetics_short_side_reencodes(kinetics, tmp_path: Path):
    csv, videos = kinetics
    m = build_kinetics_shards(csv, videos, tmp_path / "k", split="train", short_side=32)
    samples = all_samples(tmp_path / "k")
    b = samples["b-b_b_000005_000015"]
    meta = json.loads(b["json"])
    assert (meta["width"], meta["height"], meta["num_frames"], meta["fps"]) == (48, 32, 8, 25.0)
    assert probe_video(b["mp4"]).height == 32
    assert m.total_samples == 2


def test_kinetics_split_and_classes(kinetics, tmp_path: Path):
    csv, videos = kinetics
    m = build_kinetics_shards(csv, videos, tmp_path / "v", split="val")
    assert m.total_samples == 1 and m.classes == ["abseiling", "playing drums", "yoga"]
    assert int(all_samples(tmp_path / "v")["valclip_000003_000013"]["cls"]) == 2
    with pytest.raises(BuildError, match="no rows with split 'test'"):
        build_kinetics_shards(csv, videos, tmp_path / "t", split="test")
    cls = tmp_path / "cls.txt"
    cls.write_text("yoga\nabseiling\n")
    with pytest.raises(BuildError, match="class 'playing drums'"):
        build_kinetics_shards(csv, videos, tmp_path / "c", classes=cls)


def test_kinetics_csv_errors(kinetics, tmp_path: Path):
    _, videos = kinetics
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(BuildError, match="empty.csv.*is empty"):
        build_kinetics_shards(empty, videos, tmp_path / "o")
    header = tmp_path / "header.csv"
    header.write_text("label,youtube_id,time_start,time_end,split\n")
    with pytest.raises(BuildError, match="no rows"):
        build_kinetics_shards(header, videos, tmp_path / "o")
    bad = tmp_path / "bad.csv"
    bad.write_text("label,youtube_id,start,end\nx,y,1,2\n")
    with pytest.raises(BuildError, match="lacks column"):
        build_kinetics_shards(bad, videos, tmp_path / "o")
    bad.write_text("label,youtube_id,time_start,time_end,split\nx,y,soon,2,train\n")
    with pytest.raises(BuildError, match="line 2: time_start='soon'"):
        build_kinetics_shards(bad, videos, tmp_path / "o")


# ----------------------------------------------------------------------------- manifests and sources


@pytest.fixture
def shard_folder(tmp_path: Path) -> Path:
    out = tmp_path / "s"
    items = [PlanItem(f"k{i}", 1, {"i": i}) for i in range(7)]
    results = write_shards(out, plan_shards(items, max_count=2), _payload_sample)
    write_manifest(out, Manifest(kind="image", classes=["a"], shards=[
        ShardInfo(r.name, r.count, r.bytes) for r in results]))
    return out


def test_resolve_source_forms(shard_folder: Path):
    names = [f"shards-{i:06d}.tar" for i in range(4)]
    full = [str(shard_folder.resolve() / n) for n in names]
    src = resolve_source(shard_folder)
    assert src.urls == full and src.manifest is not None and src.num_samples == 7 and src.classes == ["a"]
    assert resolve_source(shard_folder / "manifest.json").urls == full
    assert resolve_source(str(shard_folder / "manifest.json")).num_samples == 7
    pat = resolve_source(str(shard_folder / "shards-{000001..000003}.tar"))
    assert pat.urls == full[1:] and pat.num_samples == 5  # manifest found next to the shards
    lst = resolve_source([full[0], str(shard_folder / names[3])])
    assert lst.urls == [full[0], full[3]] and lst.num_samples == 3
    single = resolve_source(full[2])
    assert single.urls == [full[2]] and single.num_samples == 2
    (shard_folder / "manifest.json").unlink()
    bare = resolve_source(shard_folder)
    assert bare.urls == full and bare.manifest is None and bare.num_samples is None


def test_resolve_remote_sources(shard_folder: Path):
    pipe = "pipe:aws s3 cp s3://bucket/train/shards-000000.tar -"
    assert resolve_source(pipe).urls == [pipe]
    assert resolve_source("https://h/x/shards-{000000..000002}.tar").urls == [
        f"https://h/x/shards-{i:06d}.tar" for i in range(3)]
    assert resolve_source("s3://b/p/shards-000004.tar").urls == ["pipe:aws s3 cp s3://b/p/shards-000004.tar -"]
    # a remote prefix ending in "/" reads its manifest.json (file:// is handled by webdataset's gopen)
    prefix = shard_folder.resolve().as_uri() + "/"
    src = resolve_source(prefix)
    assert src.urls == [prefix + f"shards-{i:06d}.tar" for i in range(4)] and src.num_samples == 7
    assert sum(1 for _ in wds.WebDataset(src.urls, shardshuffle=False)) == 7
    with pytest.raises(ManifestError, match="cannot read manifest.json under"):
        resolve_source(shard_folder.resolve().as_uri() + "/nothing/")


def test_resolve_source_errors(shard_folder: Path, tmp_path: Path):
    with pytest.raises(ManifestError, match="missing_dir.*does not exist"):
        resolve_source(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match="empty.*neither manifest.json nor .tar"):
        resolve_source(tmp_path / "empty")
    with pytest.raises(ManifestError, match="matches no existing file"):
        resolve_source(str(tmp_path / "x-{000000..000003}.tar"))
    with pytest.raises(ManifestError, match="1 of 5 shards do not exist"):
        resolve_source(str(shard_folder / "shards-{000000..000004}.tar"))
    (shard_folder / "shards-000003.tar").unlink()
    with pytest.raises(ManifestError, match="shards-000003.tar"):
        resolve_source(shard_folder)


def test_read_manifest_errors(shard_folder: Path, tmp_path: Path):
    with pytest.raises(ManifestError, match="nowhere.*does not exist"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "bare").mkdir()
    with pytest.raises(ManifestError, match="bare.*has no manifest.json"):
        read_manifest(tmp_path / "bare")
    path = shard_folder / "manifest.json"
    obj = json.loads(path.read_text())
    path.write_text("{not json")
    with pytest.raises(ManifestError, match="invalid manifest.*manifest.json"):
        read_manifest(shard_folder)
    for field, value, msg in [("format", "other/9", "format"), ("kind", "audio", "kind"),
                              ("total_samples", 3, "total_samples"), ("shards", [{"name": "x"}], "shards")]:
        path.write_text(json.dumps({**obj, field: value}))
        with pytest.raises(ManifestError, match=msg):
            read_manifest(shard_folder)
    os.remove(path)
