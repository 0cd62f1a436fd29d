"""The methods ``dckpt bench`` measures, each on the same state and the same storage.

Every method saves durably (local files are fsync'd before a save counts as done; object
store uploads are complete) and restores into the same preallocated tensors:

- ``raw``: the storage's own limit: each rank writes the bytes it holds with
  ``writer_threads`` parallel objects (``O_DIRECT`` where the filesystem takes it, else
  buffered with fsync), and reads them back with ranged reads of 16 MiB, 8 in flight;
  nothing else (no format, no hashing, no commit);
- ``memcpy``: the memory copy limit of an async save's pause: the bytes a rank stages,
  copied once into pre-faulted host memory (pinned host memory from a GPU);
- ``dckpt``: ``dckpt.save``, ``AsyncSaver.async_save`` (staging reserved up front, as the
  CheckpointManager does), ``dckpt.load``;
- ``DCP``: its best configuration: ``dcp.save`` with ``thread_count`` writer threads and
  ``sync_files``; ``dcp.async_save`` with the process-based checkpointer and a
  ``DefaultStager`` (shared memory, asynchronous staging; pinned memory on CUDA; on torch
  2.11, whose stager fails at its second save, one per save, staging in the caller's
  thread); ``dcp.load``;
- ``torch-checkpointing`` (meta-pytorch's, local files only in its 0.1 releases): its
  ``CheckpointManager`` with a sync saver and with its async saver (a writer process and
  asynchronous staging), a finalize callback that fsyncs the files (it never fsyncs by
  itself), ``use_direct_io=False`` (its ``O_DIRECT`` writes fail on ext4, its documented
  workaround), and each rank saving and loading its own shards (its resharding needs CUDA).

An async save's pause ends when the state may change: ``dckpt``'s call returns then; DCP's
when ``staging_completion`` is done; torch-checkpointing's when its ``lock()`` (around the
optimizer step) is free.
"""

from __future__ import annotations

import mmap
import os
import posixpath
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
from typing import Any

import torch
import torch.distributed as dist

import dckpt
from dckpt.bench.workload import Workload
from dckpt.direct import address
from dckpt.storage import Store

__all__ = ["Method", "Raw", "Dckpt", "DCP", "TorchCheckpointing", "memcpy_seconds",
           "make_methods"]

READ_CHUNK = 16 << 20
READS_IN_FLIGHT = 8


class Method:
    """A checkpoint engine (or the storage's limit) on one state and one storage folder."""

    name = ""
    phases: tuple[str, ...] = ("save", "restore", "async")
    keys: list[str] | None = None
    """The keys a restore fills on this rank (None: all of them)."""

    def __init__(self, workload: Workload, url: str, options: dict | None,
                 threads: int) -> None:
        self.w, self.url, self.options, self.threads = workload, url, options, threads
        self.local = Store(url, options).local

    def where(self, step: int) -> str:
        return f"{self.url}/{step}"

    def save(self, step: int) -> None:
        raise NotImplementedError

    def restore(self, step: int) -> None:
        raise NotImplementedError

    def start(self, step: int) -> Callable[[], object]:
        """Begin an async save; returns when the state may change, with the wait for its
        commit."""
        raise NotImplementedError

    def before_save(self) -> None:
        """(untimed) Get ready for a save of the state as it is now."""

    def drop(self, step: int) -> None:
        """(one rank) Remove checkpoint ``step``."""
        store = Store(self.where(step), self.options)
        if store.fs.exists(store.root):
            store.fs.rm(store.root, recursive=True)

    def close(self) -> None:
        pass


class Raw(Method):
    name = "raw"
    phases = ("save", "restore")

    def __init__(self, *args: object, huge_pages: bool = False) -> None:
        """``huge_pages``: the host copy on transparent huge pages (``MADV_HUGEPAGE``), where
        an ``O_DIRECT`` write pins 2 MiB pages instead of 4 KiB ones: the disk's limit
        from the best memory, beside the limit from the 4 KiB pages a state usually has."""
        super().__init__(*args)  # type: ignore[arg-type]
        w = self.w
        keys = [k for k in w.state if k != "step"]
        world = dist.get_world_size()
        self.by_rank = [w.share] if w.layout == "sharded" else [keys[r::world]
                                                                for r in range(world)]
        # each rank reads what it restores: its own shards, or every dense tensor
        self.keys = w.share if w.layout == "sharded" else None
        # the storage's limit: the bytes in page-aligned host memory (O_DIRECT takes them
        # without a copy), refreshed before each save, outside the time
        self.host = {k: _aligned(t.numel() * t.element_size(), huge_pages)
                     for k, t in zip(w.share, w.local(w.state, w.share))}

    def before_save(self) -> None:
        for k, t in zip(self.w.share, self.w.local(self.w.state, self.w.share)):
            src = t.detach().contiguous().view(-1).view(torch.uint8)
            dst = torch.frombuffer(self.host[k], dtype=torch.uint8)
            dst.copy_(src)

    def _objects(self, rank: int) -> list[tuple[str, list[str]]]:
        share = self.by_rank[0 if self.w.layout == "sharded" else rank]
        return [(f"rank{rank}-{t}", share[t::self.threads]) for t in range(self.threads)
                if share[t::self.threads]]

    def save(self, step: int) -> None:
        store = Store(self.where(step), self.options)

        def write(name: str, keys: list[str]) -> None:
            with store.open_write(name, direct=True) as f:
                for k in keys:
                    f.write(self.host[k])

        _all(self.threads, [partial(write, n, k) for n, k in self._objects(dist.get_rank())])

    def restore(self, step: int) -> None:
        store = Store(self.where(step), self.options)
        ranks = [dist.get_rank()] if self.w.layout == "sharded" else range(dist.get_world_size())
        jobs, copies = [], []
        for rank in ranks:
            for name, keys in self._objects(rank):
                offset = 0
                for k in keys:
                    out = self.w.local(self.w.target, [k])[0]
                    buf = out if out.device.type == "cpu" else torch.empty_like(out, device="cpu")
                    mv = memoryview(buf.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
                    for s in range(0, len(mv), READ_CHUNK):
                        jobs.append(partial(_read_exactly, store, name, offset + s,
                                            mv[s:s + READ_CHUNK]))
                    offset += len(mv)
                    if buf is not out:
                        copies.append((out, buf))
        _all(READS_IN_FLIGHT, jobs)
        for out, buf in copies:
            out.copy_(buf)
        store.close_files()


class Dckpt(Method):
    name = "dckpt"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.config = dckpt.SaveConfig(writer_threads=self.threads)
        self.saver: dckpt.AsyncSaver | None = None
        self.reserve_s = 0.0

    def save(self, step: int) -> None:
        dckpt.save(self.w.state, self.url, step=step, storage_options=self.options,
                   config=self.config)

    def restore(self, step: int) -> None:
        dckpt.load(self.w.target, self.url, step=step, storage_options=self.options)

    def drop(self, step: int) -> None:
        dckpt.delete(self.url, step=step, storage_options=self.options)
        dckpt.gc(self.url, min_age_s=0, storage_options=self.options)

    def start(self, step: int) -> Callable[[], object]:
        if self.saver is None:
            self.saver = dckpt.AsyncSaver()
            self.reserve_s = self.saver.reserve(self.w.state, self.config)
        handle = self.saver.async_save(self.w.state, self.url, step=step,
                                       storage_options=self.options, config=self.config)
        return handle.wait

    def close(self) -> None:
        if self.saver is not None:
            self.saver.close()


class DCP(Method):
    name = "DCP"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = self.w.on_gpu
        reusable = reusable_default_stager()
        # torch 2.11 (not reusable): staging in a thread of a new stager crashed the process
        # at its second save of DTensors (SIGSEGV in their sharding propagation); staged in
        # the caller's thread, the pause is the same: it ends when the copies are done
        self.staging = StagingOptions(
            use_pinned_memory=cuda, use_shared_memory=True, use_async_staging=reusable,
            use_non_blocking_copy=cuda)
        # None where each save needs a stager of its own
        self.stager = DefaultStager(self.staging) if reusable else None

    def _writer(self, step: int) -> Any:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        if self.local:
            return dcp.FileSystemWriter(_path(self.where(step)), sync_files=True,
                                        thread_count=self.threads)
        return FsspecWriter(self.where(step), sync_files=True, thread_count=self.threads,
                            **(self.options or {}))

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self.w.state, storage_writer=self._writer(step))

    def restore(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        reader = (dcp.FileSystemReader(_path(self.where(step))) if self.local
                  else FsspecReader(self.where(step), **(self.options or {})))
        dcp.load(self.w.target, storage_reader=reader)

    def start(self, step: int) -> Callable[[], object]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.staging import DefaultStager
        from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

        stager = self.stager or DefaultStager(self.staging)
        out: Any = dcp.async_save(self.w.state, storage_writer=self._writer(step),
                             async_checkpointer_type=AsyncCheckpointerType.PROCESS,
                             async_stager=stager)
        staged = getattr(out, "staging_completion", None)
        if staged is not None:
            staged.result()
        if stager is not self.stager:
            stager.close()  # staged: a stager of one save has nothing left to do
        upload = getattr(out, "upload_completion", out)
        return lambda: upload.result()

    def close(self) -> None:
        if self.stager is not None:
            self.stager.close()


class TorchCheckpointing(Method):
    name = "torch-checkpointing"

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        if not self.local:
            raise Unavailable("it writes local files only (no fsspec or S3 in its 0.1 releases)")
        if self.w.layout != "sharded":
            raise Unavailable("a dense state is the same on every rank, and each rank "
                              "writes its own files: run it with --layout sharded")
        try:
            import torch_checkpointing as tc
        except ImportError as e:
            raise Unavailable("not installed (pip install torch-checkpointing)") from e
        from torch_checkpointing.config import AsyncCheckpointSaverConfig, SyncCheckpointSaverConfig
        from torch_checkpointing.staging import CheckpointStagerConfig
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

        self.keys = self.w.share
        cuda = self.w.on_gpu
        staging = CheckpointStagerConfig(use_pinned_memory=cuda, use_shared_memory=True,
                                         use_async_staging=True, use_non_blocking_copy=cuda)
        storage = LocalFileSystemStorageConfig(use_direct_io=False)
        self.sync = tc.CheckpointManager(tc.CheckpointManager.Config(
            save=SyncCheckpointSaverConfig(), storage_config=storage,
            finalize_callback=fsync_files))
        self.asynchronous = tc.CheckpointManager(tc.CheckpointManager.Config(
            save=AsyncCheckpointSaverConfig(staging_config=staging), storage_config=storage,
            finalize_callback=fsync_files))
        self.warm = False

    def _payload(self, tensors: dict) -> dict:
        return {"model": {"step": tensors["step"],
                          **dict(zip(self.w.share, self.w.local(tensors, self.w.share)))}}

    def save(self, step: int) -> None:
        self.sync.save(_path(self.where(step)), self._payload(self.w.state))

    def restore(self, step: int) -> None:
        out = self.sync.load(_path(self.where(step)), into=self._payload(self.w.target))
        self.w.target["step"] = out["model"]["step"]

    def start(self, step: int) -> Callable[[], object]:
        manager = self.asynchronous
        if not self.warm:  # its staging buffers, allocated before the first save
            manager.prewarm_staging(self._payload(self.w.state))
            self.warm = True
        future = manager.save(_path(self.where(step)), self._payload(self.w.state))
        with manager.lock():  # where the optimizer step waits for the capture
            pass
        return lambda: future.result() if future is not None else None

    def close(self) -> None:
        self.sync.close()
        self.asynchronous.close()


class Unavailable(Exception):
    """A method that cannot run here; its message says why."""


def make_methods(names: list[str], workload: Workload, base_url: str, options: dict | None,
                 threads: int) -> tuple[dict[str, Method], dict[str, str]]:
    """The methods of ``names`` (except memcpy) that run here, and why the others cannot."""
    kinds = {"raw": Raw, "dckpt": Dckpt, "DCP": DCP, "torch-checkpointing": TorchCheckpointing}
    made: dict[str, Method] = {}
    missing: dict[str, str] = {}
    for name in names:
        if name in kinds:
            folder = name.lower().replace("-", "_")
            try:
                made[name] = kinds[name](workload, f"{base_url}/{folder}", options, threads)
            except Unavailable as e:
                missing[name] = str(e)
    return made, missing


@cache
def reusable_default_stager() -> bool:
    """Whether one DCP ``DefaultStager`` stages more than one save on this torch. torch
    2.11's closes its copier after each stage (its cache and its dispatch table cleared), so
    that its second stage raises ``KeyError: <class 'type'>``; torch 2.13's keeps both.
    Where it cannot, DCP's async peer takes a stager per save, which on 2.11 is what one
    stager did anyway: it kept nothing from one save to the next."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    stager = DefaultStager(StagingOptions(use_pinned_memory=False, use_shared_memory=False,
                                          use_async_staging=False, use_non_blocking_copy=False))
    try:
        for _ in range(2):
            stager.stage({"x": torch.zeros(1)})
        return True
    except Exception:  # any failure of the second stage: a stager per save
        return False
    finally:
        stager.close()


def memcpy_seconds(workload: Workload, repeats: int = 5) -> float:
    """The median time to copy the rank's share of the state once into pre-faulted host
    memory (pinned when the state is on a GPU)."""
    src = workload.local(workload.state, workload.share)
    cuda = any(t.is_cuda for t in src)
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda) for t in src]
    for d in dst:
        d.zero_()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fsync_files(args: object) -> None:
    """torch-checkpointing's finalize callback: make the checkpoint's files durable."""
    root = str(args.path)  # type: ignore[attr-defined]
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _all(threads: int, jobs: Sequence[Callable[[], object]]) -> None:
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()


def _read_exactly(store: Store, name: str, offset: int, out: memoryview) -> None:
    if store.read_into(name, offset, out) != len(out):
        raise OSError(f"{store.path(name)}: short read at {offset}")


def _aligned(nbytes: int, huge_pages: bool = False) -> memoryview:
    """Page-aligned, pre-faulted host memory of ``nbytes``; ``huge_pages``: advised onto
    transparent huge pages before its first touch (where the kernel has them to give)."""
    if not huge_pages:
        buf = mmap.mmap(-1, max(1, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | getattr(mmap, "MAP_POPULATE", 0))
        return memoryview(buf)[:nbytes]
    huge = 2 << 20  # a 2 MiB-aligned start, so that every whole 2 MiB of it can be one page
    buf = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -address(memoryview(buf)) % huge
    if hasattr(mmap, "MADV_HUGEPAGE"):
        buf.madvise(mmap.MADV_HUGEPAGE)
    view = memoryview(buf)[start: start + nbytes]
    if nbytes:
        torch.frombuffer(view, dtype=torch.uint8).zero_()  # the first touch
    return view


def _path(url: str) -> str:
    """A local URL's path (file:// stripped)."""
    return url[len("file://"):] if url.startswith("file://") else posixpath.normpath(url)
