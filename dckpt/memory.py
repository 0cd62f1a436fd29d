"""The memory tier: a node-local dckpt repository in shared memory (``/dev/shm``).

It holds checkpoints in the storage tier's format (blocks, checksums, the two-phase commit
of a manifest), so it outlives the worker processes: a torchrun restart on the same node
restores from it in the time of a memory copy. Its saves are self-contained (no dedup
against an earlier one), so that it never holds more than the newest committed checkpoint
and the one being written (``prune``). Its folder is private to the user (mode 0700), named
after the storage URL, so that a restart finds it and another job does not.

Where: ``memory_dir`` if given, else the ``DCKPT_MEMORY_DIR`` environment variable (the
launcher's choice, as the interface in DESIGN.md fixes it), else ``/dev/shm``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil

from dckpt import layout
from dckpt.errors import ArgumentError, StorageError
from dckpt.repository import committed_steps, read_manifest
from dckpt.storage import Store

__all__ = ["MemoryTier", "memory_folder", "DEFAULT_MEMORY_DIR", "room_problem", "held"]

log = logging.getLogger(__name__)

DEFAULT_MEMORY_DIR = "/dev/shm"


def memory_folder(url: str, memory_dir: str | None = None) -> str:
    """The memory tier's folder for the repository at ``url``: one per user and URL."""
    root = memory_dir or os.environ.get("DCKPT_MEMORY_DIR") or DEFAULT_MEMORY_DIR
    key = url if "://" in url and not url.startswith("file://") else os.path.abspath(
        url.removeprefix("file://"))
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return os.path.join(root, f"dckpt-{os.getuid()}-{digest}")


def room_problem(folder: str, free_bytes: int, held_bytes: int, need_bytes: int) -> str | None:
    """Why the memory tier cannot hold ``need_bytes`` (the newest checkpoint and the one
    being written, for this node's ranks) where ``free_bytes`` are free and it already holds
    ``held_bytes`` (a crashed run's, which the next save replaces); None when it can."""
    if free_bytes + held_bytes >= need_bytes:
        return None
    return (f"the memory tier at {folder} needs {need_bytes} bytes (two checkpoints of this "
            f"node's ranks) and has {free_bytes + held_bytes}; give it more room (a larger "
            "/dev/shm), another folder (memory_dir= or DCKPT_MEMORY_DIR), or turn it off "
            "(memory_every_steps=None)")


def held(url: str, memory_dir: str | None = None) -> tuple[str, int, int | None] | None:
    """(folder, bytes held, newest committed step) of this node's memory tier of ``url``, or
    None where there is none; creates nothing."""
    folder = memory_folder(url, memory_dir)
    if not os.path.isdir(folder):
        return None
    steps = committed_steps(Store(folder))
    return folder, _bytes_under(folder), steps[-1] if steps else None


def _bytes_under(folder: str) -> int:
    total = 0
    for d, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass  # removed meanwhile
    return total


class MemoryTier:
    """The memory tier of one repository on this node. ``prune`` and ``remove`` are for one
    process per node (the node's local rank 0)."""

    def __init__(self, url: str, memory_dir: str | None = None) -> None:
        self.folder = memory_folder(url, memory_dir)
        parent = os.path.dirname(self.folder)
        if not os.path.isdir(parent):
            raise ArgumentError(f"memory_dir {parent} is not a folder")
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            os.chmod(self.folder, 0o700)
        except OSError as e:
            raise StorageError(f"cannot make the memory tier's folder {self.folder}: {e}") \
                from e
        self.store = Store(self.folder)

    @property
    def url(self) -> str:
        return self.folder

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.folder).free

    def held_bytes(self) -> int:
        """Bytes its files hold now."""
        return _bytes_under(self.folder)

    def newest(self) -> int | None:
        """The newest committed step in memory, or None."""
        steps = committed_steps(self.store)
        return steps[-1] if steps else None

    def prune(self) -> None:
        """Keep only the newest committed checkpoint: older manifests and every data folder
        it does not use go (a crashed attempt's included). Call it with no save in flight."""
        steps = committed_steps(self.store)
        if not steps:
            keep: set[str] = set()
        else:
            try:
                m = read_manifest(self.store, steps[-1])
                keep = {b.segment.rpartition("/")[0] for _, _, b in m.blocks()}
            except Exception as e:  # damaged: nothing in memory is worth keeping
                log.warning("memory tier %s: step %d unreadable (%s); clearing it",
                            self.folder, steps[-1], e)
                steps, keep = [*steps, -1], set()
        for s in steps[:-1]:
            self.store.delete(layout.manifest_name(s))
        for name in self.store.list_names(layout.DATA_DIR):
            if f"{layout.DATA_DIR}/{name}" not in keep:
                shutil.rmtree(os.path.join(self.folder, layout.DATA_DIR, name),
                              ignore_errors=True)

    def remove(self) -> None:
        """Remove the folder and all it holds (a job's clean end)."""
        shutil.rmtree(self.folder, ignore_errors=True)
