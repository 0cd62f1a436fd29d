"""Bounded waits on I/O threads, and what a long load or save says as it runs (``reported``).

A local path may be a network or FUSE mount (NFS, Lustre, an object store mounted as a
folder); when it stops answering, a write or read blocks in the kernel, where no timeout
reaches. The thread that waits on the I/O threads gives up instead: ``wait_all`` raises
StorageError once ``stall_s`` pass without progress (a request done, or ``Heartbeat.beat``
from inside a long one). The stuck threads are left behind, on memory nothing else uses:
a save's segments of an attempt that will not commit (gc removes them), a load's buffers.
Time the whole process was not running (a job suspended by its scheduler) does not count:
``Heartbeat.woke``.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import TypeVar

from dckpt.errors import StorageError

__all__ = ["Heartbeat", "Stalled", "wait_all", "as_done", "call_bounded", "reported", "STALL_S",
           "PROGRESS_S"]

log = logging.getLogger(__name__)

STALL_S = 300.0
"""The default bound on I/O without progress (``io_stall_timeout_s``)."""

PROGRESS_S = 30.0
"""How often a long load or save says how far it got (``reported``)."""

T = TypeVar("T")


class Stalled(StorageError):
    """I/O threads made no progress in time; they are still running (or blocked)."""


LATE_S = 1.0
"""A wait that wakes this much later than it asked was not running in between (below)."""


class Heartbeat:
    """The time of the last sign of progress, shared by the I/O threads of one wait."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def woke(self, since: float, timeout: float) -> float:
        """(the waiting thread, after a wait of ``timeout`` ran out; ``since``: its previous
        wake, or when it began) The time now. A wake more than ``LATE_S`` late means this
        process was not running (a SIGSTOP, a scheduler's suspend, a machine starved of
        CPU), and its I/O threads were not either: that time is added to the last beat, not
        counted as the storage's silence (a load suspended for 5 s failed on a 2 s bound as
        the job resumed)."""
        now = time.monotonic()
        late = now - since - timeout
        if late > LATE_S:
            self.last += late
        return now


def wait_all(futures: Sequence[Future[T]], stall_s: float, what: str,
             heartbeat: Heartbeat | None = None) -> list[T]:
    """Every future's result, in order; the first failure as soon as it is known; Stalled
    (a StorageError) when neither a future ends nor ``heartbeat`` beats for ``stall_s``.
    O(n) in the futures (a fragmented restore waits on thousands)."""
    beat = heartbeat or Heartbeat()
    failed: list[BaseException] = []

    def ended(f: Future[T]) -> None:
        beat.beat()
        if not f.cancelled() and f.exception() is not None:
            failed.append(f.exception())  # type: ignore[arg-type]

    for f in futures:
        f.add_done_callback(ended)
    results = []
    tick = min(0.2, stall_s)
    since = time.monotonic()
    for f in futures:
        while True:
            if failed:
                raise failed[0]
            try:
                results.append(f.result(timeout=tick))
                since = time.monotonic()
                break
            except FutureTimeout:
                since = beat.woke(since, tick)
                if since - beat.last > stall_s:
                    pending = sum(not g.done() for g in futures)
                    raise Stalled(_no_progress(what, stall_s, pending)) from None
    return results


def as_done(futures: Sequence[Future[T]], stall_s: float, what: str) -> Iterator[Future[T]]:
    """The futures as they end (as ``concurrent.futures.as_completed``); Stalled when none
    ends for ``stall_s`` (a bound no config sets: its message names no setting to raise)."""
    ended: queue.SimpleQueue[Future[T]] = queue.SimpleQueue()
    for f in futures:
        f.add_done_callback(ended.put)
    tick = min(1.0, stall_s)
    for pending in range(len(futures), 0, -1):
        beat = Heartbeat()  # the caller's time between two futures is not the storage's
        since = beat.last
        while True:
            try:
                f = ended.get(timeout=tick)
                break
            except queue.Empty:
                since = beat.woke(since, tick)
                if since - beat.last > stall_s:
                    raise Stalled(_no_progress(what, stall_s, pending, remedy="")) from None
        yield f


def _no_progress(what: str, stall_s: float, pending: int,
                 remedy: str = "If it is only slow, raise io_stall_timeout_s (SaveConfig, "
                               "LoadConfig)") -> str:
    return (f"{what}: no progress for {stall_s:g} s with {pending} request(s) in flight: the "
            "storage stopped answering (a hung network or FUSE mount, or an object store's "
            f"server?); their threads are left behind. {remedy}").rstrip()


class _Worker(threading.Thread):
    """A daemon thread that runs one call at a time and then offers itself again; one that
    never returns (blocked in the kernel) is never offered again."""

    def __init__(self) -> None:
        super().__init__(name="dckpt-io", daemon=True)
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            self.calls.get()()
            _IDLE.put(self)


_IDLE: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
"""Workers free for the next call (starting a thread per call cost 130 us)."""


def _forget_workers() -> None:
    """(a forked child) The parent's workers are not threads here: a call handed to one
    never ran, and every bounded call failed as a storage that stopped answering."""
    global _IDLE
    _IDLE = queue.SimpleQueue()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


def call_bounded(fn: Callable[[], T], stall_s: float, what: str,
                 heartbeat: Heartbeat | None = None) -> T:
    """``fn()`` in a worker thread (a daemon: it cannot hold up the process's exit); Stalled
    when it has not returned after ``stall_s`` (with ``heartbeat``: ``stall_s`` without a
    beat, for long calls that beat as they go), its thread left behind."""
    box: dict[str, object] = {}
    done = threading.Event()

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # raised in the caller's thread
            box["error"] = e
        finally:
            done.set()

    try:
        worker = _IDLE.get_nowait()
    except queue.Empty:
        worker = _Worker()
        worker.start()
    worker.calls.put(call)
    beat = heartbeat or Heartbeat()
    since = time.monotonic()
    while True:
        timeout = max(0.0, min(1.0, beat.last + stall_s - since))
        if done.wait(timeout):
            break
        since = beat.woke(since, timeout)
        if since - beat.last < stall_s:
            continue
        raise Stalled(f"{what}: no answer for {stall_s:g} s: the storage stopped answering "
                      "(a hung network or FUSE mount, or an object store's server?); its "
                      "thread is left behind. If it is only slow, raise io_stall_timeout_s "
                      "(SaveConfig, LoadConfig)")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@contextmanager
def reported(what: str, done: Callable[[], int], *, loud: bool,
             verb: str = "read") -> Iterator[None]:
    """While the block runs, log every ``PROGRESS_S`` the bytes ``done()`` counts and their
    rate (INFO where ``loud``, else DEBUG): a restore of hundreds of GB from an object store
    takes minutes, and said nothing before it ended; a save as much. A block shorter than
    that logs nothing."""
    stop = threading.Event()
    t0 = time.monotonic()
    level = logging.INFO if loud else logging.DEBUG

    def run() -> None:
        while not stop.wait(PROGRESS_S):
            n, seconds = done(), time.monotonic() - t0
            amount = f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
            rate = n / seconds
            speed = f"{rate / 1e9:.2f} GB/s" if rate >= 1e8 else f"{rate / 1e6:.1f} MB/s"
            log.log(level, "%s: %s %s in %.0f s (%s)", what, amount, verb, seconds, speed)

    ticker = threading.Thread(target=run, name="dckpt-progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
