"""Decoder backends for tests, registered under names a VideoSpec accepts (``VideoSpec(decoder=...)``).

Each wraps a real backend (PyAV): no decoding library is mocked. They are registered when this module
is imported, before any DataLoader worker or decode process is forked, so those inherit them.

- ``test-counting``: counts the videos opened, in every process (a shared counter);
- ``test-poison``: decodes normally, except bytes starting with ``HANG!`` (blocks forever inside a native
  call that holds the GIL, as decord's loop does, dmlc/decord#373), ``CRASH`` (SIGSEGV) or ``EXIT!``
  (``os._exit(3)``): the watchdog's hang and crash cases.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal

from datasets.decoders import get_backend, register_decoder

__all__ = ["COUNTING", "POISON", "counting_backend", "poison_clip"]

COUNTING, POISON = "test-counting", "test-poison"


class CountingBackend:
    name = COUNTING

    def __init__(self) -> None:
        self.opened = mp.Value("q", 0)  # shared memory: increments in forked processes are seen here

    def available(self) -> tuple[bool, str]:
        return True, ""

    def open(self, data: bytes):
        with self.opened.get_lock():
            self.opened.value += 1
        return get_backend("pyav").open(data)


class PoisonBackend:
    name = POISON

    def available(self) -> tuple[bool, str]:
        return True, ""

    def open(self, data: bytes):
        head = bytes(data[:5])
        if head == b"HANG!":
            ctypes.PyDLL(None).pause()  # native, GIL held (PyDLL keeps it): nothing in this process runs again
        elif head == b"CRASH":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif head == b"EXIT!":
            os._exit(3)
        return get_backend("pyav").open(data)


def poison_clip(kind: str, payload: bytes = b"") -> bytes:
    """Bytes that make ``test-poison`` hang (``"hang"``), crash (``"crash"``) or exit (``"exit"``)."""
    return {"hang": b"HANG!", "crash": b"CRASH", "exit": b"EXIT!"}[kind] + payload


_counting = CountingBackend()
register_decoder(COUNTING, _counting)
register_decoder(POISON, PoisonBackend())


def counting_backend() -> CountingBackend:
    return _counting
