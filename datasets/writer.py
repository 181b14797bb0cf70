"""Deterministic, atomic, resumable WebDataset shard writing.

The builders (:mod:`datasets.build`) turn a dataset into a sorted list of :class:`PlanItem` (key,
size estimate, payload). :func:`plan_shards` chunks that list into shards by sample count and bytes
*before* anything is written, so a re-run maps the same samples to the same ``shards-{i:06d}.tar``.
:func:`write_shards` then writes every shard that is not already finished, one shard per task
(optionally in a process pool):

- a shard is written to ``shards-000007.tar.tmp``, fsynced and renamed: a ``.tar`` only ever
  appears complete;
- a sidecar ``shards-000007.tar.done`` (JSON: count, bytes, plan fingerprint, skipped samples)
  is written after the rename; a shard whose ``.tar`` and ``.done`` exist and whose fingerprint
  matches the current plan is skipped on a re-run;
- tar members are written in plan order with fixed metadata (mtime 0, mode 0444), so the same
  inputs give byte-identical shards whatever the number of workers.

Samples are produced by a picklable ``make_sample(payload) -> dict[str, bytes]`` callable that
may raise :class:`SkipSample` to leave a sample out (e.g. an unreadable video); skipped samples
are recorded in the sidecar and returned to the builder.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

__all__ = [
    "SHARD_PATTERN",
    "PlanItem",
    "ShardPlan",
    "ShardResult",
    "SkipSample",
    "finished_shard",
    "parse_size",
    "plan_shards",
    "remove_shards",
    "sanitize_key",
    "shard_name",
    "write_shard",
    "write_shards",
]

log = logging.getLogger(__name__)

SHARD_PATTERN = "shards-{:06d}.tar"
_SHARD_RE = re.compile(r"^shards-(\d{6})\.tar(\.done|\.tmp)?$")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-]")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?)?b?\s*$", re.IGNORECASE)


class SkipSample(Exception):
    """Raised by ``make_sample`` to leave a sample out of its shard (the message is the reason)."""


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index)


def sanitize_key(name: str) -> str:
    """A WebDataset sample key from any name: no dots (they separate key and extension), no slashes.

    ``"n01440764/n01440764_10026.JPEG"`` -> ``"n01440764__n01440764_10026"`` after the caller strips
    the extension; other characters outside ``[A-Za-z0-9_-]`` become ``_``.
    """
    key = _KEY_BAD.sub("_", name.replace("/", "__").replace(os.sep, "__"))
    if not key:
        raise ValueError(f"empty sample key from name {name!r}")
    return key


def parse_size(text: str | int | None) -> int | None:
    """``"1GB"`` -> 10**9, ``"500MB"``, ``"64k"``, ``"2GiB"`` (binary), plain integers are bytes.

    ``None``, ``0`` and ``"0"`` mean no limit (``None``).
    """
    if text is None:
        return None
    if isinstance(text, int):
        return text or None
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"cannot parse size {text!r}: use e.g. 1GB, 500MB, 64KiB or a number of bytes")
    number, prefix, binary = float(m.group(1)), m.group(2), m.group(3)
    scale = 1 if not prefix else (1024 if binary else 1000) ** ("kmgt".index(prefix.lower()) + 1)
    return int(number * scale) or None


@dataclass(frozen=True)
class PlanItem:
    """One sample in the plan: its key, a size estimate in bytes (source file size) and a payload.

    ``payload`` must be JSON-serialisable (it enters the plan fingerprint) and is handed to
    ``make_sample`` in the worker.
    """

    key: str
    size: int
    payload: Any


@dataclass(frozen=True)
class ShardPlan:
    """The samples that go into shard ``index`` and a fingerprint of them (plus builder options)."""

    index: int
    items: tuple[PlanItem, ...]
    fingerprint: str

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass
class ShardResult:
    """What one shard ended up holding. ``skipped`` lists ``{"key", "reason"}`` of left-out samples."""

    name: str
    count: int
    bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    reused: bool = False


def plan_shards(
    items: Sequence[PlanItem],
    *,
    max_count: int,
    max_size: int | None = None,
    options: Any = None,
) -> list[ShardPlan]:
    """Chunk ``items`` (in the given order) into shards of at most ``max_count`` samples and, when
    ``max_size`` is set, at most ``max_size`` bytes of source data (a sample larger than
    ``max_size`` gets a shard of its own). ``options`` (JSON-serialisable builder settings such as
    ``short_side``) enter every shard's fingerprint so that changing them rebuilds the shards.

    Example: sizes ``[4, 4, 4, 4, 4]``, ``max_count=3``, ``max_size=10`` -> shards of 2, 2 and 1.
    """
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if max_size is not None and max_size < 1:
        raise ValueError(f"max_size must be >= 1 byte, got {max_size}")
    seen: set[str] = set()
    for it in items:
        if it.key in seen:
            raise ValueError(f"duplicate sample key {it.key!r}: keys must be unique")
        seen.add(it.key)
    chunks: list[list[PlanItem]] = []
    cur: list[PlanItem] = []
    cur_size = 0
    for it in items:
        if cur and (len(cur) >= max_count or (max_size is not None and cur_size + it.size > max_size)):
            chunks.append(cur)
            cur, cur_size = [], 0
        cur.append(it)
        cur_size += it.size
    if cur:
        chunks.append(cur)
    opts = json.dumps(options, sort_keys=True, default=str)
    plans = []
    for i, chunk in enumerate(chunks):
        h = hashlib.sha256(opts.encode())
        for it in chunk:
            h.update(json.dumps([it.key, it.size, it.payload], sort_keys=True, default=str).encode())
        plans.append(ShardPlan(index=i, items=tuple(chunk), fingerprint=h.hexdigest()))
    return plans


def _done_path(tar_path: Path) -> Path:
    return tar_path.with_name(tar_path.name + ".done")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finished_shard(folder: Path, plan: ShardPlan) -> ShardResult | None:
    """The recorded result of ``plan``'s shard if it is complete and matches the plan, else ``None``."""
    tar_path = folder / plan.name
    done = _done_path(tar_path)
    if not (tar_path.is_file() and done.is_file()):
        return None
    try:
        info = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if info.get("fingerprint") != plan.fingerprint or info.get("bytes") != tar_path.stat().st_size:
        return None
    return ShardResult(
        name=plan.name, count=int(info["count"]), bytes=int(info["bytes"]),
        skipped=list(info.get("skipped", [])), reused=True,
    )


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0  # fixed metadata: identical inputs -> identical shard bytes
    ti.mode = 0o444
    tar.addfile(ti, io.BytesIO(data))


def write_shard(
    folder: str | os.PathLike,
    plan: ShardPlan,
    make_sample: Callable[[Any], dict[str, bytes]],
    progress: Callable[[int], None] | None = None,
) -> ShardResult:
    """Write one shard atomically: ``.tar.tmp`` -> fsync -> rename to ``.tar`` -> ``.tar.done``.

    ``make_sample(payload)`` returns the sample's members as ``{extension: bytes}`` (no ``__key__``:
    the plan's key is used). If it raises :class:`SkipSample` the sample is left out and recorded;
    any other exception removes the temporary file and propagates (no ``.tar`` appears).
    """
    folder = Path(folder)
    tar_path = folder / plan.name
    tmp_path = tar_path.with_name(tar_path.name + ".tmp")
    done = _done_path(tar_path)
    done.unlink(missing_ok=True)  # an old sidecar must never vouch for the shard being rewritten
    skipped: list[dict[str, str]] = []
    count = 0
    try:
        with open(tmp_path, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for it in plan.items:
                    try:
                        members = make_sample(it.payload)
                    except SkipSample as e:
                        skipped.append({"key": it.key, "reason": str(e)})
                        if progress:
                            progress(1)
                        continue
                    for ext in sorted(members):
                        if "." in ext or "/" in ext or not ext:
                            raise ValueError(f"sample {it.key!r}: bad member extension {ext!r}")
                        _add_member(tar, f"{it.key}.{ext}", members[ext])
                    count += 1
                    if progress:
                        progress(1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, tar_path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    nbytes = tar_path.stat().st_size
    _write_json_atomic(done, {
        "name": plan.name, "count": count, "bytes": nbytes,
        "fingerprint": plan.fingerprint, "skipped": skipped,
    })
    return ShardResult(name=plan.name, count=count, bytes=nbytes, skipped=skipped)


def _pool_task(args: tuple[str, ShardPlan, Callable[[Any], dict[str, bytes]]]) -> ShardResult:
    folder, plan, make_sample = args
    return write_shard(folder, plan, make_sample)


def remove_shards(folder: str | os.PathLike) -> int:
    """Delete ``shards-*.tar`` files, their ``.done`` sidecars and ``.tmp`` leftovers. Returns the count."""
    folder = Path(folder)
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            if _SHARD_RE.match(p.name):
                p.unlink()
                n += 1
    return n


def _stale_shards(folder: Path, num_planned: int) -> list[str]:
    stale = []
    for p in sorted(folder.iterdir()):
        m = _SHARD_RE.match(p.name)
        if m and m.group(2) is None and int(m.group(1)) >= num_planned:
            stale.append(p.name)
    return stale


def write_shards(
    folder: str | os.PathLike,
    plans: Sequence[ShardPlan],
    make_sample: Callable[[Any], dict[str, bytes]],
    *,
    workers: int = 1,
    overwrite: bool = False,
    desc: str = "samples",
    mp_context: str = "spawn",
) -> list[ShardResult]:
    """Write all ``plans`` into ``folder`` (created if needed) and return their results in order.

    Finished shards matching the plan are skipped unless ``overwrite`` (which first deletes every
    ``shards-*`` file in ``folder``). ``workers > 1`` writes shards in a process pool (``spawn`` by
    default: safe when the caller runs threads, e.g. inside Ray); ``make_sample`` must then be
    picklable (a module-level function or a ``functools.partial`` of one).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if overwrite:
        n = remove_shards(folder)
        if n:
            log.info("--overwrite: removed %d old shard files from %s", n, folder)
    results: dict[int, ShardResult] = {}
    todo: list[ShardPlan] = []
    for plan in plans:
        done = None if overwrite else finished_shard(folder, plan)
        if done is not None:
            results[plan.index] = done
        else:
            todo.append(plan)
    total = sum(len(p.items) for p in plans)
    reused = sum(len(p.items) for p in plans if p.index in results)
    if results:
        log.info("%s: %d of %d shards already finished, skipping them", folder, len(results), len(plans))
    log.info("%s: writing %d shards (%d samples) with %d worker(s)", folder, len(todo),
             total - reused, max(1, min(workers, len(todo))))
    with tqdm(total=total, initial=reused, desc=desc, unit="sample", dynamic_ncols=True,
              disable=None) as bar:
        if workers <= 1 or len(todo) <= 1:
            for plan in todo:
                results[plan.index] = write_shard(folder, plan, make_sample, progress=bar.update)
        else:
            ctx = mp.get_context(mp_context)
            tasks = [(str(folder), plan, make_sample) for plan in todo]
            by_name = {p.name: p for p in todo}
            with ctx.Pool(processes=min(workers, len(todo))) as pool:
                for res in pool.imap_unordered(_pool_task, tasks):
                    plan = by_name[res.name]
                    results[plan.index] = res
                    bar.update(len(plan.items))
    stale = _stale_shards(folder, len(plans))
    if stale:
        log.warning("%s: %d shard(s) from an earlier, larger plan are not in the manifest (%s...); "
                    "delete them or re-run with --overwrite", folder, len(stale), stale[0])
    return [results[p.index] for p in plans]

