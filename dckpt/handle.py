"""SaveHandle: one asynchronous save, as the caller sees it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from dckpt.arguments import check_seconds
from dckpt.errors import SaveTimeoutError
from dckpt.info import CheckpointInfo

__all__ = ["SaveHandle"]


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
        """Wait until the save ended, either way; its outcome stays on the handle."""
        if self._future is not None:
            try:
                self._future.result()
            except BaseException:
                pass

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
