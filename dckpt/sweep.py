"""Garbage collection: remove the data objects that no committed checkpoint references.

What is live: every block that a committed manifest references, and every block of a
checkpoint deleted less than ``min_age_s`` ago (``dckpt.delete`` leaves its manifest under
``deleted/`` for that long: a save that started before the delete may still reference its
blocks). What is spared: objects of a save attempt younger than ``min_age_s`` (the attempt's
name carries its start time), which may still be in flight. Everything else under ``data/``
goes. A segment that some blocks of a live checkpoint still need is kept whole; the bytes no
one references in it are reported as waste. On S3, the multipart uploads under ``data/`` that
never completed (a writer killed mid-upload: no listing shows them, but their parts are
stored) are aborted by the same rule of age.

A damaged manifest stops gc: what it references cannot be told from garbage. One that
vanishes after the listing was deleted meanwhile: its tombstone, written before the manifest
is removed and listed after the manifests, keeps its blocks live.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from dckpt import layout
from dckpt.block_table import BlockTable
from dckpt.decoder import Reference, reference_rows
from dckpt.errors import CheckpointNotFoundError, DckptError, FormatError
from dckpt.live_blocks import LiveBlocks
from dckpt.repository import committed_steps, read_references
from dckpt.storage import Store

__all__ = ["GcReport", "collect", "DEFAULT_MIN_AGE_S"]

log = logging.getLogger(__name__)

DEFAULT_MIN_AGE_S = 3600.0
"""Grace period: longer than any save takes, so that gc never races one."""


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    deleted: tuple[str, ...]
    """Objects removed (with ``dry_run``: that would be removed)."""
    bytes_freed: int
    kept_young: tuple[str, ...]
    """Unreferenced objects spared because their save may still be in flight."""
    partly_referenced: tuple[tuple[str, int, int], ...]
    """(object, its size, its bytes no live checkpoint references), for kept objects."""
    live_checkpoints: tuple[int, ...]
    aborted_uploads: tuple[str, ...] = ()
    """(S3) Multipart uploads of attempts older than ``min_age_s`` that never completed (a
    writer killed mid-upload), aborted (with ``dry_run``: that would be): their parts were
    stored, and billed, though no listing shows them. Their bytes are in ``bytes_freed``."""

    @property
    def wasted_bytes(self) -> int:
        return sum(w for _, _, w in self.partly_referenced)


Progress = Callable[[int, int], None]


def collect(store: Store, *, dry_run: bool = False, min_age_s: float = DEFAULT_MIN_AGE_S,  # noqa: C901 - mark and sweep read as one sequence
            deleted_min_age_s: float | None = None, now_s: float | None = None,
            progress: Progress | None = None) -> GcReport:
    """``deleted_min_age_s`` (default ``min_age_s``): how long a deleted checkpoint's blocks
    stay live, for a save that took it as its base before the delete."""
    now = time.time() if now_s is None else now_s
    tombstone_age = min_age_s if deleted_min_age_s is None else deleted_min_age_s
    live: list[int] = []
    blocks = LiveBlocks()  # the distinct blocks of all of them (10^6 a checkpoint, most shared)

    def mark(step: int, refs: BlockTable | list[Reference]) -> None:
        """As each manifest is read: one checkpoint's references are held at a time."""
        live.append(step)
        blocks.add(refs)

    # one deleted since the listing is left out: its record under deleted/, listed next,
    # keeps its blocks live
    for step in committed_steps(store):
        try:
            mark(step, read_references(store, step))
        except CheckpointNotFoundError:
            continue
        except DckptError as e:
            raise FormatError(
                f"gc stopped: the manifest of step {step} in {store.url} cannot be read ({e}); "
                "what it references cannot be told from garbage. Delete that checkpoint "
                "(dckpt.delete) or restore its manifest, then run gc again") from None
    expired = []
    for name in store.list_names(layout.DELETED_DIR):
        parsed = layout.parse_tombstone_name(name)
        if parsed is None:
            continue
        if now - parsed[1] < tombstone_age:
            try:
                raw = store.read_bytes(f"{layout.DELETED_DIR}/{name}")
                mark(*reference_rows(raw, name=f"{store.url}/{layout.DELETED_DIR}/{name}"))
            except FileNotFoundError:
                continue  # expired for another gc (a shorter deleted_min_age_s) meanwhile
            except (DckptError, IsADirectoryError) as e:
                raise FormatError(
                    f"gc stopped: the record of deleted checkpoint {layout.DELETED_DIR}/{name} "
                    f"in {store.url} cannot be read ({str(e).splitlines()[0]}); a save that "
                    "began before the delete may still use its blocks. It expires "
                    f"{tombstone_age:.0f} s after the delete (deleted_min_age_s); remove it by "
                    "hand if no save can be that old") from None
        else:
            expired.append(f"{layout.DELETED_DIR}/{name}")
    referenced = blocks.bytes_per_object()  # per object, the bytes of its live blocks
    blocks.clear()
    deleted, young, partly = [], [], []
    freed = 0
    attempts = store.list_names(layout.DATA_DIR)
    for i, attempt in enumerate(attempts):
        folder = f"{layout.DATA_DIR}/{attempt}"
        started = layout.attempt_started_s(attempt)
        sizes = store.list_sizes(folder)
        for base, size in sizes.items():
            name = f"{folder}/{base}"
            if name in referenced:
                if referenced[name] < size:
                    partly.append((name, size, size - referenced[name]))
            elif started is None or now - started < min_age_s:
                young.append(name)  # in flight, or not a name dckpt gives: left alone
            else:
                deleted.append(name)
                freed += size
                if not dry_run:
                    store.delete(name)
        if not dry_run and len(sizes) and all(f"{folder}/{b}" in deleted for b in sizes):
            store.remove_folder(folder)
        if progress is not None:
            progress(i + 1, len(attempts))
    aborted = []
    for name, upload_id in store.incomplete_uploads(layout.DATA_DIR):
        started = layout.attempt_started_s(name.split("/")[1]) if name.count("/") >= 2 else None
        if started is None or now - started < min_age_s:
            continue  # in flight (an upload completes when its object is written), or not ours
        aborted.append(name)
        freed += store.upload_bytes(name, upload_id)  # only for these: a request each
        if not dry_run:
            store.abort_upload(name, upload_id)
    if not dry_run:
        for name in expired:  # after the data: a crash in between leaves only more to collect
            store.delete(name)
    log.info("gc of %s%s: %d objects and %d incomplete uploads, %d bytes freed; %d spared as "
             "young; %d bytes wasted in %d partly referenced objects", store.url,
             " (dry run)" if dry_run else "", len(deleted), len(aborted), freed, len(young),
             sum(w for _, _, w in partly), len(partly))
    return GcReport(dry_run, tuple(deleted), freed, tuple(young), tuple(partly),
                    tuple(live), tuple(aborted))
