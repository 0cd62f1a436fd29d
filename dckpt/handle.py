"""SaveHandle: one asynchronous save, as the caller sees it."""

from __future__ import annotations

import concurrent.futures.thread  # noqa: F401 - its exit hook first: ours runs before it
import logging
import threading
from collections.abc import Callable
from concurrent import futures
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from dckpt.arguments import check_seconds
from dckpt.errors import SaveTimeoutError
from dckpt.info import CheckpointInfo

__all__ = ["SaveHandle"]

log = logging.getLogger(__name__)

_running: set[SaveHandle] = set()
"""The saves in flight in this process (kept until they end, so that exit waits for them
even where the caller dropped the handle)."""
_running_lock = threading.Lock()


def _finish_at_exit() -> None:
    """Let the saves in flight end before the interpreter's shutdown joins its threads:
    after it, thread pools refuse new work, which a save's writes need, and a script that
    returns right after ``async_save`` lost that checkpoint without a word (DCP's async
    saves complete at exit too)."""
    with _running_lock:
        running = [h for h in _running if not h.done()]
    for handle in sorted(running, key=lambda h: h.step):
        log.warning("the process is exiting: waiting for the save of step %d to end (call "
                    "wait() on its handle to choose when)", handle.step)
        handle.settle()
        if handle.error is not None:
            log.error("the save of step %d failed: %s", handle.step, str(handle.error))


# IMPORTANT: threading's exit hooks run in reverse order of registration, before any thread
# is joined; concurrent.futures.thread registered its own (which shuts the pools) above
threading._register_atexit(_finish_at_exit)  # type: ignore[attr-defined]


class SaveHandle:
    """One asynchronous save: staged when returned, written and committed in the background.

    ``wait()`` returns the CheckpointInfo or raises the save's error (the same error on
    every rank); ``done()`` does not block. A skipped save (``if_busy="skip"``) is done at
    once and ``wait()`` returns None.
    """

    def __init__(self, step: int, future: Future[CheckpointInfo] | None, *,
                 staged: Callable[[], None] = lambda: None, skipped_for: int | None = None,
                 pause_s: float = 0.0) -> None:
        self.step = step
        self._future = future
        self._staged = staged
        self.skipped = future is None
        """True when the save was skipped because another was in flight."""
        self.skipped_for = skipped_for
        """The step whose save was in flight when this one was skipped."""
        self.pause_s = pause_s
        """Seconds the caller was held in ``async_save`` on this rank."""
        if future is not None and not future.done():
            with _running_lock:
                _running.add(self)
            future.add_done_callback(lambda _: self._ended())

    def _ended(self) -> None:
        with _running_lock:
            _running.discard(self)

    def __repr__(self) -> str:
        state = ("skipped" if self.skipped else "running" if not self.done()
                 else "failed" if self.error else "committed")
        return f"SaveHandle(step={self.step}, {state})"

    @property
    def future(self) -> Future[CheckpointInfo] | None:
        """The background save as a ``concurrent.futures.Future`` (None when skipped), for
        frameworks that track saves that way."""
        return self._future

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def settle(self) -> None:
        """Wait until the save ended, either way; its outcome stays on the handle.

        Raises nothing, and re-raises nothing: an exception raised again takes the frames
        it passes through into its traceback, and the future keeps it, so every later save
        or load that waited here (``wait_idle``) would have kept its caller's state alive.
        """
        if self._future is not None:
            futures.wait((self._future,))

    def wait(self, timeout: float | None = None) -> CheckpointInfo | None:
        """Block until committed (the info) or failed (raises); SaveTimeoutError (a
        TimeoutError) past ``timeout`` seconds, the save going on."""
        timeout = check_seconds(timeout, "timeout", optional=True)
        if self._future is None:
            return None
        try:
            return self._future.result(timeout)
        except FutureTimeout:
            raise SaveTimeoutError(f"the save of step {self.step} is still running after "
                                   f"{timeout} s; it goes on in the background") from None

    @property
    def error(self) -> BaseException | None:
        """The save's failure once done, else None."""
        if self._future is None or not self._future.done():
            return None
        return self._future.exception()

    @property
    def info(self) -> CheckpointInfo | None:
        """The committed checkpoint's info once done and successful, else None."""
        if self._future is None or not self._future.done() or self._future.exception():
            return None
        return self._future.result()

    def wait_staged(self) -> None:
        """Overlap mode: return when the staged copy is complete (so the state may change).

        On CUDA the training's stream waits for the copies and the host goes on at once.
        A no-op when staging already finished inside ``async_save``.
        """
        self._staged()
