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

import contextlib
import io
import logging
import mmap
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan

from dckpt import dist, layout
from dckpt.blocks import check
from dckpt.errors import ArgumentError, IntegrityError, StorageError
from dckpt.files import open_file
from dckpt.manifest import StoredData, TensorEntry, ValueEntry
from dckpt.repository import committed_steps, read_manifest
from dckpt.shm import DEFAULT_MEMORY_DIR, bytes_under, held, lock, memory_folder, unlock
from dckpt.storage import Store
from dckpt.values import RawBytes

__all__ = ["MemoryTier", "memory_folder", "DEFAULT_MEMORY_DIR", "room_problem", "held",
           "mapped_segments", "bytes_tensor", "Incoming", "reserve", "recycled_write", "take_spare"]

log = logging.getLogger(__name__)

SPARE_DIR = "spare"
"""In the tier's folder: files of pruned checkpoints, whose memory the next writes reuse."""


def room_problem(folder: str, free_bytes: int, held_bytes: int, need_bytes: int) -> str | None:
    """Why the memory tier cannot hold ``need_bytes`` (its checkpoints at once, for this
    node's ranks) where ``free_bytes`` are free and it already holds
    ``held_bytes`` (a crashed run's, which the next save replaces); None when it can."""
    if free_bytes + held_bytes >= need_bytes:
        return None
    return (f"the memory tier at {folder} needs {need_bytes} bytes (the checkpoints of this "
            f"node's ranks it holds at once) and has {free_bytes + held_bytes}; give it more room (a larger "
            "/dev/shm), another folder (memory_dir= or DCKPT_MEMORY_DIR), or turn it off "
            "(memory_every_steps=None)")


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


class MemoryTier:
    """The memory tier of one repository on this node. ``prune`` and ``remove`` are for one
    process per node (the node's local rank 0)."""

    def __init__(self, url: str, memory_dir: str | None = None) -> None:
        self.folder = memory_folder(url, memory_dir)
        parent = os.path.dirname(self.folder)
        if not os.path.isdir(parent):
            what = "is a file, not a folder" if os.path.exists(parent) else "does not exist"
            raise ArgumentError(f"the memory tier's folder {parent} (memory_dir, or "
                                f"DCKPT_MEMORY_DIR) {what}; create it or name another")
        try:
            found = _lstat(self.folder)
            if found is not None and not stat.S_ISDIR(found.st_mode):
                if stat.S_ISLNK(found.st_mode):  # IMPORTANT: never followed: in a shared
                    # folder such as /dev/shm another user may have placed it, to have the
                    # tier's checkpoints written, chmodded and pruned where it points
                    raise StorageError(f"the memory tier's folder {self.folder} is a symbolic "
                                       "link; dckpt does not follow it: remove it, or name "
                                       "another folder (memory_dir= or DCKPT_MEMORY_DIR)")
                log.warning("memory tier: %s is not a folder; replacing it", self.folder)
                os.unlink(self.folder)  # a name of dckpt's own: no one else's file
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            found = os.lstat(self.folder)
            if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid():
                raise StorageError(f"the memory tier's folder {self.folder} belongs to user "
                                   f"{found.st_uid}, not to this one ({os.getuid()}); "
                                   "remove it, or name another folder (memory_dir= or "
                                   "DCKPT_MEMORY_DIR)")
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
        return bytes_under(self.folder)

    def newest(self) -> int | None:
        """The newest committed step in memory, or None."""
        steps = committed_steps(self.store)
        return steps[-1] if steps else None

    def prune(self, also: frozenset[int] = frozenset(), *, writing: bool = False) -> None:
        """Keep only the newest committed checkpoint, and those of ``also`` (being copied to
        storage): older manifests and every data folder they do not use go (a crashed
        attempt's included). With ``writing`` (a save in flight) the attempts started after
        the newest committed one's are spared: the one being written is among them, and at
        most it and a crashed one are (attempt names carry the coordinator's start time)."""
        steps = committed_steps(self.store)
        kept = [s for s in steps if s in also or s == steps[-1]]
        folders: set[str] = set()
        spare_after: float | None = None if steps else float("-inf")
        for step in kept:
            try:
                m = read_manifest(self.store, step)
                folders |= {s.rpartition("/")[0] for s in m.extents()}
                if step == steps[-1]:
                    spare_after = layout.attempt_started_s(m.attempt)
            except Exception as e:  # damaged: not worth keeping
                log.warning("memory tier %s: step %d unreadable (%s); dropping it",
                            self.folder, step, str(e))
                self.store.delete(layout.manifest_name(step))
        for s in steps:
            if s not in kept:
                self.store.delete(layout.manifest_name(s))
        for name in self.store.list_names(layout.DATA_DIR):
            started = layout.attempt_started_s(name)
            young = (writing and started is not None
                     and (spare_after is None or started > spare_after))
            if f"{layout.DATA_DIR}/{name}" not in folders and not young:
                self._recycle(os.path.join(self.folder, layout.DATA_DIR, name), folders)

    def _recycle(self, attempt: str, kept: set[str]) -> None:
        """Remove an attempt's folder, keeping its segment files as spares for the next
        writes (up to the bytes of the checkpoints kept): writing over memory the tier
        already holds skips the allocation and zeroing of new pages, which on a busy node
        is slower than the copy itself (docs/benchmarks.md, Memory tier)."""
        spare = os.path.join(self.folder, SPARE_DIR)
        if os.path.lexists(spare) and not os.path.isdir(spare):
            os.unlink(spare)  # not the tier's: a folder of its own belongs there
        os.makedirs(spare, mode=0o700, exist_ok=True)
        budget = sum(bytes_under(os.path.join(self.folder, f)) for f in kept)
        budget -= bytes_under(spare)
        for name in sorted(os.listdir(attempt)) if os.path.isdir(attempt) else []:
            path = os.path.join(attempt, name)
            size = os.path.getsize(path) if os.path.isfile(path) else budget + 1  # not a file
            if name.endswith((".seg", ".part")) and size <= budget:
                os.replace(path, os.path.join(spare, f"{os.path.basename(attempt)}-{name}"))
                budget -= size
        shutil.rmtree(attempt, ignore_errors=True)

    def staged(self, step: int, plan: SavePlan) -> tuple[dict[MetadataIndex, object],
                                                        Callable[[], None]]:
        """This rank's items of memory checkpoint ``step``, by ``plan`` (the local plan it
        was saved by), as a save planner hands them to the Writer: tensors over the memory
        files themselves (mapped, no copy) and values as their stored bytes. Every block is
        checked against its digest first. Returns them and a function that unmaps."""
        m = read_manifest(self.store, step)
        maps = contextlib.ExitStack()
        mapped = maps.enter_context(mapped_segments(self.folder))

        def raw(data: StoredData, what: str) -> tuple[mmap.mmap | None, int]:
            """Where the item's bytes lie, contiguous (memory saves write them so)."""
            if not data.blocks:
                return None, 0
            first, at = data.blocks[0], data.blocks[0].offset
            mm = mapped(first.segment)
            if mm is None:
                raise IntegrityError(f"{what}: {first.segment} is empty; the object is "
                                     "truncated or damaged")
            for b in data.blocks:
                if b.segment != first.segment or b.offset != at or b.codec != "raw":
                    raise IntegrityError(f"{what}: not stored contiguous and raw")
                check(memoryview(mm)[b.offset: b.offset + b.length], b, what=what)
                at += b.length
            return mm, first.offset

        def elsewhere(data: StoredData) -> bool:
            """Replicated state another rank wrote on another node: that rank copies it
            (the save's plan is the same, so is the choice of the rank that writes it)."""
            return bool(data.blocks) and not os.path.exists(
                os.path.join(self.folder, data.blocks[0].segment))

        staged: dict[MetadataIndex, object] = {}

        def close() -> None:
            staged.clear()
            maps.close()  # a tensor still mapping a file frees it with the tensor

        try:
            for item in plan.items:
                entry = m.items[item.index.fqn]
                what = f"memory checkpoint of step {step}, item {item.index.fqn!r}"
                if isinstance(entry, ValueEntry):
                    if elsewhere(entry.data):
                        continue
                    mm, at = raw(entry.data, what)
                    body = bytes(mm[at: at + entry.data.nbytes]) if mm is not None else b""
                    staged[item.index] = (RawBytes(body) if entry.encoding == "bytes"
                                          else io.BytesIO(body))
                    continue
                assert item.tensor_data is not None and isinstance(entry, TensorEntry)
                offsets = tuple(item.index.offset or ())
                data = next(c.data for c in entry.chunks if c.offsets == offsets)
                if elsewhere(data):
                    continue
                dtype, sizes = item.tensor_data.properties.dtype, item.tensor_data.chunk.sizes
                mm, at = raw(data, what)
                flat = (torch.frombuffer(mm, dtype=torch.uint8, count=data.nbytes, offset=at)
                        if mm is not None and data.nbytes else torch.empty(0, dtype=torch.uint8))
                staged[item.index] = flat.view(dtype).reshape(sizes)
        except BaseException:
            close()
            raise
        return staged, close

    def lock(self) -> None:
        """(the node's leader) Hold the folder for this job (``shm.lock``)."""
        self._lock_fd: int | None = lock(self.folder)

    def unlock(self, *, forget: bool = False) -> None:
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            unlock(self.folder, fd, forget=forget)

    def remove(self) -> None:
        """Remove the folder and all it holds (a job's clean end)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.unlock()

    def reset(self) -> None:
        """Empty the folder (what it held cannot be read: a file where one of its folders
        belongs, a symlink loop); the next saves start afresh."""
        self.remove()
        os.makedirs(self.folder, mode=0o700, exist_ok=True)


@contextmanager
def mapped_segments(root: str) -> Iterator[Any]:
    """A function from a segment name to its file mapped (None where absent or empty)."""
    maps: dict[str, mmap.mmap | None] = {}

    def mapped(segment: str) -> mmap.mmap | None:
        if segment not in maps:
            try:
                path = os.path.join(root, layout.check_object_name(segment))
                with open(open_file(path), "rb") as f:
                    maps[segment] = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                                     if os.fstat(f.fileno()).st_size else None)
            except FileNotFoundError:
                maps[segment] = None
        return maps[segment]

    try:
        yield mapped
    finally:
        for mm in maps.values():
            if mm is not None:
                try:
                    mm.close()
                except BufferError:  # a tensor still maps it: freed with the tensor
                    pass


def bytes_tensor(mm: mmap.mmap | None, size: int) -> torch.Tensor:
    if mm is None or size == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mm, dtype=torch.uint8, count=size)


class Incoming:
    """Files of these (name, size) under ``root``, mapped for writing (``tensors``); each
    is renamed to its name only at ``commit``, once everything arrived (a crash leaves
    ``.part`` files, never a segment that looks whole; ``close`` without a commit removes
    them). Their memory is reserved before they are mapped: a folder without room is an
    OSError here, never a SIGBUS at a write into the mapping."""

    def __init__(self, root: str, names: list[tuple[str, int]]) -> None:
        self._maps: list[tuple[str, mmap.mmap | None]] = []
        self._parts: list[str] = []
        self._done = False
        self.tensors: list[torch.Tensor] = []
        try:
            for name, size in names:
                path = os.path.join(root, layout.check_object_name(name))
                os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
                self._parts.append(path + ".part")
                if not take_spare(root, path + ".part", size):
                    open(path + ".part", "wb").close()
                with open(path + ".part", "r+b") as f:
                    f.truncate(size)
                    if size:  # IMPORTANT: a full tmpfs fails here (ENOSPC), not at a write
                        os.posix_fallocate(f.fileno(), 0, size)  # to the mapping (SIGBUS)
                    mm = mmap.mmap(f.fileno(), size) if size else None
                self._maps.append((path, mm))
                self.tensors.append(bytes_tensor(mm, size))
        except BaseException:
            self.close()
            raise

    def commit(self) -> None:
        self.tensors.clear()
        for path, mm in self._maps:
            if mm is not None:
                mm.flush()
            os.replace(path + ".part", path)
        self._done = True

    def close(self) -> None:
        self.tensors.clear()
        for _, mm in self._maps:
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
        for part in self._parts if not self._done else ():
            with contextlib.suppress(OSError):
                os.unlink(part)


def reserve(root: str, names: list[tuple[str, int]], group: Any, what: str,
            check: Callable[[], None] = lambda: None) -> Incoming | None:
    """(all ranks) This rank's ``Incoming`` files ``names`` under ``root``, after ``check``
    (what else must hold here before any send). Every rank learns whether all succeeded
    before any send, so that none waits on a peer that left: StorageError on a rank that
    failed, None on the others (the caller then sends nothing)."""
    into: Incoming | None = None
    problem: Exception | None = None
    try:
        check()
        into = Incoming(root, names)
    except (OSError, ValueError) as e:
        problem = e
    if dist.any_true(problem is not None, group):
        if into is not None:
            into.close()
        if problem is not None:
            raise StorageError(f"rank {dist.rank()} {what}: {problem}") from problem
        return None
    return into


def take_spare(folder: str, path: str, nbytes: int) -> bool:
    """Move a spare file of the tier at ``folder`` to ``path``: the smallest of at least
    ``nbytes``, else the largest; False where there is none."""
    spare = os.path.join(folder, SPARE_DIR)
    try:
        names = os.listdir(spare)
    except (FileNotFoundError, NotADirectoryError):
        return False
    sized = []
    for name in names:
        try:
            st = os.stat(os.path.join(spare, name), follow_symlinks=False)
        except OSError:
            continue  # taken meanwhile
        if stat.S_ISREG(st.st_mode):  # a spare is a file the tier wrote, nothing else
            sized.append((st.st_size, name))
    fitting = sorted(x for x in sized if x[0] >= nbytes) or sorted(sized, reverse=True)
    for _, name in fitting:
        try:
            os.replace(os.path.join(spare, name), path)
            return True
        except FileNotFoundError:  # another writer took it first
            continue
    return False


@contextmanager
def recycled_write(folder: str, path: str, nbytes: int) -> Iterator[Any]:
    """A new file at ``path`` (of about ``nbytes``) in the tier at ``folder``, written over a
    spare file's memory where there is one; removed when the block raises."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    if not take_spare(folder, path, nbytes):
        open(path, "wb").close()
    try:
        with open(path, "r+b") as f:
            yield f
            f.truncate(f.tell())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
