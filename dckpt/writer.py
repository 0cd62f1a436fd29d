"""DCP StorageWriter: each rank writes its blocks into segments, the coordinator commits.

Call order (DCP's ``save`` drives it)::

    (all ranks)   set_up_storage_writer -> prepare_local_plan   checks the state, no I/O
    (coordinator) prepare_global_plan    refuses a committed step, names the attempt
    (all ranks)   write_data             blocks -> segments, durable before it returns;
                                         this rank's blocks kept as the next index
    (coordinator) finish                 only when every rank succeeded: the manifest,
                                         and the checkpoint becomes the next save's base

Nothing is called after the commit: ``dcp.save(storage_writer=dckpt.Writer(...))``
deduplicates its next save as ``dckpt.save`` does (dckpt.dedup).

DCP gathers every rank's write result (or exception) to the coordinator before ``finish``
and broadcasts the outcome, which is the two-phase commit: no manifest unless all ranks
reported their data durable, and then the same outcome everywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dckpt import dedup, discard, dist, layout
from dckpt.arguments import check_checkpoint_id, check_config, check_step
from dckpt.commit import Stored, check_references, entries, planner_data, sums
from dckpt.config import SaveConfig
from dckpt.dedup import BlockIndex, History, block_size_for, item_key
from dckpt.direct import DIRECT_ALIGN, WINDOWS, pages_cap_requests, tensors_on_huge_pages
from dckpt.dtypes import dtype_name
from dckpt.errors import ArgumentError, CheckpointExistsError
from dckpt.gcpause import paused_gc
from dckpt.info import CheckpointInfo, info_from_manifest
from dckpt.manifest import Manifest, StoredData, encode
from dckpt.planner import SafeSavePlanner
from dckpt.repository import committed_steps, mark_repository
from dckpt.segments import SegmentOut, balance, byte_planes, item_nbytes, segments_for, tensor_bytes
from dckpt.state_checks import refuse
from dckpt.step_metrics import Metrics, check_metrics
from dckpt.storage import Store
from dckpt.values import RawBytes, check_loadable
from dckpt.watchdog import Heartbeat, reported, wait_all

__all__ = ["Writer", "write_window_bytes"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Assignment:
    """What the coordinator hands each rank in its plan's storage_data."""

    attempt: str
    rank: int
    base: tuple[int, str] | None = None  # the (step, attempt) to dedup against


RANK_PHASES = ("rank_plan", "rank_index", "rank_write", "rank_copy", "rank_hash", "rank_lookup",
               "rank_compress", "rank_io", "rank_close", "rank_sync_folder")


class Writer(StorageWriter):
    """Writes one step into the dckpt repository at ``url`` (see the module docstring)."""

    shared_storage = True
    """Every rank writes where the coordinator reads (the memory tier's nodes do not)."""

    def __init__(self, url: str, *, step: int, metrics: Metrics | None = None,
                 storage_options: dict | None = None, config: SaveConfig | None = None) -> None:
        super().__init__()
        step = check_step(step)
        self._storage_options = storage_options  # the Store keeps its fsspec instance only
        self.store = Store(url, storage_options)
        self.step = step
        self.metrics = check_metrics(metrics)
        self.config = check_config(config, SaveConfig) or SaveConfig()
        self.store.stall_s = self.config.io_stall_timeout_s
        self.is_coordinator = False
        self.info: CheckpointInfo | None = None
        self._attempt = ""
        self._t: dict[str, float] = {}
        self._index: BlockIndex | None = None
        self._history: History = {}  # this save's items: block size, fraction written
        self.rank_s: dict[str, float] = {}
        self.rewritten = 0
        """Items this rank wrote whole for their fragmentation (``min_read_run_bytes``)."""
        self.written_at: float | None = None
        """(all ranks) When this rank's writes were done (``time.perf_counter``)."""
        self._heartbeat = Heartbeat()
        """Progress of this rank's writes, for the bounded wait on the writer threads."""
        self._outs: list[SegmentOut] = []
        """This save's segments being written (what a long save's progress counts)."""
        self.from_staging = False
        """The bytes come from dckpt's staging memory (async saves), made once and reused,
        which the disk takes as fast as any: written from there, without the copy through a
        window that the state's own memory gets (``SaveConfig.write_window_bytes``)."""
        self._lock = threading.Lock()
        """This rank's part of the save, in seconds: ``rank_plan`` (DCP's planning, its
        collectives included), ``rank_write`` (wall time of this rank's writes) and, summed
        over the writer threads (thread-seconds), ``rank_index`` (loading the dedup index),
        ``rank_copy`` (device to host), ``rank_hash``, ``rank_lookup`` (dedup),
        ``rank_compress``, ``rank_io`` (the writes), ``rank_close`` (the segments' fsync);
        ``rank_sync_folder``. ``run_save`` adds ``rank_wait``: from the end of this rank's
        writes to the commit's news (the slowest rank, the commit, the collectives)."""
        self.committed_raw = b""
        """(coordinator, after the commit) The manifest as stored."""
        self.created: list[str] = []
        """The objects this rank created for this save (``discard`` removes them if it fails)."""
        self._manifest_sent = False

    def __reduce__(self) -> tuple[object, ...]:
        """A Writer goes to another process (DCP's checkpoint process:
        ``dcp.async_save(..., async_checkpointer_type=AsyncCheckpointerType.PROCESS)``) as
        its arguments, and is made anew there: its locks and open files stay here."""
        return functools.partial(type(self), self.store.url, step=self.step,
                                 metrics=self.metrics, storage_options=self._storage_options,
                                 config=self.config), ()

    # -- DCP protocol ----------------------------------------------------------------

    def reset(self, checkpoint_id: object = None) -> None:
        check_checkpoint_id(checkpoint_id, self.store.url, "Writer")
        self.info = None
        self._t = {}
        self._history = {}
        self.rank_s = {}
        self.rewritten = 0
        self.written_at = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: object) -> bool:
        return False  # chosen explicitly, never by DCP's guessing

    def set_up_storage_writer(self, is_coordinator: bool, *args: object, **kwargs: object) -> None:
        self.is_coordinator = is_coordinator
        self._t["start"] = time.perf_counter()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """(all ranks) Check every item can be stored, and list all problems at once."""
        problems = []
        for item in plan.items:
            if item.tensor_data is None:
                continue
            props = item.tensor_data.properties
            try:
                dtype_name(props.dtype)
            except Exception as e:
                problems.append(f"{item.index.fqn}: {e}")
            if props.layout != torch.strided:
                problems.append(f"{item.index.fqn}: layout {props.layout} is not supported; "
                                "convert to a dense (strided) tensor before saving")
        refuse(problems)
        return dataclasses.replace(plan, storage_data=self.step)  # checked by the coordinator

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """(coordinator) Refuse ranks that asked for different steps, and a committed step;
        give every rank the attempt's name and the step whose blocks it need not write
        again."""
        steps = [p.storage_data for p in plans]
        if len(set(steps)) > 1:
            raise ArgumentError(f"the ranks asked to save different steps "
                                f"({dist.by_value(steps)}); "
                                "every rank must pass the same step (to a "
                                "CheckpointManager's maybe_save: the same step, and "
                                "epoch_end, at every call)")
        committed = committed_steps(self.store)
        if self.step in committed:
            raise CheckpointExistsError(
                f"step {self.step} is already committed in {self.store.url}; a committed "
                "checkpoint is never overwritten. Save under another step, or delete it first")
        mark_repository(self.store)
        self._attempt = layout.new_attempt(self.step)
        base = dedup.usable_base(self.store, committed) if self.config.dedup else None
        return [dataclasses.replace(p, storage_data=_Assignment(self._attempt, i, base))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """(all ranks) Write this rank's items; every segment is durable when this returns."""
        self._t["write"] = time.perf_counter()
        assignment: _Assignment = plan.storage_data
        # items an async save already wrote during its pause (over its staging budget)
        prewritten = planner.prewritten if isinstance(planner, SafeSavePlanner) else {}
        results = [WriteResult(index=i.index, size_in_bytes=prewritten[i.index].nbytes,
                               storage_data=Stored(prewritten[i.index], *sums(
                                   prewritten[i.index].blocks)))
                   for i in plan.items if i.index in prewritten]
        items = [i for i in plan.items if i.index not in prewritten]
        # DCP's own planner (dcp.save with a Writer) pickles values unchecked: checked here,
        # before any byte is written, as SafeSavePlanner checks them (a value no load reads
        # was committed)
        resolved = {} if isinstance(planner, SafeSavePlanner) else _checked_values(items, planner)
        self.rank_s = dict.fromkeys(RANK_PHASES, 0.0)
        self._heartbeat = Heartbeat()
        self._outs = []
        self.rank_s["rank_plan"] = self._t["write"] - self._t.get("start", self._t["write"])
        self._index = (dedup.index_for(self.store, assignment.base,
                                       {item_key(i.index.fqn, i.index.offset) for i in items})
                       if self.config.dedup else None)
        self.rank_s["rank_index"] = time.perf_counter() - self._t["write"]
        sizes = [item_nbytes(i) for i in items]
        bins = [[items[k] for k in b] for b in balance(
            sizes, segments_for(sum(sizes), self.config.writer_threads))]
        if bins:
            pool = ThreadPoolExecutor(len(bins), thread_name_prefix="dckpt-write")
            try:
                futures = [pool.submit(self._write_segment,
                                       layout.segment_name(assignment.attempt, assignment.rank, k),
                                       items, planner, resolved)
                           for k, items in enumerate(bins)]
                with reported(f"rank {assignment.rank}: save of step {self.step} to "
                              f"{self.store.url}", lambda: sum(o.written for o in self._outs),
                              loud=assignment.rank == 0, verb="written"):
                    for part in wait_all(futures, self.config.io_stall_timeout_s,
                                         f"rank {assignment.rank}'s writes of step {self.step}",
                                         self._heartbeat):
                        results.extend(part)
            finally:  # after a failure, writers still running finish on their own
                pool.shutdown(wait=False, cancel_futures=True)
            t = time.perf_counter()
            folder = f"{layout.DATA_DIR}/{assignment.attempt}"
            if any(n.startswith(folder + "/") for n in self.created):  # else no folder
                self.store.sync_folder(folder)
            self.rank_s["rank_sync_folder"] = time.perf_counter() - t
        if self.config.dedup:  # the next save's index, if the coordinator commits this one
            dedup.written(self.store, (self.step, assignment.attempt),
                          (b for r in results for b in r.storage_data.data.blocks),
                          self._history)
        nbytes = sum(r.size_in_bytes for r in results)
        written = sum(r.storage_data.written for r in results)
        self.written_at = time.perf_counter()
        seconds = self.rank_s["rank_write"] = self.written_at - self._t["write"]
        log.info("rank %d stored %d bytes (%d written, %d fragmented items rewritten whole) "
                 "in %d segments in %.3f s (%.2f GB/s)", assignment.rank, nbytes, written,
                 self.rewritten, len(bins), seconds, nbytes / max(seconds, 1e-9) / 1e9)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """(coordinator) Every rank succeeded: create the manifest, the commit point."""
        with paused_gc():  # an async save's too: this part is short, and a few objects per block
            try:
                self._finish(metadata, results)
            except BaseException as e:
                if self._manifest_sent:  # every rank keeps its data: the step may be committed
                    discard.mark(e)
                raise

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        t_finish = time.perf_counter()
        # keyed by (fqn, offsets): a MetadataIndex per lookup costs a torch.Size
        stored: dict[tuple[str, tuple[int, ...] | None], Stored] = {
            (r.index.fqn, r.index.offset): r.storage_data
            for rank_results in results for r in rank_results}
        items = entries(metadata, stored)
        phase_s = {"plan": self._t["write"] - self._t["start"], "write": t_finish - self._t["write"]}
        manifest = Manifest(
            step=self.step, attempt=self._attempt, created_at=time.time(), world_size=len(results),
            items=items, metrics=self.metrics,
            bytes_logical=sum(e.nbytes for e in items.values()),
            bytes_written=sum(st.written for st in stored.values()),
            phase_s=phase_s, block_size_bytes=self.config.block_size_bytes,
            dcp_version=metadata.version, planner_data=planner_data(metadata.planner_data))
        ends = manifest.extents()  # one pass over the blocks (10^5 and more)
        check_references(self.store, ends, step=self.step, attempt=self._attempt,
                         shared_storage=self.shared_storage)
        self.committed_raw = encode(manifest, segments=sorted(ends))
        self._manifest_sent = True
        try:
            self.store.create_exclusive(layout.manifest_name(self.step), self.committed_raw)
        except BaseException as e:
            # a local create is one link: when it failed, the manifest there is another
            # save's or none, and this save's data can go (dckpt.discard); an object store's
            # request may still arrive
            self._manifest_sent = not self.store.local or (
                not isinstance(e, FileExistsError)
                and self.store.exists(layout.manifest_name(self.step)))
            if isinstance(e, FileExistsError):
                raise CheckpointExistsError(
                    f"step {self.step} was committed in {self.store.url} by another save while "
                    "this one was writing; nothing of this save was committed") from None
            raise
        if self.config.dedup:  # the next save's base, checked without reading this manifest
            dedup.committed(self.store, (self.step, self._attempt), ends)
        commit_s = time.perf_counter() - t_finish
        self.info = info_from_manifest(
            manifest, self.store.url,
            bytes_written_raw=sum(st.raw_written for st in stored.values()),
            phase_s={**phase_s, "commit": commit_s,
                     "total": time.perf_counter() - self._t["start"]})
        log.info("committed step %d: %d bytes logical, %d written, %.3f s total", self.step,
                 manifest.bytes_logical, manifest.bytes_written, self.info.phase_s["total"])

    def after_commit(self, group: object) -> None:
        """(all ranks, right after the commit) Nothing here; the memory tier's writer
        copies the manifest to every node."""

    def discard(self, failure: BaseException) -> None:
        """(all ranks, the save failed with ``failure``) Remove the objects this rank created
        for it, where no manifest can reference them (dckpt.discard)."""
        names, self.created = self.created, []
        if discard.uncommitted(failure, coordinator=self.is_coordinator,
                               manifest_sent=self._manifest_sent):
            discard.remove(self.store, names, f"the failed save of step {self.step} on rank "
                           f"{dist.rank()}")

    # -- internals ---------------------------------------------------------------------

    def open_segment(self, name: str, direct: bool, nbytes: int) -> AbstractContextManager[BinaryIO]:
        """A new segment object, of about ``nbytes`` (the memory tier's writer reuses the
        memory of a pruned checkpoint's)."""
        return self.store.open_write(name, direct=direct, window_bytes=self.window_bytes(direct))

    def window_bytes(self, direct: bool) -> int:
        """The window that this save's ``O_DIRECT`` writes copy their bytes through (0: none;
        ``write_window_bytes``)."""
        if not direct or self.from_staging:
            return 0
        return write_window_bytes(self.config, self.store.root)

    def segment_out(self, f: BinaryIO, name: str, direct: bool) -> SegmentOut:
        # placed where its memory's pages fall on the file's pages only when written from
        # that memory; through a window, packed
        aligned = direct and not self.window_bytes(direct)
        out = SegmentOut(f, name, self.config.block_size_bytes,
                         align=DIRECT_ALIGN if aligned else 0, index=self._index,
                         compress=self.compresses)
        out.beat = self._heartbeat.beat
        self._outs.append(out)
        return out

    @property
    def compresses(self) -> bool:
        """``compression="auto"``: only where the store is slower than compressing it
        (object stores; not local disks: docs/design.md, Compression)."""
        mode = self.config.compression
        return mode == "on" or (mode == "auto" and not self.store.local)

    def _write_segment(self, name: str, items: list[WriteItem], planner: SavePlanner,
                       resolved: dict[MetadataIndex, Any]) -> list[WriteResult]:
        results = []
        direct = self.config.direct_io and self.store.direct_capable
        nbytes = sum(item_nbytes(i) for i in items)

        def opened() -> BinaryIO:
            self.created.append(name)
            return stack.enter_context(self.open_segment(name, direct, nbytes))

        with ExitStack() as stack:  # closed (made durable) or aborted as the block ends
            f = _FirstWrite(opened)  # no object for a writer whose every block is known
            out = self.segment_out(f, name, direct)  # type: ignore[arg-type]
            for item in items:
                data = (resolved[item.index] if item.index in resolved
                        else planner.resolve_data(item))
                encoding = "torch"
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    buf, planes = data.getbuffer(), 1
                    encoding = "bytes" if isinstance(data, RawBytes) else "torch"
                else:
                    buf = tensor_bytes(data)  # type: ignore[arg-type]
                    planes = byte_planes(data.dtype)  # type: ignore[union-attr]
                key = item_key(item.index.fqn, item.index.offset)
                size = self.config.block_size_bytes
                if self._index is not None:
                    size = block_size_for(self._index.history, key, len(buf), size,
                                          self.config.sparse_block_size_bytes)
                before, raw_before = out.written, out.raw_written
                blocks = out.append(buf, planes=planes, block_size=size,
                                    min_run_bytes=self.config.min_read_run_bytes)
                if blocks:  # a save that changed the size matched nothing: no evidence
                    last = self._index.history.get(key) if self._index is not None else None
                    fresh = last is not None and last[0] != size
                    # how much changed, even where a rewrite wrote it all: a rewritten
                    # sparse table stays sparse (its block size holds)
                    self._history[key] = (size, None if fresh else out.changed)
                stored = StoredData(len(buf), tuple(blocks))
                results.append(WriteResult(index=item.index, size_in_bytes=len(buf),
                                           storage_data=Stored(stored, out.written - before,
                                                                out.raw_written - raw_before,
                                                                encoding)))
                del buf
            t_close = time.perf_counter()
        close_s = time.perf_counter() - t_close
        with self._lock:
            self.rewritten += out.rewritten
            for k, v in out.seconds.items():
                self.rank_s[f"rank_{k}"] = self.rank_s.get(f"rank_{k}", 0.0) + v
            self.rank_s["rank_close"] = self.rank_s.get("rank_close", 0.0) + close_s
        return results


def write_window_bytes(config: SaveConfig, root: str) -> int:
    """The window a sync save's ``O_DIRECT`` writes to the local folder ``root`` copy their
    bytes through: ``config.write_window_bytes``, or 0, written from the caller's memory,
    where the tensors lie on huge pages, where the disk takes scattered pages as well, or
    where windows would not lie on huge pages (dckpt.direct.Windows)."""
    size = config.write_window_bytes
    if not size or tensors_on_huge_pages() or not pages_cap_requests(root):
        return 0
    return size if WINDOWS.lies_well(size) else 0


class _FirstWrite:
    """A segment's file, created at its first write: a writer whose every block the
    repository holds already (a differential save of unchanged or frozen tensors) creates
    no object, where it made an empty one per writer thread and rank, which gc then
    deleted (on S3 a request each way)."""

    def __init__(self, create: Callable[[], BinaryIO]) -> None:
        self._create = create
        self._f: BinaryIO | None = None

    def write(self, data: Any) -> int:
        if self._f is None:
            self._f = self._create()
        return self._f.write(data)


def _checked_values(items: list[WriteItem], planner: SavePlanner) -> dict[MetadataIndex, Any]:
    """The non-tensor values of ``items`` as ``planner`` serializes them, each checked to
    load with ``weights_only=True`` (StateDictError naming the first that would not)."""
    values = {}
    for item in items:
        if item.type == WriteItemType.BYTE_IO:
            data = planner.resolve_data(item)
            if isinstance(data, io.BytesIO) and not isinstance(data, RawBytes):
                check_loadable(item.index.fqn, data.getbuffer())
            values[item.index] = data
    return values


