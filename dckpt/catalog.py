"""The public functions over a repository that read or tidy it, outside any job: list,
inspect, verify, delete, gc, status, health, diff (none collective). Free of torch, so that
``dckpt ls``, ``verify`` or ``health`` from cron answers in a fraction of a second instead of
waiting seconds for torch's import; save, load and export are ``dckpt.api``."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator

from dckpt import layout
from dckpt.arguments import (
    check_bool,
    check_bytes,
    check_path,
    check_seconds,
    check_step,
    public,
)
from dckpt.decoder import reusing
from dckpt.diff import Diff, diff_manifests
from dckpt.errors import CheckpointNotFoundError, DckptError
from dckpt.health import Health, check_health
from dckpt.info import CheckpointInfo, info_from_manifest
from dckpt.manifest import Manifest
from dckpt.repository import (
    committed_steps,
    open_repository,
    quarantined,
    read_manifest,
    set_quarantine,
    summaries,
)
from dckpt.status import Status, repository_status
from dckpt.storage import Store
from dckpt.sweep import DEFAULT_MIN_AGE_S, GcReport, collect
from dckpt.verify import Progress, VerifyReport, verify_steps

__all__ = ["list_checkpoints", "committed", "inspect", "verify", "delete", "gc", "status", "health", "diff"]

log = logging.getLogger(__name__)

HEALTH_DECODED_BYTES = 64 << 20
"""The health check reads a checkpoint's manifest twice (its info, then its check): the
second is the first one's decode, for manifests up to this many bytes."""


@public
def list_checkpoints(url: str, *, storage_options: dict | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints, oldest first. One whose manifest is damaged (or of a newer
    format) is listed with ``problem`` set (its checksum and header are checked, its items
    are not decoded: ``decoder.summary``); the storage failing to give one raises
    StorageError. Not collective."""
    store = open_repository(url, storage_options, required=False)
    # an empty or absent repository is a valid, empty one
    return list(_infos(store, committed_steps(store)))


def _infos(store: Store, steps: Iterable[int]) -> Iterator[CheckpointInfo]:
    """Each step's CheckpointInfo, in the order of ``steps``, read as it is asked for; a
    damaged one with ``problem`` set, one deleted since the listing left out; a manifest
    the storage fails to give raises StorageError."""
    marked = quarantined(store)
    for step, m in summaries(store, steps):
        yield (CheckpointInfo(step=step, url=store.url, created_at=0.0, metrics={}, world_size=0,
                              bytes_logical=0, bytes_written=0, problem=str(m))
               if isinstance(m, DckptError) else
               info_from_manifest(m, store.url, quarantined=marked.get(step)))


@public
def committed(url: str, *, storage_options: dict | None = None) -> list[int]:
    """The committed steps, oldest first, from a listing alone: no manifest read (a damaged
    one is listed too). Not collective."""
    return committed_steps(open_repository(url, storage_options, required=False))


@public
def verify(url: str, *, step: int | None = None, all_steps: bool = False,
           quarantine: bool = False, storage_options: dict | None = None,
           progress: Progress | None = None) -> VerifyReport:
    """Read back and check every byte of one checkpoint (``step``, default the newest), or of
    every committed one with ``all_steps=True``. ``quarantine``: mark each damaged one so
    that restores skip it at once (nothing is deleted), and clear the mark of each one that
    verifies clean; a step whose only problems are the storage's (``Problem.damage`` False:
    a read that failed, not bytes found wrong) keeps its mark as it was. A mark that cannot
    be written (a read-only copy) is logged as an error, the report returned as without
    marks. Raises only when ``url`` holds no repository (or
    the asked step does not exist), or StorageError when no read ends for 300 s
    (``watchdog.STALL_S``: a hung mount). Not collective."""
    step = check_step(step, optional=True)
    check_bool(all_steps, "all_steps")
    check_bool(quarantine, "quarantine")
    store = open_repository(url, storage_options)
    steps = committed_steps(store)
    if step is not None:
        if step not in steps:
            raise CheckpointNotFoundError(f"{url} has no committed checkpoint for step {step}; "
                                          f"committed steps: {steps or 'none'}")
        steps = [step]
    elif not all_steps:
        steps = steps[-1:]
    report = verify_steps(store, steps, progress=progress)
    if step is not None and step not in report.steps:
        raise CheckpointNotFoundError(f"{url}: step {step} was deleted while it was verified")
    if quarantine:
        bad: dict[int, str] = {}
        for p in report.problems:
            if p.damage:
                bad.setdefault(p.step, p.message.splitlines()[0])
        unsure = {p.step for p in report.problems} - set(bad)  # the storage failed there
        unmarked: list[str] = []
        for s in report.steps:
            if s in unsure:
                continue
            try:
                set_quarantine(store, s, bad.get(s))
            except (OSError, DckptError) as e:  # a read-only copy: the findings still count
                unmarked.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0]}")
                bad.pop(s, None)
        if unmarked:
            log.error("verify of %s could not update the quarantine marks of %d step(s) (a "
                      "restore reads a damaged one to find the damage itself): %s", url,
                      len(unmarked), "; ".join(unmarked[:3]))
        if bad:
            log.warning("quarantined steps %s of %s", sorted(bad), url)
    return report


@public
def delete(url: str, *, step: int, storage_options: dict | None = None) -> None:
    """Drop checkpoint ``step``: its manifest, the commit point, is removed, so it is no longer
    listed or loaded. Its data stays until ``gc`` finds nothing references it (other
    checkpoints may share its blocks); a copy of the manifest waits under ``deleted/`` for
    gc's grace period, so that a save in flight that references its blocks keeps them.
    Its quarantine mark goes too. Not collective."""
    step = check_step(step)
    store = open_repository(url, storage_options)
    steps = committed_steps(store)
    if step not in steps:
        raise CheckpointNotFoundError(f"{url} has no committed checkpoint for step {step}; "
                                      f"committed steps: {steps or 'none'}")
    if step in quarantined(store):  # first: a mark that outlived the step would skip the
        set_quarantine(store, step, None)  # checkpoint saved under it again, sound or not
    name = layout.manifest_name(step)
    try:
        raw = store.read_bytes(name)
    except FileNotFoundError:
        raw = None  # deleted meanwhile by another process
    if raw is not None:
        # IMPORTANT: kept for gc's grace period: a save in flight may reference its blocks
        store.write_if_absent(layout.tombstone_name(step), raw)
        store.delete(name)
    log.info("deleted the checkpoint of step %d from %s", step, url)


@public
def gc(url: str, *, dry_run: bool = False, min_age_s: float = DEFAULT_MIN_AGE_S,
       deleted_min_age_s: float | None = None, storage_options: dict | None = None,
       progress: Progress | None = None) -> GcReport:
    """Remove the data no committed checkpoint references (see dckpt.sweep for what is
    spared: saves younger than ``min_age_s`` may be in flight; a checkpoint deleted less than
    ``deleted_min_age_s`` ago, default ``min_age_s``, may be a save's base). ``dry_run``:
    report, remove nothing. Not collective."""
    check_bool(dry_run, "dry_run")
    check_seconds(min_age_s, "min_age_s")
    check_seconds(deleted_min_age_s, "deleted_min_age_s", optional=True)
    store = open_repository(url, storage_options)
    return collect(store, dry_run=dry_run, min_age_s=min_age_s,
                   deleted_min_age_s=deleted_min_age_s, progress=progress)


@public
def status(url: str, *, storage_options: dict | None = None,
           memory_dir: str | os.PathLike | None = None) -> Status:
    """The repository at a glance: the newest usable checkpoint and its age, the count,
    damaged and quarantined steps, a pipeline's progress, and what this node's memory tier
    holds. Not collective."""
    if memory_dir is not None:
        memory_dir = check_path(memory_dir, "memory_dir", "a folder path or None")
    store = open_repository(url, storage_options, required=False)
    return repository_status(store, list(_infos(store, committed_steps(store))), memory_dir)


@public
def health(url: str, *, max_age_s: float | None = None, min_free_bytes: int | None = None,
           verify: bool = False, sample_bytes: int = 64 << 20,
           storage_options: dict | None = None) -> Health:
    """Whether a restart would find a checkpoint, how old it is, an estimate of the restore's
    read time from a measured sample, free space (see dckpt.health). Not collective."""
    check_seconds(max_age_s, "max_age_s", optional=True)
    check_bytes(min_free_bytes, "min_free_bytes", optional=True)
    check_bool(verify, "verify")
    check_bytes(sample_bytes, "sample_bytes")
    store = open_repository(url, storage_options, required=False)
    steps = committed_steps(store)
    # newest first, each manifest read when the check comes to it (and decoded once): the
    # check stops at the first recoverable one, older ones are never read
    with reusing({}, HEALTH_DECODED_BYTES):
        return check_health(store, _infos(store, reversed(steps)), len(steps),
                            max_age_s=max_age_s, min_free_bytes=min_free_bytes,
                            verify=verify, sample_bytes=sample_bytes)


@public
def diff(url: str, step_a: int, step_b: int, *, storage_options: dict | None = None) -> Diff:
    """Which items differ between checkpoints ``step_a`` and ``step_b``, and the stored bytes
    they share; from the manifests alone. Not collective."""
    step_a = check_step(step_a, "step_a")
    step_b = check_step(step_b, "step_b")
    store = open_repository(url, storage_options)
    return diff_manifests(read_manifest(store, step_a), read_manifest(store, step_b))


@public
def inspect(url: str, *, step: int | None = None,
            storage_options: dict | None = None) -> Manifest:
    """The manifest of ``step`` (default: the newest committed). Not collective."""
    step = check_step(step, optional=True)
    store = open_repository(url, storage_options)
    return read_manifest(store, step)
