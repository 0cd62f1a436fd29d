"""A save's collective steps (``run_save``: every rank's failure the same DckptError on
every rank), with the global plan made once per structure.

DCP's save gathers every rank's local plan (a ``WriteItem`` per tensor shard) to the
coordinator, which plans globally (dedup of replicated items, the metadata, its checks) and
scatters a plan back to each rank, at every save. For a state of 20,000 small tensors on 2
ranks that was 2 s of a 3.9 s save, nearly all of it on the coordinator (pickling,
unpickling, planning), and it grows with the ranks; yet between two saves of one training
job the structure rarely changes, only the values.

Here each rank digests its local plan's structure (items and the flattening's mappings, not
the values) and, when the digest is the one the coordinator planned last time, sends the
digest alone (``_Known``) with what is new at each save: the step (the Writer's
``storage_data``) and the digests of its non-tensor values (``differing_values``). When
every rank did, and all from the same planning (``generation``), the coordinator skips the
global planning: it runs the Writer's part (the step's checks, the attempt's name) and the
value check, and each rank takes its own cached plan with the new ``storage_data``. Anything
else (a first save, a structure changed on any rank, a rank whose cache is gone or from
another planning) takes the full path: where some rank sent its digest alone, the
coordinator asks every rank for its plan (``_Resend``: one more round of small messages;
it keeps no rank's plan, which would hold an item per shard of every rank on rank 0).

The rest is DCP's ``_save_state_dict``, without its loggers, and with the commit's result,
the CheckpointInfo, broadcast instead of the global metadata. Failures travel as in DCP
(``_DistWrapper``: a CheckpointException on every rank naming each rank's exception). The
exchanges of plans and of write results, and the commit, run with Python's cyclic garbage
collector paused (``paused_gc``), as a whole sync save does: they make an object or more
per item, and in an async save's thread the collector's passes over them (and over every
object of the training's process) had doubled its commit (25,000 items per rank: 1.5 s
against 2.5-2.8 s). So do the writes of ``MANY_ITEMS`` or more (0.4 s against 0.4-0.96 s
there); those of fewer, larger items, which may take long and make few objects, run with the
collector as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pickle
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    Metadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import StorageWriter

from dckpt import dist
from dckpt.blocks import digest
from dckpt.errors import DckptError
from dckpt.gcpause import paused_gc
from dckpt.info import CheckpointInfo
from dckpt.planner import PlannerData, SafeSavePlanner
from dckpt.torch_internals import DistWrapper
from dckpt.writer import Writer

__all__ = ["PlanCache", "save_state_dict", "plan_digest", "MANY_ITEMS", "run_save",
           "quiet_single_process", "stateful_to_state_dict"]

StateDict = dict[str, Any]

MANY_ITEMS = 1024
"""A rank's items from which its writes, too, run with the garbage collector paused."""


def plan_digest(plan: SavePlan) -> str:
    """The structure of a local save plan: its items, and the mappings of the flattening
    (DCP stores them in the checkpoint's metadata). Not its values' digests, nor the step."""
    mappings = dict(plan.planner_data) if isinstance(plan.planner_data, dict) else None
    rows = _item_rows(plan.items) if _KNOWN_ITEMS else None
    return digest(pickle.dumps((rows if rows is not None else plan.items, mappings),
                               protocol=5))


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls))


_KNOWN_ITEMS = (_fields(WriteItem) == ("index", "type", "bytes_io_data", "tensor_data")
                and _fields(TensorWriteData) == ("chunk", "properties", "size")
                and _fields(TensorProperties) == ("dtype", "layout", "requires_grad",
                                                  "memory_format", "pin_memory"))
"""Whether DCP's write items hold the fields ``_item_rows`` spells out (else: pickled whole)."""


def _item_rows(items: list[WriteItem]) -> list[tuple] | None:
    """Every field of the items as plain tuples, which pickle 5x faster than the dataclasses
    (0.09 s against 0.46 s for 20,000 tensors, paid at every save); None for an item of a
    kind it does not know."""
    rows: list[tuple] = []
    add = rows.append
    for it in items:
        idx, td = it.index, it.tensor_data
        if type(it) is not WriteItem or type(idx) is not MetadataIndex:
            return None
        if td is None:
            add((idx.fqn, idx.offset, idx.index, it.type.value, it.bytes_io_data))
            continue
        p, c = td.properties, td.chunk
        if type(td) is not TensorWriteData or type(p) is not TensorProperties:
            return None
        offset = None if idx.offset is None else tuple(idx.offset)
        add((idx.fqn, offset, idx.index, it.type.value, it.bytes_io_data,
             tuple(c.offsets), tuple(c.sizes), tuple(td.size), p.dtype, p.layout,
             p.requires_grad, p.memory_format, p.pin_memory))
    return rows


@dataclass(frozen=True)
class _Known:
    """(rank -> coordinator) A local plan the coordinator planned before, by its digest."""

    key: str
    generation: str
    storage_data: Any
    value_digests: dict[str, str]


@dataclass(frozen=True)
class _Full:
    plan: SavePlan
    key: str


@dataclass(frozen=True)
class _Planned:
    """(coordinator -> rank) A plan made now, from ``generation``'s planning."""

    plan: SavePlan
    generation: str


@dataclass(frozen=True)
class _Reuse:
    """(coordinator -> rank) Take the cached plan with this ``storage_data``."""

    storage_data: Any


class _Resend:
    """(coordinator -> rank) Send the whole local plan: the digest alone did not do."""


class PlanCache:
    """The last global planning of one line of saves (an AsyncSaver's, the memory tier's
    copies to storage): on every rank, its own plan; on the coordinator, every rank's digest
    and the metadata. Used by one thread at a time."""

    def __init__(self) -> None:
        self.hits = 0
        """Saves that reused the plan."""
        self.local: tuple[object, SavePlan, str] | None = None
        """This rank's last local plan: (its state dict's shape, the plan, its digest)."""
        self.clear()

    def clear(self) -> None:
        self.key: str | None = None
        self.generation = ""
        self.plan: SavePlan | None = None  # this rank's planned plan, storage_data aside
        # the coordinator's
        self.keys: list[str] | None = None
        self.metadata: Metadata | None = None


def _local_plan(planner: SavePlanner, storage_writer: StorageWriter,
                cache: PlanCache) -> tuple[SavePlan, str]:
    """This rank's local plan and its digest: the line's last one taken again where the
    planner finds a state dict of the same shape (``SafeSavePlanner.reuse``)."""
    local = cache.local
    safe = planner if isinstance(planner, SafeSavePlanner) else None
    if safe is not None and local is not None:
        safe.reuse = local[0], local[1]
    plan = storage_writer.prepare_local_plan(planner.create_local_plan())
    made = safe.made if safe is not None else None
    # a plan taken again keeps its digest: the same items and mappings
    key = (local[2] if local is not None and made is not None and made[1] is local[1]
           else plan_digest(plan))
    cache.local = None if made is None else (made[0], made[1], key)
    return plan, key


def save_state_dict(state_dict: dict[str, Any], storage_writer: StorageWriter,
                    planner: SavePlanner, process_group: Any, no_dist: bool,
                    cache: PlanCache | None = None) -> Any:
    """(collective) DCP's save of ``state_dict`` through ``storage_writer``; returns what the
    writer's ``finish`` returned on the coordinator, on every rank."""
    dw = DistWrapper(process_group, not no_dist, 0)
    cache = cache if cache is not None else PlanCache()
    mine: dict[str, Any] = {}
    metadata: list[Metadata] = []

    def local_step(offer_known: bool) -> _Known | _Full:
        if "plan" not in mine:
            planner.set_up_planner(state_dict=state_dict, storage_meta=storage_writer.storage_meta(),
                                   is_coordinator=dw.is_coordinator)
            storage_writer.set_up_storage_writer(dw.is_coordinator)
            mine["plan"], mine["key"] = _local_plan(planner, storage_writer, cache)
        plan, key = mine["plan"], mine["key"]
        if offer_known and cache.plan is not None and cache.key == key:
            return _Known(key, cache.generation, plan.storage_data,
                          getattr(plan.planner_data, "value_digests", {}))
        return _Full(plan, key)

    def global_step(sent: list[_Known | _Full]) -> list[Any]:
        known = [s for s in sent if isinstance(s, _Known)]
        if (len(known) == len(sent) and cache.keys == [s.key for s in known]
                and all(s.generation == cache.generation for s in known)
                and cache.metadata is not None):
            values = [SavePlan([], storage_data=s.storage_data,
                               planner_data=PlannerData({}, s.value_digests)) for s in known]
            if isinstance(planner, SafeSavePlanner):
                planner.warn_differing_values(values)
            metadata.append(cache.metadata)
            return [_Reuse(p.storage_data) for p in storage_writer.prepare_global_plan(values)]
        if known:  # a rank's plan is here by its digest only: every rank sends it again
            return [_Resend()] * len(sent)
        plans = [s.plan for s in sent if isinstance(s, _Full)]
        cache.clear()  # a failure from here on leaves nothing half-made behind
        planned, meta = planner.create_global_plan(plans)
        generation = uuid.uuid4().hex
        cache.keys, cache.metadata = [s.key for s in sent], meta
        cache.generation = generation
        metadata.append(meta)
        return [_Planned(p, generation) for p in storage_writer.prepare_global_plan(planned)]

    with paused_gc():
        answer = dw.reduce_scatter("plan", lambda: local_step(True), global_step)
        if isinstance(answer, _Resend):
            answer = dw.reduce_scatter("plan", lambda: local_step(False), global_step)
    if isinstance(answer, _Reuse):
        assert cache.plan is not None
        central = dataclasses.replace(cache.plan, storage_data=answer.storage_data)
        cache.hits += 1
    else:
        assert isinstance(answer, _Planned)
        central = answer.plan
        cache.key, cache.plan, cache.generation = (
            mine["key"], dataclasses.replace(central, storage_data=None), answer.generation)

    failure: BaseException | None = None
    final = planner.finish_plan(central)
    try:  # the writes of a few large items may be long, and make few objects
        with paused_gc() if len(final.items) >= MANY_ITEMS else contextlib.nullcontext():
            writes = storage_writer.write_data(final, planner)
            writes.wait()
            written = writes.value()
    except BaseException as e:
        failure = e

    def report() -> Any:
        if failure is not None:
            raise failure  # carried to every rank, as DCP's step would have
        return written

    def finish(results: list[Any]) -> Any:
        storage_writer.finish(metadata=metadata[0], results=results)
        return getattr(storage_writer, "info", None)

    with paused_gc():
        return dw.all_reduce("write", report, finish)


@contextmanager
def quiet_single_process() -> Iterator[None]:
    """Without a process group one process is the whole world, as documented: no warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def run_save(state_dict: StateDict, writer: Writer, planner: SavePlanner | None,
             group: object, plans: PlanCache | None = None) -> CheckpointInfo:
    """(collective) DCP's save with ``writer``; every failure becomes the same DckptError on
    every rank, and every rank returns the coordinator's CheckpointInfo. ``plans``: the
    global plan of the previous save of this line, reused where the structure is the same."""
    what = f"save of step {writer.step} to {writer.store.url}"
    try:
        with quiet_single_process():
            # not dcp.save, which wraps each top-level value's state_dict() in a logger that
            # makes two debug records of it (torch's distributed loggers are at DEBUG):
            # 50 us a value, 1 s of a sync save of 20,000 tensors; and plans globally at
            # every save (dckpt.global_plan). Alone by the group the call began with, not
            # by dist.active() now: an async save's persist thread may start after the
            # caller destroyed the process group, and must fail, not commit alone.
            info = save_state_dict(stateful_to_state_dict(state_dict), writer,
                                   planner or SafeSavePlanner(), group, group is None, plans)
    except CheckpointException as e:
        writer.discard(e)
        dist.raise_interrupt(e)
        raise dist.translate(e, what=what, saving=True) from None
    except DckptError as e:
        writer.discard(e)
        raise
    except Exception as e:  # a collective broke: a peer died or timed out
        writer.discard(e)
        raise dist.peer_failure(e, what=what, saving=True) from e
    assert isinstance(info, CheckpointInfo)  # the coordinator's, sent with the commit's news
    writer.after_commit(group)
    mine = dict(writer.rank_s)
    if writer.written_at is not None:
        mine["rank_wait"] = time.perf_counter() - writer.written_at
    return dataclasses.replace(info, phase_s={**info.phase_s, **mine})


def stateful_to_state_dict(state_dict: StateDict) -> StateDict:
    """DCP's rule: a top-level Stateful value saves as its ``state_dict()``. (Tensors first:
    a check against the runtime protocol costs 20 us, 0.4 s for 20,000 tensors.)"""
    return {k: v.state_dict() if not isinstance(v, torch.Tensor) and isinstance(v, Stateful)
            else v for k, v in state_dict.items()}
