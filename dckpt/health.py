"""Can this job recover, and how fast? A check for monitors (not collective).

The newest checkpoint that is recoverable: its manifest reads and every object it references
exists and is long enough (a listing, no data read), or, with ``verify=True``, every byte it
references reads back and checks. A sample of its blocks is read (and checked) to measure the read
throughput, from which the restore's read time is estimated. Exit codes of ``dckpt health``
follow the monitoring-plugin convention: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass

from dckpt.errors import CheckpointNotFoundError, DckptError, StorageError
from dckpt.info import CheckpointInfo
from dckpt.manifest import Manifest
from dckpt.reads import read_stored_sample
from dckpt.repository import missing_object, read_manifest, still_committed
from dckpt.storage import Store
from dckpt.verify import verify_steps

__all__ = ["Health", "check_health", "OK", "WARNING", "CRITICAL", "UNKNOWN"]

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


@dataclass(frozen=True)
class Health:
    url: str
    code: int
    """0 OK, 1 WARNING, 2 CRITICAL (3 UNKNOWN is the CLI's, when the check itself fails)."""
    reasons: tuple[str, ...]
    newest_step: int | None
    newest_age_s: float | None
    recoverable_step: int | None
    """The newest checkpoint a restart would load; None: it would start from scratch."""
    unrecoverable: tuple[tuple[int, str], ...]
    """Newer checkpoints a restart would skip, with why."""
    checkpoints: int
    read_bytes_per_s: float | None
    """Measured on a sample of the recoverable checkpoint's blocks (one reader)."""
    estimated_read_s: float | None
    """The recoverable checkpoint's bytes per rank over the measured throughput: the read
    phase of a restore, roughly (start-up and the first step come on top)."""
    free_bytes: int | None
    """Free bytes on the repository's filesystem (local repositories only)."""

    @property
    def status(self) -> str:
        return ("OK", "WARNING", "CRITICAL", "UNKNOWN")[self.code]


def _check(store: Store, step: int, verify: bool, sample_bytes: int
           ) -> tuple[str | None, Manifest | None, float | None, float | None] | None:
    """(why checkpoint ``step`` would not load or None, its manifest, the measured read rate
    and restore estimate); None when it was deleted meanwhile, with its data collected."""
    m = rate = estimate = None
    try:
        m = read_manifest(store, step)
        why = _objects_present(store, m)
        if why is None and verify:
            report = verify_steps(store, [step])
            failed = [p for p in report.problems if not p.damage]
            if failed:  # no finding about the data: the check failed (UNKNOWN)
                raise StorageError(failed[0].message)
            why = None if report.ok else report.problems[0].message
        if why is None:  # the sample read also checks what it reads
            t0 = time.perf_counter()
            n = read_stored_sample(store, m, sample_bytes)
            seconds = time.perf_counter() - t0
            if n and seconds > 0:
                rate = n / seconds
                estimate = m.bytes_logical / max(1, m.world_size) / rate
    except CheckpointNotFoundError:
        return None
    except StorageError:
        raise  # the storage failed, not the checkpoint: the check's answer is UNKNOWN
    except DckptError as e:
        why = str(e).splitlines()[0]
    if why is not None and not still_committed(store, step):
        return None
    return why, m, rate, estimate


def _objects_present(store: Store, m: Manifest) -> str | None:
    """Why ``m`` cannot load from what the listing shows, or None."""
    return missing_object(store, m.extents())


def check_health(store: Store, newest_first: Iterable[CheckpointInfo], count: int, *,
                 max_age_s: float | None = None, min_free_bytes: int | None = None,
                 verify: bool = False, sample_bytes: int = 64 << 20) -> Health:
    """``newest_first``: the committed checkpoints, newest first (read as they are asked
    for: the check stops at the first recoverable one); ``count``: how many there are."""
    unrecoverable: list[tuple[int, str]] = []
    recoverable: tuple[CheckpointInfo, Manifest] | None = None
    rate = estimate = None
    newest = None  # the newest whose manifest reads: a damaged one has no time
    for info in newest_first:
        if newest is None and info.problem is None:
            newest = info
        if info.problem is not None or info.quarantined is not None:  # (a storage that
            # failed to give the manifest raised StorageError in the listing: UNKNOWN)
            why: str | None = info.problem or f"quarantined: {info.quarantined}"
            assert why is not None
            unrecoverable.append((info.step, why.splitlines()[0]))
            continue
        checked = _check(store, info.step, verify, sample_bytes)
        if checked is None:
            continue  # deleted since the listing (a job's retention): not damage
        why, m, rate, estimate = checked
        if why is None:
            assert m is not None
            recoverable = (info, m)
            break
        unrecoverable.append((info.step, why))
    age = time.time() - newest.created_at if newest is not None else None
    free = None
    if store.local:
        try:
            free = shutil.disk_usage(store.root).free
        except OSError:
            free = None
    code, reasons = OK, []
    if recoverable is None:
        code = CRITICAL
        reasons.append("the repository holds no committed checkpoint: a restart would start "
                       "from scratch" if not count else
                       f"none of the {count} checkpoints is recoverable")
    else:
        if unrecoverable:
            code = WARNING
            reasons.append(f"newer checkpoints not recoverable: {[s for s, _ in unrecoverable]}"
                           f"; a restart would fall back to step {recoverable[0].step}")
        if max_age_s is not None and age is not None and age > max_age_s:
            code = WARNING
            reasons.append(f"the newest checkpoint is {age:.0f} s old (limit {max_age_s:.0f} s)")
    if min_free_bytes is not None and free is not None and free < min_free_bytes:
        code = max(code, WARNING)
        reasons.append(f"{free} bytes free, under the limit of {min_free_bytes}")
    return Health(store.url, code, tuple(reasons), newest.step if newest else None, age,
                  recoverable[0].step if recoverable else None, tuple(unrecoverable),
                  count, rate, estimate, free)
