"""The CheckpointManager's upkeep: the retention policy, then gc, in a background thread.

The decisions are pure (``retention.plan``, ``retention.gc_min_age_s``); this module applies
them to the repository (rank 0 only, after each commit, not collective), and deletes the
checkpoints a restore passed over before the run saves their steps again (``clear``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from dckpt import catalog, dist
from dckpt.decoder import reusing
from dckpt.errors import CheckpointNotFoundError, DckptError, headline
from dckpt.info import CheckpointInfo
from dckpt.logs import event
from dckpt.manifest import Manifest
from dckpt.metrics import Metrics
from dckpt.retention import Policy, gc_min_age_s, plan
from dckpt.storage import Store
from dckpt.sweep import GcReport, collect

__all__ = ["RetentionReport", "Upkeep", "GC_MARGIN_S"]

log = logging.getLogger(__name__)

DECODED_BYTES = 32 << 20
"""The upkeep keeps the manifests it decoded for its next run, up to this many bytes of them
(about five times as much memory): each run reads every committed manifest twice."""

GC_MARGIN_S = 60.0
"""Garbage collection after retention spares what started this long before the oldest save
this manager may still have in flight (clock skew between hosts)."""


@dataclass(frozen=True)
class RetentionReport:
    kept: tuple[int, ...]
    deleted: tuple[int, ...]
    dry_run: bool
    gc: GcReport | None = None


class Upkeep:
    """Applies ``retention`` and, with ``gc``, collects garbage, sparing the saves that may
    still be writing: ``in_flight()`` gives their (steps, wall-clock start times)."""

    def __init__(self, url: str, storage_options: dict | None, retention: Policy | None,
                 gc: bool, in_flight: Callable[[], tuple[Iterable[int], Iterable[float]]],
                 metrics: Metrics | None = None) -> None:
        self.url = url
        self.storage_options = storage_options
        self.retention = retention
        self.gc = gc
        self.in_flight = in_flight
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="dckpt-retention")
        self._jobs: list[Future[RetentionReport]] = []
        self._lock = threading.Lock()
        self._decoded: dict[bytes, Manifest] = {}  # manifests read by the last run
        self._stopping = False  # a preemption's exit: the run in progress stops at its next step

    @property
    def active(self) -> bool:
        return self.retention is not None or self.gc

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints whose manifest reads, oldest first."""
        return [c for c in catalog.list_checkpoints(self.url, storage_options=self.storage_options)
                if c.problem is None]

    def submit(self) -> None:
        """Run ``apply`` in the background (after a commit)."""
        self._jobs.append(self._pool.submit(self.apply))

    def apply(self, dry_run: bool = False) -> RetentionReport:
        """Delete the checkpoints the policy does not keep (never the newest, nor one being
        written), then collect garbage."""
        with self._lock, reusing(self._decoded, DECODED_BYTES):
            infos = self.checkpoints()
            kept, deleted = [c.step for c in infos], list[int]()
            protect, started = self.in_flight()
            if self.retention is not None:
                kept, deleted = plan(self.retention, infos, protect=protect)
                for s in [] if dry_run else deleted:
                    self._check_stop()
                    try:
                        catalog.delete(self.url, step=s, storage_options=self.storage_options)
                    except CheckpointNotFoundError:
                        pass  # deleted meanwhile
            report = None
            if self.gc:
                # IMPORTANT: spare every save of this manager that may still be writing (one
                # waiting in async_save for the one before included); deleted checkpoints
                # need the margin only: this job's saves take the newest committed checkpoint
                # as their base, and retention never deletes it
                now = time.time()
                report = collect(Store(self.url, self.storage_options), dry_run=dry_run,
                                 min_age_s=gc_min_age_s(now, started, GC_MARGIN_S),
                                 deleted_min_age_s=GC_MARGIN_S, now_s=now,
                                 progress=lambda done, total: self._check_stop())
            freed = report.bytes_freed if report is not None else 0
            if deleted or freed:
                log.info("retention%s: kept steps %s, deleted %s; gc freed %d bytes",
                         " (dry run)" if dry_run else "", kept, deleted, freed,
                         extra=event("retention", bytes=freed,
                                     reason=f"deleted steps {deleted}"))
            if self.metrics is not None and not dry_run:
                self.metrics.observe_repository(self.url, len(kept))
            return RetentionReport(tuple(kept), tuple(deleted), dry_run, report)

    def clear(self, step: int, why: str, group: Any) -> None:
        """(all ranks; rank 0 deletes) Delete checkpoint ``step``, which this run's restore
        passed over (``why``: damaged, quarantined), before the run saves that step again.
        A committed step is never overwritten: that save failed ("already committed"), and
        the run had no checkpoint of the step. Gone already is fine; a delete that fails is
        the same error on every rank."""
        error: DckptError | None = None
        if dist.rank() == 0:
            log.warning("deleting checkpoint %d of %s, which the restore passed over (%s), "
                        "to save that step again", step, self.url, headline(why),
                        extra=event("retention", step=step, reason="passed over on restore"))
            try:  # not under the lock: a retention pass holds it for as long as it runs,
                # while the other ranks wait in the broadcast below; a delete races another
                catalog.delete(self.url, step=step, storage_options=self.storage_options)
            except CheckpointNotFoundError:  # gone already (that pass deleted it)
                pass
            except DckptError as e:
                error = e
        with dist.collectives(f"the delete of step {step} before its save", saving=True):
            error = dist.broadcast(error, group)  # type: ignore[assignment]
        if error is not None:
            raise error

    def _check_stop(self) -> None:
        if self._stopping:
            raise _Stopped

    def wait(self) -> None:
        """Wait for the runs submitted; a failure is logged, never raised."""
        for job in self._jobs:
            try:
                job.result()
            except (_Stopped, CancelledError):
                log.info("retention and gc of %s stopped for the exit; the next run's first "
                         "save resumes them", self.url)
            except Exception as e:
                log.error("retention failed: %s", str(e))
        self._jobs = []

    def close(self, *, finish: bool = True) -> None:
        """Wait for the runs submitted; without ``finish`` (a preemption's exit, which has
        seconds) the queued ones are cancelled and the one in progress stops at its next
        delete or data folder. Both are safe to stop anywhere (a delete is one removal,
        gc removes data only after it found what is live), and idempotent."""
        if not finish:
            self._stopping = True
            for job in self._jobs:
                job.cancel()
        self.wait()
        self._pool.shutdown(wait=True)


class _Stopped(Exception):
    """Retention or gc stopped for a preemption's exit."""
