"""Raw sample streams over tar shards: reading, splitting across ranks x workers, shuffling.

Every function here works on raw samples (undecoded bytes), so that a loader can split, shuffle
and skip samples without decoding them.

A *stream* is one (rank, DataLoader worker) pair: stream ``g = rank * W + w`` of
``G = world_size * W``.

- Training (:func:`train_shard_order`): the shard order is an endless concatenation of
  permutations of all shards, one per pass, seeded by ``(seed, epoch, pass)`` and the same on every
  rank; stream ``g`` reads entries ``g, g + G, g + 2G, ...`` of it. With at least ``G`` shards each
  pass gives every stream different shards; with fewer, streams cycle through the shards
  (resampling), so any number of shards feeds any number of streams.
- Evaluation (:func:`eval_samples`): with ``N >= G`` shards, stream ``g`` reads shards
  ``g, g + G, ...``; with fewer, every stream reads every shard and keeps the samples whose ordinal
  (position in the concatenation of all shards) is ``g`` modulo ``G``. Either way every sample
  belongs to exactly one stream.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
from webdataset.gopen import gopen
from webdataset.tariterators import tarfile_samples

__all__ = [
    "TarFormatError",
    "eval_samples",
    "iter_tar_members",
    "shard_samples",
    "shuffled",
    "train_samples",
    "train_shard_order",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Domain tags keep the seed sequences of different uses apart (shard order, shuffle buffer, ...).
TAG_SHARD_ORDER = 0x5A4D
TAG_SHUFFLE = 0x5B0F


_ZERO_BLOCK = bytes(512)
_COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".zst")
_META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: "__key__"-like entries
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class TarFormatError(ValueError):
    """A shard that is not a readable, uncompressed tar (bad checksum, truncated member, ...)."""


def _tar_number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"invalid octal number {field!r} in a tar header (not an uncompressed tar?)") from None


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_tar_members(stream, where: str) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular files of an uncompressed tar stream, in order.

    A small streaming reader (ustar, GNU long names, pax ``path``/``size``): about ten times
    faster than :mod:`tarfile` per member, which matters next to decoding small clips. Raises
    :class:`TarFormatError` naming ``where`` for a bad header checksum, a truncated member or a
    missing end-of-archive marker (every tar writer adds one; without it the last sample may be cut).
    """
    long_name: str | None = None
    pax: dict[str, str] = {}
    offset = 0
    while True:
        header = stream.read(512)
        if not header:
            # A shard cut at a member boundary: the sample being read may be incomplete.
            raise TarFormatError(f"{where}: ends at byte {offset} without the end-of-archive marker (truncated?)")
        if len(header) < 512:
            raise TarFormatError(f"{where}: truncated tar header at byte {offset}")
        if header == _ZERO_BLOCK:
            return  # end-of-archive marker
        try:
            stored = _tar_number(header[148:156])
        except TarFormatError:
            stored = -1
        unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
        if stored != unsigned and stored != unsigned - 256 * sum(1 for b in header if b > 127):  # or signed
            raise TarFormatError(f"{where}: bad tar header checksum at byte {offset} (not an uncompressed tar?)")
        size = int(pax["size"]) if "size" in pax else _tar_number(header[124:136])
        kind = header[156:157]
        data = stream.read(size)
        if len(data) < size:
            raise TarFormatError(f"{where}: member at byte {offset} truncated ({len(data)} of {size} bytes)")
        if size % 512:
            stream.read(512 - size % 512)
        offset += 512 + size + (-size % 512)
        if kind == b"x":  # pax header: applies to the next member
            pax = _pax_records(data)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
            continue
        if kind in (b"0", b"\0", b"7"):
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar prefix field
                    name = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
            yield name, data
        long_name, pax = None, {}  # ("g" global headers, directories and links are skipped)


def _group_samples(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive files ``key.ext`` -> ``{"__key__": key, "__url__": url, ext: bytes}`` (webdataset's rules)."""
    current: dict[str, Any] | None = None
    for name, data in members:
        if _META_NAME.match(name):
            continue
        m = _KEY_EXT.match(name)
        if m is None:
            continue
        key, ext = m.group(1), m.group(2).lower()
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key, "__url__": url}
        if ext in current:
            raise TarFormatError(f"{url}: file {name!r} appears twice in sample {key!r}")
        current[ext] = data
    if current is not None:
        yield current


def _open_samples(url: str) -> Iterator[dict[str, Any]]:
    if url.rstrip("/").endswith(_COMPRESSED):
        yield from tarfile_samples([{"url": url}])  # compressed tars: Python's tarfile via webdataset
        return
    stream = gopen(url, "rb")
    try:
        yield from _group_samples(iter_tar_members(stream, url), url)
    finally:
        stream.close()  # for ``pipe:`` URLs this also checks the command's exit status


def shard_samples(url: str, on_error: Callable[[str, Exception], None]) -> Iterator[dict[str, Any]]:
    """Raw samples of one tar shard (``{"__key__", "__url__", ext: bytes, ...}``), in file order.

    A shard that cannot be opened or read to its end calls ``on_error(url, exc)`` once and ends
    (samples read before the error are kept; a sample cut by the error is dropped). Nothing is
    decoded. Uncompressed tars go through :func:`iter_tar_members`, compressed ones through
    webdataset's ``tarfile`` iteration; any URL ``webdataset.gopen`` opens works.
    """
    it = _open_samples(url)
    while True:
        try:
            sample = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001 - gopen/tar/pipe errors have many types
            on_error(url, e)
            return
        yield sample


def train_shard_order(num_shards: int, stream: int, num_streams: int, seed: int, epoch: int) -> Iterator[int]:
    """Endless shard indices for training stream ``stream`` of ``num_streams`` (see the module docstring).

    Example: 3 shards, 2 streams; pass permutations ``[2, 0, 1], [1, 2, 0], ...``, concatenated
    ``2 0 1 1 2 0 ...``: stream 0 reads ``2 1 2 ...``, stream 1 reads ``0 1 0 ...``.
    """
    if num_shards < 1:
        raise ValueError("no shards")
    cached_pass, perm = -1, np.arange(0)
    pos = stream
    while True:
        p, i = divmod(pos, num_shards)
        if p != cached_pass:
            perm = np.random.default_rng([TAG_SHARD_ORDER, seed, epoch, p]).permutation(num_shards)
            cached_pass = p
        yield int(perm[i])
        pos += num_streams


def shuffled(items: Iterable[T], bufsize: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle a stream with a buffer of ``bufsize`` items (``bufsize <= 1``: unchanged order).

    The buffer fills first; then each new item replaces a uniformly chosen buffered item, which is
    yielded. At the end the rest of the buffer comes out in random order. Deterministic given ``rng``.
    """
    if bufsize <= 1:
        yield from items
        return
    buf: list[T] = []
    for item in items:
        if len(buf) < bufsize:
            buf.append(item)
            continue
        j = int(rng.integers(bufsize))
        out, buf[j] = buf[j], item
        yield out
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


def train_samples(
    urls: Sequence[str],
    *,
    stream: int,
    num_streams: int,
    seed: int,
    epoch: int,
    rank: int,
    shuffle_buffer: int,
    on_error: Callable[[str, Exception], None],
    max_empty_shards: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Endless shuffled raw samples for one training stream.

    Raises ``RuntimeError`` when ``max_empty_shards`` (default ``2 * len(urls) + 8``) shards in a row
    give no sample: the data is unreadable, and looping forever would hide it.
    """
    limit = max_empty_shards if max_empty_shards is not None else 2 * len(urls) + 8

    def endless() -> Iterator[dict[str, Any]]:
        empty = 0
        for i in train_shard_order(len(urls), stream, num_streams, seed, epoch):
            got = False
            for sample in shard_samples(urls[i], on_error):
                got = True
                yield sample
            empty = 0 if got else empty + 1
            if empty >= limit:
                raise RuntimeError(
                    f"{empty} shards in a row gave no samples (last: {urls[i]!r}); "
                    f"check the shards of this dataset ({len(urls)} shards, e.g. {urls[0]!r})"
                )

    rng = np.random.default_rng([TAG_SHUFFLE, seed, epoch, rank, stream, num_streams])
    return shuffled(endless(), shuffle_buffer, rng)


def eval_samples(
    urls: Sequence[str],
    *,
    stream: int,
    num_streams: int,
    on_error: Callable[[str, Exception], None],
) -> Iterator[dict[str, Any]]:
    """Raw samples of evaluation stream ``stream`` of ``num_streams``: each sample in exactly one stream.

    ``on_error`` is called only by the stream that owns the failing shard (shard index modulo
    ``num_streams``), so a broken shard is reported once even when every stream reads it.
    """

    def owned_error(i: int) -> Callable[[str, Exception], None]:
        return on_error if i % num_streams == stream else (lambda url, e: None)

    if len(urls) >= num_streams:
        # Shard-level split: whole shards per stream, no reading of other streams' shards.
        for i in range(stream, len(urls), num_streams):
            yield from shard_samples(urls[i], on_error)
        return
    # Sample-level split: fewer shards than streams, so streams share shards by sample ordinal.
    ordinal = 0
    for i, url in enumerate(urls):
        for sample in shard_samples(url, owned_error(i)):
            if ordinal % num_streams == stream:
                yield sample
            ordinal += 1
