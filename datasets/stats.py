"""Bad-sample counters shared between a training process and its DataLoader workers.

A loader skips samples it cannot use (undecodable video or image, a decode that hung or crashed,
missing or invalid label, unknown file extension, unreadable shard) with a warning naming the shard and key, and counts
them here by reason. The counters live in shared memory (``multiprocessing.Array``), so
increments made inside forked or spawned ``DataLoader`` workers are visible to the caller.
"""

from __future__ import annotations

import multiprocessing as mp

__all__ = ["REASONS", "BadSample", "DataStats"]

# Why a sample (or a whole shard) was skipped.
REASONS: tuple[str, ...] = (
    "decode_error",  # video bytes the decoder cannot open or decode (corrupt, truncated, not a video)
    "decode_timeout",  # a decode abandoned by the watchdog after VideoSpec.decode_timeout_s (a hang)
    "decoder_crash",  # the decode process died (SIGSEGV in native code, an abort...) on this sample
    "bad_image",  # image bytes Pillow cannot decode
    "missing_label",  # no ``cls`` entry
    "bad_label",  # ``cls`` is not a non-negative integer, or is >= the number of classes
    "missing_data",  # no video / image entry in the sample
    "unknown_extension",  # an entry this loader does not decode (and never unpickles)
    "shard_error",  # a shard that cannot be opened or read to its end
)


class BadSample(Exception):
    """A sample the loader skips; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {REASONS}")
        super().__init__(message)
        self.reason = reason


class DataStats:
    """Counts of skipped samples by reason, shared with DataLoader worker processes.

    Create it in the training process and pass it to ``build_*_dataset(..., stats=stats)``; read
    ``stats.snapshot()`` (``{"decode_error": 2, "missing_label": 0, ...}``) or ``stats.total()``
    at any time. Counts only grow; :meth:`reset` zeroes them (e.g. before an evaluation pass).
    """

    def __init__(self) -> None:
        # 'q' = signed 64-bit; the Array carries its own lock, taken for every update.
        self._counts = mp.Array("q", len(REASONS))

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` skipped samples for ``reason``."""
        try:
            i = REASONS.index(reason)
        except ValueError:
            raise ValueError(f"unknown bad-sample reason {reason!r}; expected one of {REASONS}") from None
        with self._counts.get_lock():
            self._counts[i] += n

    def snapshot(self) -> dict[str, int]:
        """Current counts for every reason (zeros included)."""
        with self._counts.get_lock():
            values = list(self._counts[:])
        return dict(zip(REASONS, values))

    def total(self) -> int:
        """All skipped samples so far."""
        return sum(self.snapshot().values())

    def reset(self) -> None:
        with self._counts.get_lock():
            for i in range(len(REASONS)):
                self._counts[i] = 0

    def __repr__(self) -> str:
        nonzero = {k: v for k, v in self.snapshot().items() if v}
        return f"DataStats({nonzero})"
