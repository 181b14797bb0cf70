"""Shard folder manifests and shard source resolution.

A shard folder written by ``jobs/make_shards.py`` holds ``shards-000000.tar``, ``shards-000001.tar``, ...
and a ``manifest.json``::

    {
      "format": "glimpse-shards/1",
      "kind": "image" | "video",
      "classes": ["left", "right", ...],            # class names in index order
      "shards": [{"name": "shards-000000.tar", "count": 100, "bytes": 123456}, ...],
      "total_samples": 496, "total_bytes": 2345678,
      "created": {"command": "...", "args": {...}, "time": "...", "versions": {...}},
      "info": {...}                                  # optional builder specific facts (preset, seed, ...)
    }

Readers accept a *source* in any of these forms (:func:`resolve_source`):

- a shard folder, or its ``manifest.json`` path: shard paths come from the manifest;
- a folder without a manifest: its ``*.tar`` files, sorted (no class names then);
- a brace pattern ``/data/k400/shards-{000000..000127}.tar``, a single ``.tar`` path, or a list of these;
- a remote URL webdataset understands: ``pipe:aws s3 cp s3://b/shards-000000.tar -``, ``http(s)://...``,
  ``gs://...``; ``s3://...`` is turned into ``pipe:aws s3 cp <url> -``;
- a remote prefix ending in ``/`` (``https://host/k400/train/``, ``s3://bucket/k400/train/``): its
  ``manifest.json`` is fetched and lists the shards.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import braceexpand

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "Manifest",
    "ManifestError",
    "ShardInfo",
    "ShardSource",
    "read_manifest",
    "resolve_source",
    "write_manifest",
]

FORMAT = "glimpse-shards/1"
MANIFEST_NAME = "manifest.json"
KINDS = ("image", "video")
_URL_RE = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]*://)")


class ManifestError(ValueError):
    """A shard source that cannot be used: missing folder, invalid manifest, no shards, ..."""


@dataclass(frozen=True)
class ShardInfo:
    """One shard as listed in a manifest: file name (relative to the folder), samples, bytes."""

    name: str
    count: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """A parsed ``manifest.json``. ``location`` is the folder or URL prefix it was read from."""

    kind: str
    classes: list[str]
    shards: list[ShardInfo]
    created: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    location: str | None = None
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def total_samples(self) -> int:
        return sum(s.count for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def urls(self) -> list[str]:
        """Shard locations: absolute paths for a local folder, ``prefix + name`` for a remote one."""
        if self.location is None:
            raise ManifestError("manifest has no location: it was not read from a folder or URL")
        if _is_url(self.location):
            return [_join_url(self.location, s.name) for s in self.shards]
        return [str(Path(self.location) / s.name) for s in self.shards]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "kind": self.kind,
            "classes": list(self.classes),
            "shards": [{"name": s.name, "count": s.count, "bytes": s.bytes} for s in self.shards],
            "total_samples": self.total_samples,
            "total_bytes": self.total_bytes,
            "created": self.created,
            "info": self.info,
        }

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Manifest:
        """Validate a decoded manifest; ``where`` names the file in error messages."""

        def bad(msg: str) -> ManifestError:
            return ManifestError(f"invalid manifest {where}: {msg}")

        if not isinstance(obj, dict):
            raise bad(f"expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != FORMAT:
            raise bad(f"field 'format' is {obj.get('format')!r}, expected {FORMAT!r}")
        if obj.get("kind") not in KINDS:
            raise bad(f"field 'kind' is {obj.get('kind')!r}, expected one of {KINDS}")
        classes = obj.get("classes")
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise bad("field 'classes' must be a list of strings")
        raw_shards = obj.get("shards")
        if not isinstance(raw_shards, list):
            raise bad("field 'shards' must be a list")
        shards = []
        for i, s in enumerate(raw_shards):
            try:
                name, count, nbytes = s["name"], s["count"], s["bytes"]
            except (TypeError, KeyError) as e:
                raise bad(f"shards[{i}] needs 'name', 'count' and 'bytes' ({e!r})") from None
            if (not isinstance(name, str) or "/" in name or not isinstance(count, int) or count < 0
                    or not isinstance(nbytes, int) or nbytes < 0):
                raise bad(f"shards[{i}] = {s!r} is malformed")
            shards.append(ShardInfo(name=name, count=count, bytes=nbytes))
        m = cls(
            kind=obj["kind"],
            classes=classes,
            shards=shards,
            created=obj.get("created") or {},
            info=obj.get("info") or {},
            format=obj["format"],
        )
        for key, value in (("total_samples", m.total_samples), ("total_bytes", m.total_bytes)):
            if key in obj and obj[key] != value:
                raise bad(f"field {key!r} is {obj[key]!r} but the shards add up to {value}")
        return m


def _is_url(s: str) -> bool:
    return bool(_URL_RE.match(s))


def _join_url(prefix: str, name: str) -> str:
    return prefix + name if prefix.endswith("/") else f"{prefix}/{name}"


def _s3_to_pipe(url: str) -> str:
    """webdataset has no ``s3://`` handler: stream the object with the AWS CLI instead."""
    return f"pipe:aws s3 cp {url} -" if url.startswith("s3://") else url


def write_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Write ``folder/manifest.json`` atomically (temp file, fsync, rename). Returns its path."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    tmp = folder / (MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and validate ``folder/manifest.json`` (``folder`` may also be the manifest's own path).

    Raises :class:`ManifestError` naming the folder when it or its manifest is missing or invalid.
    """
    path = Path(folder)
    if path.name == MANIFEST_NAME and not path.is_dir():
        path = path.parent
    if not path.is_dir():
        raise ManifestError(f"shard folder {str(path)!r} does not exist")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise ManifestError(f"shard folder {str(path)!r} has no {MANIFEST_NAME}")
    try:
        obj = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"invalid manifest {str(mpath)!r}: {e}") from None
    m = Manifest.from_json(obj, repr(str(mpath)))
    return _with_location(m, str(path.resolve()))


def _with_location(m: Manifest, location: str) -> Manifest:
    return Manifest(
        kind=m.kind,
        classes=m.classes,
        shards=m.shards,
        created=m.created,
        info=m.info,
        location=location,
        format=m.format,
    )


def _read_remote_manifest(prefix: str) -> Manifest:
    from webdataset.gopen import gopen  # imported lazily: only remote prefixes need it

    url = _s3_to_pipe(_join_url(prefix, MANIFEST_NAME))
    try:
        with gopen(url, "rb") as f:
            data = f.read()
        obj = json.loads(data.decode("utf-8"))
    except Exception as e:  # curl/aws/pipe failures surface as many exception types
        raise ManifestError(f"cannot read {MANIFEST_NAME} under {prefix!r}: {e}") from None
    return _with_location(Manifest.from_json(obj, repr(_join_url(prefix, MANIFEST_NAME))), prefix)


@dataclass(frozen=True)
class ShardSource:
    """Resolved shard URLs (absolute local paths or remote URLs) and the manifest when one is known."""

    urls: list[str]
    manifest: Manifest | None = None

    @property
    def num_samples(self) -> int | None:
        """Samples in ``urls`` according to the manifest, or ``None`` without one."""
        if self.manifest is None:
            return None
        counts = {s.name: s.count for s in self.manifest.shards}
        names = [u.rstrip("/").rsplit("/", 1)[-1] for u in self.urls]
        if not all(n in counts for n in names):
            return None
        return sum(counts[n] for n in names)

    @property
    def classes(self) -> list[str] | None:
        return None if self.manifest is None else list(self.manifest.classes)


def _manifest_for_local(paths: list[str]) -> Manifest | None:
    """The manifest of the folder holding all ``paths``, if there is one and it lists them."""
    folders = {str(Path(p).parent) for p in paths}
    if len(folders) != 1:
        return None
    folder = Path(folders.pop())
    if not (folder / MANIFEST_NAME).is_file():
        return None
    m = read_manifest(folder)
    listed = {s.name for s in m.shards}
    return m if all(Path(p).name in listed for p in paths) else None


def _expand(pattern: str) -> list[str]:
    return list(braceexpand.braceexpand(pattern))


def _resolve_local_files(patterns: Sequence[str], what: str) -> list[str]:
    paths = [p for pat in patterns for p in _expand(os.fspath(pat))]
    if not paths:
        raise ManifestError(f"{what} names no shards")
    missing = [p for p in paths if not Path(p).is_file()]
    if len(missing) == len(paths):
        raise ManifestError(f"{what} matches no existing file (e.g. {missing[0]!r})")
    if missing:
        raise ManifestError(
            f"{what}: {len(missing)} of {len(paths)} shards do not exist, e.g. {missing[0]!r}"
        )
    return [str(Path(p).resolve()) for p in paths]


def resolve_source(source: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSource:
    """Turn a folder, manifest path, brace pattern, ``.tar`` path, URL or list into shard URLs.

    Local paths are checked (every shard must exist) and made absolute; remote URLs are kept as
    they are, apart from brace expansion and ``s3://`` -> ``pipe:aws s3 cp <url> -``. The manifest
    is attached when the source is a folder with one, a remote prefix ending in ``/``, or local
    shards that all sit in one folder whose manifest lists them.

    Examples::

        resolve_source("/data/k400/train")                       # folder with manifest.json
        resolve_source("/data/k400/train/shards-{000000..000009}.tar")
        resolve_source(["/data/a/shards-000000.tar", "/data/b/shards-000000.tar"])
        resolve_source("pipe:aws s3 cp s3://bucket/k400/shards-{000000..000127}.tar -")
        resolve_source("https://host/k400/train/")               # fetches its manifest.json
    """
    if isinstance(source, (list, tuple)):
        if not source:
            raise ManifestError("empty list of shard sources")
        items = [os.fspath(s) for s in source]
        if any(_is_url(s) for s in items):
            return ShardSource(urls=[_s3_to_pipe(u) for s in items for u in _expand(s)])
        paths = _resolve_local_files(items, f"shard list {items[:3]!r}{'...' if len(items) > 3 else ''}")
        return ShardSource(urls=paths, manifest=_manifest_for_local(paths))
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"shard source must be a path, URL or list of them, got {type(source).__name__}")

    src = os.fspath(source)
    if _is_url(src):
        if src.endswith("/") and not src.startswith("pipe:"):
            m = _read_remote_manifest(src)
            return ShardSource(urls=[_s3_to_pipe(u) for u in m.urls()], manifest=m)
        return ShardSource(urls=[_s3_to_pipe(u) for u in _expand(src)])

    path = Path(src)
    if path.name == MANIFEST_NAME:
        path = path.parent
        if not path.is_dir():
            raise ManifestError(f"shard folder {str(path)!r} does not exist")
        m = read_manifest(path)
        return ShardSource(urls=_check_listed(m), manifest=m)
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            m = read_manifest(path)
            return ShardSource(urls=_check_listed(m), manifest=m)
        tars = sorted(str(p.resolve()) for p in path.glob("*.tar"))
        if not tars:
            raise ManifestError(f"shard folder {src!r} has neither {MANIFEST_NAME} nor .tar files")
        return ShardSource(urls=tars)
    if "{" in src:
        paths = _resolve_local_files([src], f"shard pattern {src!r}")
        return ShardSource(urls=paths, manifest=_manifest_for_local(paths))
    if src.endswith(".tar") or path.suffix:
        paths = _resolve_local_files([src], f"shard file {src!r}")
        return ShardSource(urls=paths, manifest=_manifest_for_local(paths))
    raise ManifestError(f"shard folder {src!r} does not exist")


def _check_listed(m: Manifest) -> list[str]:
    urls = m.urls()
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise ManifestError(
            f"shard folder {m.location!r}: {len(missing)} of {len(urls)} shards listed in "
            f"{MANIFEST_NAME} are missing, e.g. {Path(missing[0]).name!r}"
        )
    return urls
