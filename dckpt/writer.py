"""DCP StorageWriter: each rank writes its blocks into segments, the coordinator commits.

Call order (DCP's ``save`` drives it)::

    (all ranks)   set_up_storage_writer -> prepare_local_plan   checks the state, no I/O
    (coordinator) prepare_global_plan    refuses a committed step, names the attempt
    (all ranks)   write_data             blocks -> segments, durable before it returns
    (coordinator) finish                 only when every rank succeeded: the manifest

DCP gathers every rank's write result (or exception) to the coordinator before ``finish``
and broadcasts the outcome, which is the two-phase commit: no manifest unless all ranks
reported their data durable, and then the same outcome everywhere.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                   MetadataIndex, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, SavePlanner, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from dckpt import layout
from dckpt.blocks import cut, digest
from dckpt.config import SaveConfig
from dckpt.errors import CheckpointExistsError, StateDictError
from dckpt.info import CheckpointInfo, info_from_manifest
from dckpt.manifest import (BlockRef, ChunkEntry, Entry, Manifest, StoredData, TensorEntry,
                            ValueEntry, dtype_name, encode, stored_datas)
from dckpt.repository import mark_repository
from dckpt.storage import Store

__all__ = ["Writer", "SegmentOut", "tensor_bytes"]

log = logging.getLogger(__name__)

Metrics = dict[str, float | int | str | bool | None]


@dataclass(frozen=True)
class _Assignment:
    """What the coordinator hands each rank in its plan's storage_data."""

    attempt: str
    rank: int


@dataclass(frozen=True)
class _Stored:
    """One rank's report for one item: where its blocks are (WriteResult.storage_data)."""

    data: StoredData


def check_metrics(metrics: object) -> Metrics:
    if metrics is None:
        return {}
    if not isinstance(metrics, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, (bool, int, float, str)))
            for k, v in metrics.items()):
        raise StateDictError(
            f"metrics must map str to int, float, str, bool or None, got {metrics!r}")
    return dict(metrics)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements in row-major order as bytes; no copy when already contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def _item_nbytes(item: WriteItem) -> int:
    if item.tensor_data is None:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def _balance(items: list[WriteItem], bins: int) -> list[list[WriteItem]]:
    """Greedy: largest item first into the lightest bin; each bin becomes one segment."""
    loads = [0] * bins
    out: list[list[WriteItem]] = [[] for _ in range(bins)]
    for item in sorted(items, key=_item_nbytes, reverse=True):
        i = loads.index(min(loads))
        out[i].append(item)
        loads[i] += _item_nbytes(item)
    return [b for b in out if b]


class Writer(StorageWriter):
    """Writes one step into the dckpt repository at ``url`` (see the module docstring)."""

    def __init__(self, url: str, *, step: int, metrics: Metrics | None = None,
                 storage_options: dict | None = None, config: SaveConfig | None = None) -> None:
        super().__init__()
        if type(step) is not int or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        self.store = Store(url, storage_options)
        self.step = step
        self.metrics = check_metrics(metrics)
        self.config = config or SaveConfig()
        self.is_coordinator = False
        self.info: CheckpointInfo | None = None
        self._attempt = ""
        self._t: dict[str, float] = {}

    # -- DCP protocol ----------------------------------------------------------------

    def reset(self, checkpoint_id: object = None) -> None:
        self.info = None
        self._t = {}

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
            except Exception as e:  # noqa: BLE001 - collected, raised together below
                problems.append(f"{item.index.fqn}: {e}")
            if props.layout != torch.strided:
                problems.append(f"{item.index.fqn}: layout {props.layout} is not supported; "
                                "convert to a dense (strided) tensor before saving")
        if problems:
            raise StateDictError(f"the state dict cannot be saved ({len(problems)} problems):\n"
                                 + "\n".join(f"  - {p}" for p in problems))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """(coordinator) Refuse a committed step; give every rank the attempt's name."""
        if self.store.exists(layout.manifest_name(self.step)):
            raise CheckpointExistsError(
                f"step {self.step} is already committed in {self.store.url}; a committed "
                "checkpoint is never overwritten. Save under another step, or delete it first")
        mark_repository(self.store)
        self._attempt = layout.new_attempt(self.step)
        return [dataclasses.replace(p, storage_data=_Assignment(self._attempt, i))
                for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """(all ranks) Write this rank's items; every segment is durable when this returns."""
        self._t["write"] = time.perf_counter()
        assignment: _Assignment = plan.storage_data
        # items an async save already wrote during its pause (over its staging budget)
        prewritten: dict[MetadataIndex, StoredData] = getattr(planner, "prewritten", {})
        results = [WriteResult(index=i.index, size_in_bytes=prewritten[i.index].nbytes,
                               storage_data=_Stored(prewritten[i.index]))
                   for i in plan.items if i.index in prewritten]
        items = [i for i in plan.items if i.index not in prewritten]
        total = sum(_item_nbytes(i) for i in items)
        # IMPORTANT: few large objects (S3 pays per request): a segment per 64 MiB at least
        bins = _balance(items, max(1, min(self.config.writer_threads,
                                          math.ceil(total / (64 << 20)))))
        if bins:
            with ThreadPoolExecutor(len(bins), thread_name_prefix="dckpt-write") as pool:
                futures = [pool.submit(self._write_segment,
                                       layout.segment_name(assignment.attempt, assignment.rank, k),
                                       items, planner)
                           for k, items in enumerate(bins)]
                for f in futures:
                    results.extend(f.result())
            self.store.sync_folder(f"{layout.DATA_DIR}/{assignment.attempt}")
        nbytes = sum(r.size_in_bytes for r in results)
        seconds = time.perf_counter() - self._t["write"]
        log.info("rank %d wrote %d bytes in %d segments in %.3f s (%.2f GB/s)", assignment.rank,
                 nbytes, len(bins), seconds, nbytes / max(seconds, 1e-9) / 1e9)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """(coordinator) Every rank succeeded: create the manifest, the commit point."""
        t_finish = time.perf_counter()
        stored = {r.index: r.storage_data for rank_results in results for r in rank_results}
        items = _entries(metadata, stored)
        phase_s = {"plan": self._t["write"] - self._t["start"], "write": t_finish - self._t["write"]}
        manifest = Manifest(
            step=self.step, attempt=self._attempt, created_at=time.time(), world_size=len(results),
            items=items, metrics=self.metrics,
            bytes_logical=sum(e.nbytes for e in items.values()),
            bytes_written=sum(b.length for e in items.values() for d in stored_datas(e)
                              for b in d.blocks),
            phase_s=phase_s, block_size_bytes=self.config.block_size_bytes,
            dcp_version=metadata.version, planner_data=_planner_data(metadata.planner_data))
        try:
            self.store.create_exclusive(layout.manifest_name(self.step), encode(manifest))
        except FileExistsError:
            raise CheckpointExistsError(
                f"step {self.step} was committed in {self.store.url} by another save while this "
                "one was writing; this save's data is left for gc") from None
        commit_s = time.perf_counter() - t_finish
        self.info = info_from_manifest(manifest, self.store.url, phase_s={
            **phase_s, "commit": commit_s, "total": time.perf_counter() - self._t["start"]})
        log.info("committed step %d: %d bytes logical, %d written, %.3f s total", self.step,
                 manifest.bytes_logical, manifest.bytes_written, self.info.phase_s["total"])

    # -- internals ---------------------------------------------------------------------

    def _write_segment(self, name: str, items: list[WriteItem],
                       planner: SavePlanner) -> list[WriteResult]:
        results = []
        with self.store.open_write(name) as f:
            out = SegmentOut(f, name, self.config.block_size_bytes)
            for item in items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    buf = data.getbuffer()
                else:
                    buf = tensor_bytes(data)  # type: ignore[arg-type]
                stored = StoredData(len(buf), tuple(out.append(buf)))
                results.append(WriteResult(index=item.index, size_in_bytes=len(buf),
                                           storage_data=_Stored(stored)))
                del buf
        return results


class SegmentOut:
    """Appends the bytes of items to one open segment, cut into blocks and hashed.

    An item may come in pieces (``append`` once per piece); every piece but the last must
    be a multiple of the block size, so that blocks fall where one ``append`` would cut.
    """

    def __init__(self, f: BinaryIO, name: str, block_size: int) -> None:
        self.f = f
        self.name = name
        self.block_size = block_size
        self.offset = 0

    def append(self, buf: memoryview) -> list[BlockRef]:
        blocks = []
        for start, length in cut(len(buf), self.block_size):
            piece = buf[start: start + length]
            blocks.append(BlockRef(self.name, self.offset, length, length, digest(piece)))
            self.f.write(piece)
            self.offset += length
        return blocks


def _entries(metadata: Metadata, stored: dict[MetadataIndex, _Stored]) -> dict[str, Entry]:
    items: dict[str, Entry] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            items[fqn] = ValueEntry(stored[MetadataIndex(fqn)].data)
        elif isinstance(md, TensorStorageMetadata):
            chunks = tuple(ChunkEntry(tuple(c.offsets), tuple(c.sizes),
                                      stored[MetadataIndex(fqn, c.offsets)].data)
                           for c in md.chunks)
            items[fqn] = TensorEntry(dtype_name(md.properties.dtype), tuple(md.size),
                                     bool(md.properties.requires_grad), chunks)
    return items


def _planner_data(data: object) -> dict[str, list[str | int]] | None:
    """DCP's default planner maps each flat key to its path in the nested state dict."""
    if not isinstance(data, dict):
        return None
    out = {k: list(v) for k, v in data.items() if isinstance(v, (tuple, list))}
    try:
        json.dumps(out)
    except (TypeError, ValueError):
        return None
    return out
