"""Shard builders: an ImageNet-style image tree or a Kinetics-style clip folder -> WebDataset shards.

Both builders follow the same steps (the CLI ``jobs/make_shards.py`` is a thin wrapper):

1. list the samples and sort them by key;
2. plan shards by ``max_count`` samples and ``max_size`` bytes of source data (:func:`plan_shards`);
3. write unfinished shards atomically, optionally with a process pool (:func:`write_shards`);
4. write ``manifest.json`` (classes in index order, shards, totals, how it was made).

Sample format (what :mod:`datasets` readers expect)::

    image:  <key>.jpg|jpeg|png|webp|bmp  encoded bytes unchanged
            <key>.cls                    class index, ASCII decimal
            <key>.json                   {"path": "n01440764/x.JPEG", "label": "n01440764"}
    video:  <key>.mp4                    clip bytes unchanged (re-encoded with --short-side)
            <key>.cls                    class index, ASCII decimal
            <key>.json                   {"video_id", "label", "fps", "num_frames", "duration", "width",
                                          "height", + Kinetics: "youtube_id", "time_start", "time_end", "split"}
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from datasets.encode import VideoDecodeError, probe_video, reencode_short_side
from datasets.manifest import Manifest, ShardInfo, write_manifest
from datasets.writer import (
    PlanItem,
    ShardResult,
    SkipSample,
    plan_shards,
    sanitize_key,
    write_shards,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "BuildError",
    "build_image_shards",
    "build_kinetics_shards",
    "build_shards",
    "read_class_list",
    "tool_versions",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end", "split")


class BuildError(ValueError):
    """Bad builder input (missing folder, empty CSV, unknown class, ...): the message names it."""


# ----------------------------------------------------------------------------- common steps


def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape shard bytes, recorded in every manifest."""
    out = {"python": platform.python_version()}
    for dist in ("glimpse", "av", "webdataset", "pillow", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        import av

        out["ffmpeg"] = ".".join(map(str, av.library_versions.get("libavcodec", ())))
    except Exception:  # PyAV layout differs across versions; the version is nice to have only
        pass
    return out


def read_class_list(path: str | os.PathLike) -> list[str]:
    """Class names, one per line (blank lines and ``#`` comments ignored), in index order."""
    p = Path(path)
    if not p.is_file():
        raise BuildError(f"class list {str(p)!r} does not exist")
    names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise BuildError(f"class list {str(p)!r} is empty")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BuildError(f"class list {str(p)!r} names {dup[0]!r} more than once")
    return names


def build_shards(
    out: str | os.PathLike,
    *,
    kind: str,
    classes: Sequence[str],
    items: Sequence[PlanItem],
    make_sample: Callable[[Any], dict[str, bytes]],
    max_count: int,
    max_size: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    options: dict[str, Any] | None = None,
    info: dict[str, Any] | None = None,
    args: dict[str, Any] | None = None,
    desc: str = "samples",
) -> tuple[Manifest, list[ShardResult]]:
    """Plan, write and describe shards for ``items`` (already in canonical order) in folder ``out``.

    ``options`` are the builder settings that change shard bytes (they enter the plan fingerprint,
    so changing them rebuilds finished shards); ``args`` are recorded in the manifest only.
    """
    out = Path(out)
    if not items:
        raise BuildError(f"no samples to write to {str(out)!r}")
    plans = plan_shards(items, max_count=max_count, max_size=max_size, options=options)
    log.info("%s: %d samples planned into %d shards (max_count=%d, max_size=%s)",
             out, len(items), len(plans), max_count, max_size or "none")
    results = write_shards(out, plans, make_sample, workers=workers, overwrite=overwrite, desc=desc)
    manifest = Manifest(
        kind=kind,
        classes=list(classes),
        shards=[ShardInfo(name=r.name, count=r.count, bytes=r.bytes) for r in results],
        created={
            "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "",
            "args": {"max_count": max_count, "max_size": max_size, "workers": workers,
                     **(options or {}), **(args or {})},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "versions": tool_versions(),
        },
        info=info or {},
        location=str(out.resolve()),
    )
    write_manifest(out, manifest)
    log.info("%s: %d samples in %d shards, %.1f MB; manifest written", out,
             manifest.total_samples, len(results), manifest.total_bytes / 1e6)
    return manifest, results


# ----------------------------------------------------------------------------- images


def _image_sample(payload: dict[str, Any]) -> dict[str, bytes]:
    """Worker side of the image builder: the file's bytes as they are, class index and path."""
    with open(payload["file"], "rb") as f:
        data = f.read()
    return {
        payload["ext"]: data,
        "cls": str(payload["index"]).encode("ascii"),
        "json": json.dumps({"path": payload["path"], "label": payload["label"]}).encode("utf-8"),
    }


def _unique_key(key: str, name: str, seen: set[str]) -> str:
    if key in seen:  # sanitising mapped two names to one key: disambiguate deterministically
        key = f"{key}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    seen.add(key)
    return key


def build_image_shards(
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_count: int = 1000,
    max_size: int | None = None,
    workers: int = 1,
    classes: Sequence[str] | str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Shard an ImageNet-layout tree ``root/<class>/<file>`` (any depth below the class folder).

    Classes are the sorted class folder names, or ``classes`` (a list or a file with one name per
    line) which fixes the index order; an image in a folder missing from that list is an error.
    Files whose extension is not one of ``IMAGE_EXTENSIONS`` are skipped (and counted in the log).
    Image bytes are stored unchanged under their lowercase extension.
    """
    root = Path(root)
    if not root.is_dir():
        raise BuildError(f"image folder {str(root)!r} does not exist")
    class_dirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        class_names = class_dirs
    elif isinstance(classes, (str, os.PathLike)):
        class_names = read_class_list(classes)
    else:
        class_names = list(classes)
    index = {c: i for i, c in enumerate(class_names)}

    items: list[PlanItem] = []
    skipped: list[str] = []
    seen: set[str] = set()
    loose = [p.name for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    if loose:
        log.warning("%s: ignoring %d files outside class folders, e.g. %r", root, len(loose), sorted(loose)[0])
    for cname in class_dirs:
        files = []
        for dirpath, dirnames, filenames in os.walk(root / cname):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(dirpath) / f for f in filenames if not f.startswith("."))
        images = [f for f in files if f.suffix[1:].lower() in IMAGE_EXTENSIONS]
        skipped.extend(str(f.relative_to(root)) for f in files if f.suffix[1:].lower() not in IMAGE_EXTENSIONS)
        if images and cname not in index:
            raise BuildError(
                f"class folder {cname!r} in {str(root)!r} is not in the class list "
                f"({len(class_names)} classes, e.g. {class_names[:3]})"
            )
        for f in images:
            rel = f.relative_to(root).as_posix()
            key = _unique_key(sanitize_key(rel.rsplit(".", 1)[0]), rel, seen)
            items.append(PlanItem(key=key, size=f.stat().st_size, payload={
                "file": str(f.resolve()), "path": rel, "ext": f.suffix[1:].lower(),
                "label": cname, "index": index[cname],
            }))
    if skipped:
        log.warning("%s: skipped %d files that are not images (%s), e.g. %r",
                    root, len(skipped), "/".join(IMAGE_EXTENSIONS), sorted(skipped)[0])
    if not items:
        raise BuildError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {str(root)!r}/<class>/")
    empty = [c for c in class_names if c not in {it.payload["label"] for it in items}]
    if empty:
        log.warning("%s: %d classes have no images, e.g. %r", root, len(empty), empty[0])
    items.sort(key=lambda it: it.key)
    manifest, _ = build_shards(
        out, kind="image", classes=class_names, items=items, make_sample=_image_sample,
        max_count=max_count, max_size=max_size, workers=workers, overwrite=overwrite,
        options={"format": "image/1"}, args={"root": str(root.resolve())},
        info={"source": "images", "root": str(root.resolve())}, desc="images",
    )
    return manifest


# ----------------------------------------------------------------------------- kinetics


def _norm_label(name: str) -> str:
    """Folder names vs CSV labels: ``"air drumming"`` == ``"air_drumming"`` == ``"Air-Drumming"``."""
    return re.sub(r"[^0-9a-z]+", "", name.lower())


def _parse_time(value: str, csv_path: Path, line: int, column: str) -> int:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise BuildError(f"{str(csv_path)!r} line {line}: {column}={value!r} is not a number") from None
    if t < 0 or t != int(t):
        raise BuildError(f"{str(csv_path)!r} line {line}: {column}={value!r} must be a whole number of seconds >= 0")
    return int(t)


def read_kinetics_csv(csv_path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a Kinetics-400/600 annotation CSV (header ``label,youtube_id,time_start,time_end,split``;
    extra columns such as ``is_cc`` are ignored). Each row also gets ``line`` (1-based, header = 1).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise BuildError(f"annotation CSV {str(csv_path)!r} does not exist")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise BuildError(f"annotation CSV {str(csv_path)!r} is empty (expected header {','.join(KINETICS_COLUMNS)})")
        header = [h.strip() for h in reader.fieldnames]
        missing = [c for c in KINETICS_COLUMNS if c not in header]
        if missing:
            raise BuildError(
                f"annotation CSV {str(csv_path)!r} lacks column(s) {missing} (header is {header}; "
                f"expected {','.join(KINETICS_COLUMNS)})"
            )
        reader.fieldnames = header
        rows = []
        for line, row in enumerate(reader, start=2):
            if not any((v or "").strip() for v in row.values()):
                continue
            label, yid = (row["label"] or "").strip(), (row["youtube_id"] or "").strip()
            if not label or not yid:
                raise BuildError(f"{str(csv_path)!r} line {line}: empty label or youtube_id")
            rows.append({
                "label": label, "youtube_id": yid,
                "time_start": _parse_time(row["time_start"], csv_path, line, "time_start"),
                "time_end": _parse_time(row["time_end"], csv_path, line, "time_end"),
                "split": (row["split"] or "").strip(), "line": line,
            })
    if not rows:
        raise BuildError(f"annotation CSV {str(csv_path)!r} has a header but no rows")
    return rows


def clip_name(youtube_id: str, time_start: int, time_end: int) -> str:
    """``clip_name("abc", 10, 20) == "abc_000010_000020"`` (the Kinetics downloader's file stem)."""
    return f"{youtube_id}_{time_start:06d}_{time_end:06d}"


def _index_clips(videos: Path) -> dict[str, list[Path]]:
    """``<stem>.mp4`` -> paths, for ``videos/*.mp4`` and ``videos/<label>/*.mp4`` (one scan, no stat per row)."""
    found: dict[str, list[Path]] = {}
    with os.scandir(videos) as top:
        entries = sorted(top, key=lambda e: e.name)
    for e in entries:
        if e.is_file() and e.name.lower().endswith(".mp4"):
            found.setdefault(e.name[:-4], []).append(Path(e.path))
        elif e.is_dir() and not e.name.startswith("."):
            with os.scandir(e.path) as sub:
                for s in sorted(sub, key=lambda s: s.name):
                    if s.is_file() and s.name.lower().endswith(".mp4"):
                        found.setdefault(s.name[:-4], []).append(Path(s.path))
    return found


def _pick_clip(candidates: list[Path], videos: Path, label: str) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    want = _norm_label(label)
    for c in candidates:  # prefer the top level, then the folder named after the label
        if c.parent == videos:
            return c
    for c in candidates:
        if _norm_label(c.parent.name) == want:
            return c
    log.warning("clip %s found in several folders, using %s", candidates[0].name, candidates[0])
    return candidates[0]


def _video_sample(payload: dict[str, Any], short_side: int | None = None) -> dict[str, bytes]:
    """Worker side of the video builder: read, probe (unreadable -> skip), maybe re-encode."""
    path = payload["file"]
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise SkipSample(f"cannot read {path}: {e}") from None
    try:
        vi = probe_video(data)
        if short_side is not None and min(vi.width, vi.height) > short_side:
            # only shrink: upscaling small clips would cost bytes and add nothing
            data = reencode_short_side(data, short_side)
            vi = probe_video(data)
    except VideoDecodeError as e:
        raise SkipSample(f"unreadable video {path}: {e}") from None
    meta = {
        "video_id": payload["key"], "label": payload["label"], "fps": round(vi.fps, 6),
        "num_frames": vi.num_frames, "duration": round(vi.duration, 6),
        "width": vi.width, "height": vi.height, **payload.get("extra", {}),
    }
    return {"mp4": data, "cls": str(payload["index"]).encode("ascii"), "json": json.dumps(meta).encode("utf-8")}


def build_kinetics_shards(
    csv: str | os.PathLike,
    videos: str | os.PathLike,
    out: str | os.PathLike,
    *,
    split: str | None = None,
    short_side: int | None = None,
    classes: Sequence[str] | str | os.PathLike | None = None,
    max_count: int = 100,
    max_size: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
) -> Manifest:
    """Shard Kinetics-400/600 style clips listed in the annotation ``csv`` and stored in ``videos``.

    Clips are looked up as ``videos/<youtube_id>_<start:06d>_<end:06d>.mp4`` or
    ``videos/<label>/<same>.mp4`` (label folders may use spaces or underscores). Class indices are
    the sorted unique labels of the whole CSV (all splits: train and val built from one CSV agree),
    unless ``classes`` fixes them. ``split`` keeps only rows of that split. Missing clips (at plan
    time) and unreadable ones (probe fails, at write time) are skipped and listed in
    ``out/report.json``. ``short_side`` re-encodes clips whose shorter side is larger (H.264, same
    fps); smaller clips keep their bytes.
    """
    csv_path, videos, out = Path(csv), Path(videos), Path(out)
    rows = read_kinetics_csv(csv_path)
    if not videos.is_dir():
        raise BuildError(f"video folder {str(videos)!r} does not exist")
    if classes is None:
        class_names = sorted({r["label"] for r in rows})
    elif isinstance(classes, (str, os.PathLike)):
        class_names = read_class_list(classes)
    else:
        class_names = list(classes)
    index = {c: i for i, c in enumerate(class_names)}
    for r in rows:
        if r["label"] not in index:
            raise BuildError(
                f"{str(csv_path)!r} line {r['line']}: class {r['label']!r} is not in the class list "
                f"({len(class_names)} classes)"
            )
    if split is not None:
        splits = sorted({r["split"] for r in rows})
        rows = [r for r in rows if r["split"] == split]
        if not rows:
            raise BuildError(f"{str(csv_path)!r} has no rows with split {split!r} (splits present: {splits})")

    clips = _index_clips(videos)
    items: list[PlanItem] = []
    missing: list[dict[str, Any]] = []
    duplicates: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for r in rows:
        stem = clip_name(r["youtube_id"], r["time_start"], r["time_end"])
        key = sanitize_key(stem)
        if key in seen:
            duplicates.append({"key": key, "line": r["line"], "first_line": seen[key]})
            continue
        seen[key] = r["line"]
        cands = clips.get(stem)
        if not cands:
            missing.append({"key": key, "label": r["label"], "line": r["line"], "file": f"{stem}.mp4"})
            continue
        path = _pick_clip(cands, videos, r["label"])
        items.append(PlanItem(key=key, size=path.stat().st_size, payload={
            "file": str(path.resolve()), "key": key, "label": r["label"], "index": index[r["label"]],
            "extra": {"youtube_id": r["youtube_id"], "time_start": r["time_start"],
                      "time_end": r["time_end"], "split": r["split"]},
        }))
    items.sort(key=lambda it: it.key)
    if missing:
        log.warning("%d of %d clips listed in %s are missing from %s (see report.json), e.g. %s",
                    len(missing), len(missing) + len(items), csv_path.name, videos, missing[0]["file"])
    if duplicates:
        log.warning("%d duplicate rows in %s ignored, e.g. line %d", len(duplicates), csv_path.name,
                    duplicates[0]["line"])
    if not items:
        out.mkdir(parents=True, exist_ok=True)
        _write_report(out, csv_path, videos, split, missing, [], duplicates, planned=0, written=0)
        raise BuildError(f"none of the {len(rows)} clips listed in {str(csv_path)!r} exist under {str(videos)!r}")

    make = functools.partial(_video_sample, short_side=short_side)
    manifest, results = build_shards(
        out, kind="video", classes=class_names, items=items, make_sample=make,
        max_count=max_count, max_size=max_size, workers=workers, overwrite=overwrite,
        options={"format": "video/1", "short_side": short_side},
        args={"csv": str(csv_path.resolve()), "videos": str(videos.resolve()), "split": split},
        info={"source": "kinetics", "csv": csv_path.name, "split": split, "short_side": short_side},
        desc="clips",
    )
    unreadable = [s for r in results for s in r.skipped]
    if unreadable:
        log.warning("%d clips could not be read and were skipped (see report.json), e.g. %s",
                    len(unreadable), unreadable[0]["reason"])
    _write_report(out, csv_path, videos, split, missing, unreadable, duplicates,
                  planned=len(items), written=manifest.total_samples)
    return manifest


def _write_report(out: Path, csv_path: Path, videos: Path, split: str | None, missing: list, unreadable: list,
                  duplicates: list, *, planned: int, written: int) -> Path:
    report = {
        "csv": str(csv_path.resolve()), "videos": str(videos.resolve()), "split": split,
        "counts": {"rows": planned + len(missing) + len(duplicates), "planned": planned, "written": written,
                   "missing": len(missing), "unreadable": len(unreadable), "duplicates": len(duplicates)},
        "missing": missing, "unreadable": unreadable, "duplicates": duplicates,
    }
    path = out / "report.json"
    tmp = path.with_name("report.json.tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"{out}: {written} clips written, {len(missing)} missing, {len(unreadable)} unreadable, "
          f"{len(duplicates)} duplicate rows (details in {path})", file=sys.stderr)
    return path
