"""Preemption signals: handlers that only note the signal, chained to the ones before."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, NoReturn

__all__ = ["PREEMPTION_SIGNALS", "SignalWatch"]

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class SignalWatch:
    """Notes SIGTERM and SIGUSR1 (``signum``) for the next step boundary to act on, keeping
    the handlers installed before (main thread only: signals are delivered there)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("CheckpointManager made off the main thread: no preemption handlers "
                        "(signals are delivered to the main thread only)")
            return
        for sig in PREEMPTION_SIGNALS:
            self._previous[sig] = signal.signal(sig, self.on_signal)
        self._installed = True

    def on_signal(self, signum: int, frame: object) -> None:
        if self.signum is None:
            self.signum = signum
            # no logging here: a handler may interrupt a logging call holding its lock
            os.write(2, f"dckpt: rank {self.rank} got {signal.Signals(signum).name}: "
                        "emergency checkpoint at the next step boundary\n".encode())

    def restore(self) -> None:
        """Put back the handlers installed before."""
        if self._installed:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._installed = False

    def exit(self, signum: int) -> NoReturn:
        """Let the job end as the signal would have: the handler installed before runs, or
        the process exits with 128 + the signal's number."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, None)
        raise SystemExit(128 + int(signum))
