"""Sharded image and video loaders for distributed training and evaluation.

``build_video_dataset`` / ``build_image_dataset`` return a ``torch.utils.data.IterableDataset``
yielding ready batches (batching happens inside, so :func:`make_loader` uses ``batch_size=None``).
The rank and world size come from the caller (Ray Train's context); nothing here imports Ray.

Batches (dicts, STYLE.md #10):

- video, training: ``{"video": float (B, C, T, H, W), "label": long (B,), "video_id": list[str],
  "frame_index": long (B, T)}``;
- video, evaluation: one item per VIEW, ``{"video", "label", "video_id", "frame_index",
  "clip_index": long (B,), "spatial_index": long (B,), "num_views": int}`` with
  ``num_views = K * S``; each video is decoded once for all its views;
- images: ``{"image": float (B, 3, H, W), "label": long (B,), "key": list[str]}``.

``"video"`` / ``"image"`` are normalised ``float32`` (``(x / 255 - mean) / std``) with the spec's
``output="float"`` (the default), or the raw ``uint8`` pixels (same shape) with ``output="uint8"``: the
consumer then calls :func:`datasets.transforms.normalize_batch` ``(x, spec.mean, spec.std)`` where the
batch lands (on the GPU), which gives exactly the ``float`` batch and moves a quarter of the bytes.

Training: every rank gets exactly ``steps_per_epoch = samples_per_epoch // (world_size * batch_size)``
full batches per epoch, whatever the number of shards (see :mod:`datasets.streams` for the shard
order). A ``DataLoader`` with ``W`` workers hands out batches round-robin (worker 0, 1, ..., W - 1,
0, ...), so worker ``w`` produces global batches ``w, w + W, ...`` from its own shuffled raw stream.
Resuming with ``start_batch = k`` makes worker ``w`` take over the stream of original worker
``(k + w) % W`` from its local batch ``(k + w) // W``, skipping the raw samples of earlier batches
without decoding them; the result equals the full stream minus its first ``k`` batches. Per-sample
randomness (clip start, scale, crop, flip, RandAugment) comes from a generator keyed by
``(seed, epoch, rank)`` at counter ``(ordinal, attempt)``, ``ordinal = batch * batch_size + slot``:
the same batches in the same order for the same ``(seed, epoch, rank, world_size, num_workers)``.
The shuffle buffer holds raw (encoded) samples: mind its memory with large videos.

Each training batch is built in three passes (read and parse, decode all clips, transform all
clips), which keeps the decoder's and PyTorch's working sets apart in the CPU caches; the batch's
clips are decoded in one exchange with the decode watchdog's process (:mod:`datasets.decoders.watchdog`,
``VideoSpec.decode_timeout_s``); clips stay ``uint8`` until :class:`NormalizedStack` converts and
normalises them into the batch (``output="float"``), in shared memory when running in a DataLoader
worker. ``jobs/benchmark_data.py`` measures the pipeline against each decoder backend alone.

A bad sample (see :data:`datasets.stats.REASONS`) is skipped, counted in ``stats`` and logged with
its shard and key. In training its slot is filled by the next raw samples of the same worker's
stream after the batch (a look-ahead that does not consume them, so later batches do not shift and
resuming stays exact); in evaluation it is simply missing, and counted.

Evaluation visits every sample exactly once across ranks and workers (no drops, duplicates or
padding); the last batch of each worker may be partial.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datasets.batching import NormalizedStack, batch_buffer, collate_items
from datasets.clip_sampling import RandomClipSampler, UniformClipSampler
from datasets.decoders.memory import keep_freed_buffers
from datasets.manifest import ShardSource, resolve_source
from datasets.samples import ImageSampleDecoder, ParsedSample, VideoSampleDecoder, parse_sample
from datasets.specs import ImageSpec, VideoSpec
from datasets.stats import BadSample, DataStats
from datasets.streams import eval_samples, train_samples
from datasets.transforms import image_transform, video_transform

__all__ = [
    "DataStats",
    "ImageSpec",
    "NormalizedStack",
    "ShardDataset",
    "VideoSpec",
    "batch_buffer",
    "build_image_dataset",
    "build_video_dataset",
    "collate_items",
    "make_loader",
]

logger = logging.getLogger(__name__)

TAG_SAMPLE = 0x5A3E  # domain tag of per-sample augmentation seeds
# A long run of bad samples means the data (not a sample) is broken: stop instead of spinning.
MAX_CONSECUTIVE_BAD = 1000


class _Candidate:
    """A raw training sample on its way into a batch: parsed once, and known to be bad once seen bad."""

    __slots__ = ("bad", "parsed", "raw")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.parsed: ParsedSample | None = None
        self.bad = False


def _sample_key(seed: int, epoch: int, rank: int) -> np.ndarray:
    """Philox key of one (seed, epoch, rank): hashed once by a SeedSequence."""
    return np.random.SeedSequence([TAG_SAMPLE, seed, epoch, rank]).generate_state(2, np.uint64)


def _sample_rng(key: np.ndarray, ordinal: int, attempt: int) -> np.random.Generator:
    """The generator of one sample slot (and replacement attempt).

    A counter-based Philox stream: constructing it costs a few microseconds (a SeedSequence per
    sample costs several times more). The stream advances the low counter words, so putting
    ``(ordinal, attempt)`` in the high words keeps every slot's stream disjoint from the others'.
    """
    return np.random.Generator(np.random.Philox(key=key, counter=[0, 0, ordinal, attempt]))


class ShardDataset(IterableDataset):
    """Batches from tar shards for one rank; built by :func:`build_video_dataset` / :func:`build_image_dataset`.

    Attributes: ``train``, ``batch_size``, ``steps_per_epoch`` (training), ``num_samples`` (manifest
    total or ``None``), ``classes`` (manifest class names or ``None``), ``stats`` (:class:`DataStats`),
    ``sample_decoder`` (the :class:`~datasets.samples.VideoSampleDecoder` or ``ImageSampleDecoder`` in use).
    ``len(dataset)`` is ``steps_per_epoch`` for training.
    """

    def __init__(
        self,
        *,
        source: ShardSource,
        source_name: str,
        kind: str,
        train: bool,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        epoch: int,
        samples_per_epoch: int | None,
        shuffle_buffer: int,
        start_batch: int,
        stats: DataStats | None,
        load_train: Callable[[ParsedSample, np.random.Generator], Any],
        finish_train: Callable[[Any, np.random.Generator], dict[str, Any]],
        decode_eval: Callable[[ParsedSample], list[dict[str, Any]]],
        extra: dict[str, Any] | None = None,
        stackers: dict[str, Callable[[list[torch.Tensor]], torch.Tensor]] | None = None,
        sample_decoder: Any = None,
        load_train_many: Callable[[list[tuple[ParsedSample, np.random.Generator]]], list[Any]] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if seed < 0 or epoch < 0 or start_batch < 0:
            raise ValueError(f"seed, epoch and start_batch must be >= 0, got {seed}, {epoch}, {start_batch}")
        manifest = source.manifest
        if manifest is not None and manifest.kind != kind:
            raise ValueError(f"{source_name!r} holds {manifest.kind} shards, not {kind} shards")
        self.urls = list(source.urls)
        self.source_name = source_name
        self.kind = kind
        self.train = train
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed, self.epoch = seed, epoch
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch
        self.stats = stats if stats is not None else DataStats()
        self.classes = source.classes
        self.num_samples = source.num_samples
        self._num_classes = len(self.classes) if self.classes else None
        self._load_train = load_train
        self._load_train_many = load_train_many
        self._finish_train = finish_train
        self._decode_eval = decode_eval
        self._extra = extra or {}
        self._stackers = stackers or {}
        self.sample_decoder = sample_decoder
        if train:
            if samples_per_epoch is None:
                samples_per_epoch = self.num_samples
            if samples_per_epoch is None:
                raise ValueError(
                    f"samples_per_epoch is required for {source_name!r}: it has no manifest giving its sample count"
                )
            self.samples_per_epoch = int(samples_per_epoch)
            self.steps_per_epoch = self.samples_per_epoch // (world_size * batch_size)
            if self.steps_per_epoch < 1:
                raise ValueError(
                    f"samples_per_epoch={self.samples_per_epoch} is less than one batch per rank "
                    f"(world_size={world_size} x batch_size={batch_size}) for {source_name!r}"
                )
            if start_batch > self.steps_per_epoch:
                raise ValueError(f"start_batch={start_batch} > steps_per_epoch={self.steps_per_epoch}")
        else:
            # samples_per_epoch is ignored: evaluation visits every sample once. Resuming an
            # evaluation mid-way is not supported (its batches are not a fixed sequence).
            if start_batch != 0:
                raise ValueError(f"start_batch={start_batch}: evaluation datasets always start at the beginning")
            self.samples_per_epoch = None
            self.steps_per_epoch = None

    def __len__(self) -> int:
        if not self.train:
            raise TypeError("an evaluation dataset has no fixed length (bad samples are skipped)")
        return self.steps_per_epoch

    def __repr__(self) -> str:
        mode = f"train, steps_per_epoch={self.steps_per_epoch}" if self.train else "eval"
        return (f"{type(self).__name__}({self.kind}, {mode}, {len(self.urls)} shards from {self.source_name!r}, "
                f"batch_size={self.batch_size}, rank={self.rank}/{self.world_size}, epoch={self.epoch})")

    # -------------------------------------------------------------------------------- helpers

    def _on_shard_error(self, url: str, e: Exception) -> None:
        self.stats.add("shard_error")
        logger.warning("cannot read shard %s to its end (%s: %s); skipping the rest of it",
                       url, type(e).__name__, str(e)[:300])

    def _bad(self, raw: dict[str, Any], e: BadSample) -> None:
        self.stats.add(e.reason)
        # One line per bad sample, naming its shard and key (decoder messages are one line already).
        logger.warning("skipping sample %r in shard %s: %s (%s)",
                       raw.get("__key__"), raw.get("__url__"), e.reason, " ".join(str(e).split()))

    def _parse(self, raw: dict[str, Any]) -> ParsedSample:
        return parse_sample(raw, self.kind, self._num_classes)

    @staticmethod
    def _worker() -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    # -------------------------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        w, num_workers = self._worker()
        if get_worker_info() is not None:
            keep_freed_buffers()  # a worker process is ours: reuse freed clip buffers (no page faults)
        return self._train_batches(w, num_workers) if self.train else self._eval_batches(w, num_workers)

    def _train_batches(self, w: int, num_workers: int) -> Iterator[dict[str, Any]]:
        bs, steps, k = self.batch_size, self.steps_per_epoch, self.start_batch
        # Take over original worker wo's stream from its local batch j (see the module docstring).
        wo, j = (k + w) % num_workers, (k + w) // num_workers
        b = wo + j * num_workers  # == k + w: the global index of our first batch
        if b >= steps:
            return
        raw_stream = train_samples(
            self.urls, stream=self.rank * num_workers + wo, num_streams=self.world_size * num_workers,
            seed=self.seed, epoch=self.epoch, rank=self.rank, shuffle_buffer=self.shuffle_buffer,
            on_error=self._on_shard_error,
        )
        # Skip before decode: the raw samples of this stream's first j batches are dropped unread.
        raw_stream = itertools.islice(raw_stream, j * bs, None)
        lookahead: deque[_Candidate] = deque()  # peeked after a batch for replacements, not consumed

        def take() -> _Candidate:
            return lookahead.popleft() if lookahead else _Candidate(next(raw_stream))

        key = _sample_key(self.seed, self.epoch, self.rank)
        bad_in_a_row = 0
        while b < steps:
            # Three passes over a batch keep each kind of work hot in the CPU caches (decoding
            # between Python/torch steps makes both slower): (1) read and parse the raw samples,
            # (2) decode every clip, (3) transform them all and collate.
            nominal = [take() for _ in range(bs)]
            for cand in nominal:
                self._prepare(cand)
            rngs = [_sample_rng(key, b * bs + slot, 0) for slot in range(bs)]
            first = self._load_many(nominal, rngs)  # the batch's clips in one exchange with the decoder
            loaded, peek = [], 0
            for slot, cand in enumerate(nominal):
                ordinal = b * bs + slot
                attempt, rng, payload = 0, rngs[slot], first[slot]
                while payload is None:
                    bad_in_a_row += 1
                    if bad_in_a_row >= MAX_CONSECUTIVE_BAD:
                        raise RuntimeError(f"{bad_in_a_row} bad samples in a row in {self.source_name!r} "
                                           f"(see the warnings and dataset.stats: {self.stats.snapshot()})")
                    # Replace the bad sample with the next raw sample after the batch (look-ahead).
                    if peek == len(lookahead):
                        lookahead.append(_Candidate(next(raw_stream)))
                    cand = lookahead[peek]
                    peek += 1
                    self._prepare(cand)
                    attempt += 1
                    rng = _sample_rng(key, ordinal, attempt)
                    payload = self._load(cand, rng)
                bad_in_a_row = 0
                loaded.append((payload, rng))
            yield self._collate([self._finish_train(payload, rng) for payload, rng in loaded])
            b += num_workers

    def _prepare(self, cand: _Candidate) -> None:
        """Parse a candidate once; a bad one is counted and logged once, however often it is met."""
        if cand.parsed is not None or cand.bad:
            return
        try:
            cand.parsed = self._parse(cand.raw)
        except BadSample as e:
            cand.bad = True
            self._bad(cand.raw, e)

    def _load(self, cand: _Candidate, rng: np.random.Generator) -> Any:
        if cand.bad:
            return None
        try:
            return self._load_train(cand.parsed, rng)
        except BadSample as e:
            cand.bad = True
            self._bad(cand.raw, e)
            return None

    def _load_many(self, cands: list[_Candidate], rngs: list[np.random.Generator]) -> list[Any]:
        """:meth:`_load` of each candidate (``None`` for a bad one), through ``load_train_many`` if given."""
        if self._load_train_many is None:
            return [self._load(cand, rng) for cand, rng in zip(cands, rngs)]
        todo = [i for i, cand in enumerate(cands) if not cand.bad]
        payloads: list[Any] = [None] * len(cands)
        outs = self._load_train_many([(cands[i].parsed, rngs[i]) for i in todo]) if todo else []
        for i, out in zip(todo, outs):
            if isinstance(out, BadSample):
                cands[i].bad = True
                self._bad(cands[i].raw, out)
            else:
                payloads[i] = out
        return payloads

    def _eval_batches(self, w: int, num_workers: int) -> Iterator[dict[str, Any]]:
        stream = self.rank * num_workers + w
        pending: list[dict[str, Any]] = []
        for raw in eval_samples(self.urls, stream=stream, num_streams=self.world_size * num_workers,
                                on_error=self._on_shard_error):
            try:
                pending.extend(self._decode_eval(self._parse(raw)))
            except BadSample as e:
                self._bad(raw, e)
                continue
            while len(pending) >= self.batch_size:
                yield self._collate(pending[: self.batch_size])
                del pending[: self.batch_size]
        if pending:
            yield self._collate(pending)  # the last batch may be partial: no padding, no drops

    def _collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate_items(items, self._stackers)
        batch.update(self._extra)
        return batch


# ------------------------------------------------------------------------------------ builders


def _resolve(source: Any) -> tuple[ShardSource, str]:
    if isinstance(source, ShardSource):
        return source, f"{len(source.urls)} shards ({source.urls[0] if source.urls else '-'} ...)"
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else str(list(source)[:3])
    return resolve_source(source), name


def build_video_dataset(
    source: Any,
    *,
    train: bool,
    spec: VideoSpec,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 256,
    start_batch: int = 0,
    stats: DataStats | None = None,
) -> ShardDataset:
    """Video clips (training) or K x S views per video (evaluation) from video shards.

    ``source``: anything :func:`datasets.manifest.resolve_source` accepts (folder with
    ``manifest.json``, brace pattern, list of tars, URLs) or a resolved ``ShardSource``.
    ``samples_per_epoch`` defaults to the manifest's total (training; required without a manifest;
    ignored in evaluation). ``start_batch`` resumes a training epoch (evaluation: must be 0).
    """
    train_sampler = RandomClipSampler(spec.num_frames, spec.stride)
    eval_sampler = UniformClipSampler(spec.num_frames, spec.stride, spec.num_clips)
    decoder = VideoSampleDecoder(
        train_sampler=train_sampler, eval_sampler=eval_sampler,
        # Clips stay uint8 until batched: one normalisation per batch is cheaper than one per clip.
        train_transform=video_transform(True, spec, normalize=False),
        eval_transform=video_transform(False, spec, normalize=False),
        decoder=spec.decoder, decode_timeout_s=spec.decode_timeout_s,
    )
    resolved, name = _resolve(source)
    return ShardDataset(
        source=resolved, source_name=name, kind="video", train=train, batch_size=batch_size, rank=rank,
        world_size=world_size, seed=seed, epoch=epoch, samples_per_epoch=samples_per_epoch,
        shuffle_buffer=shuffle_buffer, start_batch=start_batch, stats=stats,
        load_train=decoder.load_train, finish_train=decoder.finish_train, decode_eval=decoder.views,
        extra=None if train else {"num_views": spec.num_views},
        stackers={"video": NormalizedStack(spec.mean, spec.std)} if spec.output == "float" else None,
        sample_decoder=decoder, load_train_many=decoder.load_train_many,
    )


def build_image_dataset(
    source: Any,
    *,
    train: bool,
    spec: ImageSpec,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    samples_per_epoch: int | None = None,
    shuffle_buffer: int = 256,
    start_batch: int = 0,
    stats: DataStats | None = None,
) -> ShardDataset:
    """Images through timm's train or eval transforms from image shards (see :func:`build_video_dataset`)."""
    decoder = ImageSampleDecoder(image_transform(train, spec))
    resolved, name = _resolve(source)
    return ShardDataset(
        source=resolved, source_name=name, kind="image", train=train, batch_size=batch_size, rank=rank,
        world_size=world_size, seed=seed, epoch=epoch, samples_per_epoch=samples_per_epoch,
        shuffle_buffer=shuffle_buffer, start_batch=start_batch, stats=stats,
        load_train=decoder.load_train, finish_train=decoder.finish_train, decode_eval=decoder.views,
        sample_decoder=decoder,
    )


def make_loader(
    dataset: IterableDataset,
    *,
    num_workers: int = 2,
    pin_memory: bool = False,
    multiprocessing_context: str | None = None,
    prefetch_factor: int = 2,
) -> DataLoader:
    """A ``DataLoader`` over a batching dataset (``batch_size=None``: batches come ready-made).

    Workers are not persistent: each epoch builds a new dataset (new ``epoch``/``start_batch``).
    Batches come back in round-robin worker order (PyTorch's default ``in_order=True``), which the
    training split relies on: do not turn it off.
    """
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        multiprocessing_context=multiprocessing_context if num_workers > 0 else None,
        persistent_workers=False,
    )
