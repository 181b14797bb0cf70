"""The forked decode process of :class:`datasets.decoders.watchdog.DecodeWatchdog`, and the parent's handle on it.

:class:`DecodeProcess` forks the child, which runs :func:`child_main`: it reads length-prefixed requests
``(offset, size, plan, first)`` from a pipe, decodes ``in_buf[offset : offset + size]`` with the plan's
frame indices, writes the frames into ``out_buf`` behind the previous clip's (from offset 0 again on
``first``) and answers with a fixed binary :data:`HEADER` (then the indices, or an error message).
Nothing the child sends is unpickled. How the parent uses it (timeouts, buffer growth, recycling) is
in :mod:`datasets.decoders.watchdog`.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import time
from collections.abc import Callable

import numpy as np

from datasets.decoders import open_video_source
from datasets.decoders.base import VideoDecodeError
from datasets.decoders.memory import keep_freed_buffers

__all__ = ["DECODE_ERROR", "HEADER", "INDEX_ERROR", "OK", "OTHER_ERROR", "TOO_BIG", "DecodeProcess", "Pipe"]

# Reply header: status, num_frames, number of indices, T, H, W, offset of the frames in the shared buffer
# (for TOO_BIG: status, bytes needed, bytes already used), then the child's CPU seconds so far.
HEADER = struct.Struct("<Bqqqqqqd")
OK, DECODE_ERROR, INDEX_ERROR, OTHER_ERROR, TOO_BIG = 0, 1, 2, 3, 4

class Pipe:
    """One direction of a pipe carrying length-prefixed messages (os-level: no selector per wait)."""

    _LEN = struct.Struct("<Q")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._poller: select.poll | None = None

    def send(self, *payloads: bytes) -> None:
        """Write one message per payload, all in one system call when they fit the pipe."""
        view = memoryview(b"".join(self._LEN.pack(len(p)) + p for p in payloads))
        while view:
            view = view[os.write(self.fd, view):]

    def wait(self, timeout_s: float) -> bool:
        """Whether a message (or end of file) is readable within ``timeout_s``."""
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        return bool(self._poller.poll(max(0, int(timeout_s * 1000))))

    def _read(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = os.read(self.fd, left)
            if not chunk:
                raise EOFError("end of file on the pipe")
            chunks.append(chunk)
            left -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def recv(self) -> bytes:
        (n,) = self._LEN.unpack(self._read(self._LEN.size))
        return self._read(n) if n else b""

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _pipe() -> tuple[Pipe, Pipe]:
    r, w = os.pipe()
    return Pipe(r), Pipe(w)


class DecodeProcess:
    """One forked decode process and its end of the pipes and buffers (parent side)."""

    def __init__(self, decoder: str, in_bytes: int, out_bytes: int) -> None:
        self.in_buf = mmap.mmap(-1, in_bytes)  # MAP_SHARED | MAP_ANONYMOUS: shared with the fork
        self.out_buf = mmap.mmap(-1, out_bytes)
        req_r, req_w = _pipe()
        rep_r, rep_w = _pipe()
        sys.stdout.flush()
        sys.stderr.flush()  # nothing buffered may be written twice by the child
        pid = os.fork()
        if pid == 0:  # the child: never returns
            try:
                req_w.close()
                rep_r.close()
                child_main(decoder, req_r, rep_w, self.in_buf, self.out_buf)
            finally:
                os._exit(70)
        req_r.close()
        rep_w.close()
        self.owner = os.getpid()
        self.pid, self.requests, self.replies = pid, req_w, rep_r
        self.decodes = 0
        self.cpu = 0.0  # the child's CPU seconds, as it last reported them

    def kill(self) -> str:
        """Kill the child (if alive), reap it, close everything; returns how it ended ("SIGSEGV", "exit 3")."""
        for conn in (self.requests, self.replies):
            conn.close()
        status = _reap(self.pid, kill=True)
        self.in_buf.close()
        self.out_buf.close()
        return status

    def stop(self) -> None:
        """Ask the child to exit (end of file on its requests), wait briefly, then kill it."""
        self.requests.close()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.005)
        else:
            _reap(self.pid, kill=True)
        self.replies.close()
        self.in_buf.close()
        self.out_buf.close()


def _reap(pid: int, *, kill: bool) -> str:
    if kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return "already reaped"
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name
    return f"exit status {os.WEXITSTATUS(status)}"


# ----------------------------------------------------------------------------- in the child process


def _child_setup() -> None:
    gc.freeze()  # objects inherited from the parent are never collected (nor finalised) here
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # die by the signal (no DataLoader/faulthandler handlers)
    if faulthandler.is_enabled():
        faulthandler.disable()
    if sys.platform.startswith("linux"):
        try:  # die with the parent even if it is killed with SIGKILL
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.environ.get("GLIMPSE_DECODER_STDERR") != "1":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    keep_freed_buffers()  # each decode's frames reuse the last one's pages (no page fault per frame buffer)


def child_main(decoder: str, requests: Pipe, replies: Pipe, in_buf: mmap.mmap, out_buf: mmap.mmap) -> None:
    _child_setup()
    used, skipping = 0, False  # bytes of out_buf holding this exchange's frames; after a TOO_BIG, skip
    while True:
        try:
            request = requests.recv()
        except (EOFError, OSError):
            os._exit(0)  # the parent closed its end or exited
        offset, size, plan, first = pickle.loads(request)  # from our own parent process
        if first:
            used, skipping = 0, False
        if skipping:
            replies.send(HEADER.pack(TOO_BIG, 0, 0, 0, 0, 0, 0, time.process_time()))
            continue
        error, num_frames, indices, frames = _decode_clip(decoder, bytes(in_buf[offset : offset + size]), plan)
        if error is not None:
            replies.send(HEADER.pack(error[0], 0, 0, 0, 0, 0, 0, time.process_time()) + error[1].encode())
        elif used + frames.nbytes > len(out_buf):
            skipping = True
            replies.send(HEADER.pack(TOO_BIG, frames.nbytes, used, 0, 0, 0, 0, time.process_time()))
        else:
            np.frombuffer(out_buf, dtype=np.uint8, count=frames.nbytes, offset=used)[:] = frames.reshape(-1)
            t, h, w, _ = frames.shape
            replies.send(HEADER.pack(OK, num_frames, indices.size, t, h, w, used, time.process_time())
                         + indices.tobytes())
            used += -(-frames.nbytes // 64) * 64  # 64-byte aligned: each clip starts on a cache line


def _decode_clip(decoder: str, data: bytes, plan: Callable[[int], np.ndarray]) -> tuple[tuple[int, str] | None, int, np.ndarray,
                                                                     np.ndarray]:
    """``(None, num_frames, indices, frames)``, or ``((status, message), 0, ...)`` when it cannot be decoded."""
    try:
        source = open_video_source(data, decoder)
        try:
            indices = np.ascontiguousarray(plan(source.num_frames), dtype=np.int64)
            frames = np.ascontiguousarray(source.get(indices))  # (N, H, W, 3) uint8
        finally:
            source.close()
    except VideoDecodeError as e:
        status, message = DECODE_ERROR, str(e)
    except IndexError as e:
        status, message = INDEX_ERROR, str(e)
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises it
        status, message = OTHER_ERROR, f"{type(e).__name__}: {e}"
    else:
        return None, source.num_frames, indices, frames
    return (status, message), 0, _NO_INDICES, _NO_INDICES


_NO_INDICES = np.zeros(0, np.int64)
