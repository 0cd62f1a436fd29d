"""What a failed save leaves behind: nothing that no manifest can reference.

A save that fails (a full disk, a storage error, a rank that died) has written some of its
segments. Left in place they hold the disk a full disk needs back, until a gc older than
``min_age_s`` takes them; so each rank removes the objects it created, when it can tell that
no manifest references them:

- the failure is DCP's outcome of a collective (``CheckpointException``), the same on every
  rank, and none of its failures is marked ``may_be_committed``: the coordinator marks a
  failure that came after it sent the manifest's create (an object store's request that
  timed out may still have arrived, a retry may find its own manifest: the step may be
  committed, and its data must stay; a local create is one link, so its failure there is
  certain and is not marked);
- otherwise (a collective broke: the coordinator may have committed before it did) only the
  coordinator knows, and only when it never sent the manifest.

What cannot be removed in time (a store that stops answering) is left for gc, which takes
any object no manifest references once its attempt is older than ``min_age_s``.
"""

from __future__ import annotations

import logging
import posixpath

from torch.distributed.checkpoint.api import CheckpointException

from dckpt.storage import Store
from dckpt.watchdog import Heartbeat, call_bounded

log = logging.getLogger(__name__)

MAY_BE_COMMITTED = "dckpt_may_be_committed"
"""The attribute ``mark`` sets on an exception; it travels with DCP's pickled failures."""

STALL_S = 5.0
"""The removal gives up after this long without removing an object: the save has failed
already, and its error should not wait on a store that stopped answering."""


def mark(failure: BaseException) -> None:
    """(coordinator) ``failure`` came after the manifest's create was sent."""
    setattr(failure, MAY_BE_COMMITTED, True)


def uncommitted(failure: BaseException, *, coordinator: bool, manifest_sent: bool) -> bool:
    """Whether no manifest can reference what this save wrote (see the module docstring)."""
    if isinstance(failure, CheckpointException):
        return not any(getattr(e, MAY_BE_COMMITTED, False)
                       for e, _trace in failure.failures.values())
    return coordinator and not manifest_sent


def remove(store: Store, names: list[str], what: str) -> None:
    """Remove the objects ``names`` and their emptied local folders, bounded by ``STALL_S``
    without progress; a failure is logged, never raised (the save's own error is the news)."""
    if not names:
        return
    beat = Heartbeat()

    def run() -> None:
        for name in names:
            store.delete(name)
            beat.beat()
        for folder in sorted({posixpath.dirname(n) for n in names}):
            store.remove_folder(folder)

    try:
        call_bounded(run, STALL_S, f"removing {what}", beat)
    except Exception as e:  # the save's error is raised; gc takes the rest
        log.warning("could not remove the %d objects of %s (%s); gc will", len(names), what, str(e))
        return
    log.info("removed the %d objects of %s", len(names), what)
