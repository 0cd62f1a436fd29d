"""DCP planners: the save planner refuses, before any byte is written, a state dict that a
load could not restore; the staged planner answers an async save's persist thread from the
staged copy; the load planner checks the state dict against the checkpoint before any byte
is read, and loads non-tensor values without running code from the checkpoint."""

from __future__ import annotations

import dataclasses
import io
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    ReadItem,
    SavePlan,
    WriteItem,
    WriteItemType,
)

from dckpt.blocks import digest
from dckpt.dtypes import flat_bytes
from dckpt.errors import StateDictError, listing
from dckpt.manifest import StoredData
from dckpt.meta_tensors import materialize_meta, meta_keys, meta_problem
from dckpt.optim_state import forget, make_missing_state
from dckpt.overlaps import Tied, read_apart, shared_memory
from dckpt.state_checks import (
    PLAIN,
    differing_values,
    named_collisions,
    refuse,
    replica_problems,
    state_dict_problems,
    tensor_problem,
    unasked_keys,
)
from dckpt.torch_internals import (
    flatten_sharded_tensors,
    is_dtensor,
    local_shard,
    set_as_spelled,
)
from dckpt.values import RawBytes, safe_load, serialize

log = logging.getLogger(__name__)

__all__ = ["SafeLoadPlanner", "SafeSavePlanner", "StagedPlanner", "plan_key"]


@dataclass(frozen=True)
class _Asked:
    """(each rank -> coordinator) The keys one rank's state dict asks for."""

    keys: tuple[str, ...]
    problems: tuple[str, ...]


class PlannerData(dict):
    """A local save plan's ``planner_data`` (DCP's: the flattening's mappings, which it
    merges over the ranks as dicts) and the digest of every non-tensor value this rank saves
    (``value_digests``), for the coordinator to compare (``differing_values``)."""

    def __init__(self, mappings: dict, value_digests: dict[str, str]) -> None:
        super().__init__(mappings)
        self.value_digests = value_digests


EXACT_DIGEST_BYTES = 64 << 10
"""Whole tensors of integers or booleans up to this size, on the host, are compared between
the ranks too (``exact_tensors``): the per-rank state a training loop keeps in tensors (a
generator's state, a data loader's position) is of that kind; a model's weights, replicated
and equal by construction, are not (and hashing them would cost)."""


_exact_items: list[Any] = [(None, [])]
"""The last plan ``exact_tensors`` looked through (a weak reference) and its candidates: a
plan reused from save to save (global_plan.PlanCache) is looked through once (8 ms for
20,000 tensors)."""


def exact_tensors(plan: SavePlan, lookup: Callable[[WriteItem], object]
                  ) -> dict[str, torch.Tensor]:
    """The items of ``plan`` that are whole, small integer or boolean host tensors, by key:
    ``lookup(item)`` gives the tensor (the state dict's, or its staged copy)."""
    seen, candidates = _exact_items[0]  # one tuple: the persist thread's calls read it too
    if seen is None or seen() is not plan:
        candidates = []
        for item in plan.items:
            if item.type != WriteItemType.TENSOR or item.tensor_data is None:
                continue
            size, chunk = item.tensor_data.size, item.tensor_data.chunk
            dtype = item.tensor_data.properties.dtype
            if not (dtype.is_floating_point or dtype.is_complex or any(chunk.offsets)
                    or tuple(chunk.sizes) != tuple(size)
                    or size.numel() * dtype.itemsize > EXACT_DIGEST_BYTES):
                candidates.append(item)
        _exact_items[0] = (weakref.ref(plan), candidates)
    out: dict[str, torch.Tensor] = {}
    for item in candidates:
        t = lookup(item)
        if (isinstance(t, torch.Tensor) and type(t) in PLAIN and t.device.type == "cpu"
                and t.layout == torch.strided and not t.is_quantized):
            out[item.index.fqn] = t
    return out


def with_value_digests(plan: SavePlan, values: dict[str, io.BytesIO],
                       tensors: dict[str, torch.Tensor] | None = None) -> SavePlan:
    """``plan`` carrying the digests of this rank's serialized non-tensor values, and of
    ``tensors`` (``exact_tensors``)."""
    if not isinstance(plan.planner_data, dict):  # no flattening: nothing to carry them in
        return plan
    digests = {fqn: digest(value.getbuffer()) for fqn, value in values.items()}
    for fqn, t in (tensors or {}).items():
        digests[fqn] = digest(flat_bytes(t.detach().contiguous()).numpy().tobytes())
    return dataclasses.replace(plan, planner_data=PlannerData(plan.planner_data, digests))


def plan_key(flat: dict[str, Any]) -> tuple | None:
    """What DCP's local save plan depends on, for a flattened state dict: the same key gives
    the same plan, which is reused (planning 64 DTensors costs several ms of the pause).
    None when something in it is not understood (then the plan is always made afresh)."""
    key: list[tuple] = []
    for fqn, v in flat.items():
        if not isinstance(v, torch.Tensor):
            key.append((fqn,))
        elif type(v) in PLAIN:  # a lazy parameter, whose shape raises, is a subclass
            if v.is_nested:  # no shape to key on; refused by the checks
                return None
            key.append((fqn, v.shape, v.dtype, v.device, v.layout, v.requires_grad))
        elif is_dtensor(v):
            mesh: Any = v.device_mesh  # type: ignore[attr-defined]
            # where this rank's shard lies: the mesh's shape and this rank's coordinate in it
            # (a mesh made anew can take a freed one's id)
            local = local_shard(v)  # type: ignore[arg-type]
            key.append((fqn, v.shape, local.shape, v.dtype, v.device, local.layout,
                        local.is_nested, v.requires_grad, tuple(v.placements),  # type: ignore[attr-defined]
                        id(mesh), tuple(mesh.shape), tuple(mesh.get_coordinate() or ())))
        else:
            return None
    return tuple(key)


def _sharded_flattened(flat: dict[str, Any]) -> dict[str, Any]:
    """DCP's second flattening pass, for the ShardedTensors of 2-D parallelism, where one may
    be there: elsewhere it copies the flat dict with nothing changed (0.05 s for 20,000
    tensors)."""
    if any(isinstance(v, torch.Tensor) and type(v) not in PLAIN and not is_dtensor(v)
           for v in flat.values()):
        return flatten_sharded_tensors(flat)
    return flat


def local_load_plan(state_dict: dict[str, Any], metadata: Metadata, strict: bool) -> LoadPlan:
    """DCP's ``create_default_local_load_plan``, but a plain tensor stored whole, in one chunk
    of its own size, is the one read DCP's overlap search would find, made without it (20 us
    a tensor, 0.25 s of a load of 20,000); the read items are DCP's, in its order."""
    reads: list[ReadItem] = []
    for fqn, obj in state_dict.items():
        md = metadata.state_dict_metadata.get(fqn)
        if type(obj) in PLAIN and type(md) is TensorStorageMetadata and len(md.chunks) == 1:
            chunk, size = md.chunks[0], obj.size()
            if md.size == size == chunk.sizes and all(size) and not any(chunk.offsets):
                zeros = chunk.offsets
                reads.append(ReadItem(type=LoadItemType.TENSOR,
                                      dest_index=MetadataIndex(fqn, zeros, 0), dest_offsets=zeros,
                                      storage_index=MetadataIndex(fqn, zeros, 0),
                                      storage_offsets=zeros, lengths=size))
                continue
        reads += create_default_local_load_plan({fqn: obj}, metadata, strict).items
    return LoadPlan(reads)


class SafeSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner that refuses, on every rank and before any byte is written, what a
    load could not restore (listing every problem), and serializes each non-tensor value
    once: ``check`` (or ``create_local_plan``) first, then ``resolve_data``."""

    prewritten: dict[MetadataIndex, StoredData]
    """Items already written (an async save's, past its staging budget): the Writer reports
    where their blocks are and writes nothing for them. Empty here; see StagedPlanner."""

    def __init__(self) -> None:
        super().__init__(flatten_sharded_tensors=False)  # set_up_planner's, where needed
        self._values: dict[str, io.BytesIO] = {}
        self._problems: list[str] | None = None
        self.prewritten = {}
        self.reuse: tuple[object, SavePlan] | None = None
        """(shape, plan): the local plan of the line's last save (global_plan.PlanCache),
        taken again for a state dict of the same shape (``plan_key``) instead of DCP making
        the same one anew (0.15 s of a save of 20,000 tensors)."""
        self.made: tuple[object, SavePlan] | None = None
        """This save's (shape, plan), for the next; None where the shape is not known."""

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: object = None,
                       is_coordinator: bool = False) -> None:
        with named_collisions("written"):
            super().set_up_planner(state_dict, storage_meta, is_coordinator)  # type: ignore[arg-type]
            self.state_dict = _sharded_flattened(self.state_dict)

    def check(self, *, tensors: bool = True) -> list[str]:
        """(all ranks, after set_up_planner) Every problem of the state dict. ``tensors=False``
        where a state dict of the same ``plan_key`` passed these checks before: they read
        only what the key holds (3 us a tensor, 0.06 s of a pause of 20,000)."""
        if self._problems is not None:
            return self._problems
        problems: list[str] = []
        self._values = {}
        for key, value in self.state_dict.items():
            if isinstance(value, torch.Tensor):
                problem = tensor_problem(key, value) if tensors else None
                if problem:
                    problems.append(problem)
                continue
            try:
                self._values[key] = serialize(key, value)
            except StateDictError as e:
                problems.append(e.message)
        self._problems = problems
        return problems

    def shape(self) -> object:
        """(after set_up_planner) What this rank's local plan and checks follow from:
        ``plan_key``, with the flattening's mappings, which the plan carries into the
        manifest (a list and a dict keyed "0" flatten alike); None where it is not known."""
        key = plan_key(self.state_dict)
        return None if key is None else (key, getattr(self, "mappings", None))

    def create_local_plan(self) -> SavePlan:
        shape = self.shape()
        same = shape is not None and self.reuse is not None and self.reuse[0] == shape
        refuse(self.check(tensors=not same))
        if same:
            assert self.reuse is not None
            self.plan = plan = self.reuse[1]
        else:
            plan = super().create_local_plan()
        self.made = None if shape is None else (shape, plan)
        return with_value_digests(plan, self._values, exact_tensors(
            plan, lambda item: self.state_dict.get(item.index.fqn)))

    def create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        """(coordinator) Refuse keys the ranks hold differently, before DCP keeps one
        rank's copy of each (``replica_problems``); warn of non-tensor values that differ."""
        refuse(replica_problems(all_plans))
        self.warn_differing_values(all_plans)
        return super().create_global_plan(all_plans)

    @staticmethod
    def warn_differing_values(all_plans: list[SavePlan]) -> None:
        differ = differing_values(all_plans)
        if differ:
            log.warning(
                "%d value(s) differ between the ranks that save them under one key; the "
                "checkpoint keeps one rank's, and every rank loads that one back: %s. Give "
                "state that differs per rank a key of its own (rank{r}.name)", len(differ),
                "; ".join(differ[:10]) + (f"; and {len(differ) - 10} more" if len(differ) > 10
                                          else ""))

    def lookup_object(self, index: MetadataIndex) -> Any:
        # a plain tensor is its own item: DCP's lookup says so too, through checks that cost
        # 5 us a tensor (0.1 s of a pause of 20,000)
        obj: Any = self.state_dict.get(index.fqn)
        if (type(obj) in PLAIN and index.offset is not None
                and len(index.offset) == obj.dim() and not any(index.offset)):
            return obj
        return super().lookup_object(index)

    def transform_object(self, write_item: WriteItem, object: object) -> object:
        if write_item.type == WriteItemType.BYTE_IO:
            done = self._values.get(write_item.index.fqn)
            if done is not None:
                return type(done)(done.getbuffer())
            return serialize(write_item.index.fqn, object)
        return object


class StagedPlanner(SafeSavePlanner):
    """The save planner of an async save's persist thread, over a local plan made and staged
    in the caller's thread (dckpt.saver). Its ``dcp.save`` gets an empty state dict: every
    item comes from the staged copy, or was written already (``prewritten``). The problems
    the caller's check found are refused here, in the collective, the same on every rank, and
    so is ``failure``, the caller's write of what did not fit the staging budget."""

    def __init__(self, plan: SavePlan, staged: dict[MetadataIndex, object],
                 prewritten: dict[MetadataIndex, StoredData], problems: list[str],
                 failure: Exception | None = None) -> None:
        super().__init__()
        self._local_plan = plan
        self._staged = staged
        self.prewritten = prewritten
        self._staged_problems = problems
        self._failure = failure

    def set_up_planner(self, state_dict: dict[str, Any], storage_meta: object = None,
                       is_coordinator: bool = False) -> None:
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        refuse(self._staged_problems)
        if self._failure is not None:
            raise self._failure
        values = {item.index.fqn: self._staged.get(item.index) for item in self._local_plan.items
                  if item.type == WriteItemType.BYTE_IO}  # this save's, not the cached plan's
        self.plan = with_value_digests(
            self._local_plan, {k: v for k, v in values.items() if isinstance(v, io.BytesIO)},
            exact_tensors(self._local_plan, lambda item: self._staged.get(item.index)))
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> Any:
        return self._staged[write_item.index]


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that (all ranks) refuses a state dict that does not fit, listing
    every problem, and loads non-tensor values with ``weights_only=True``. ``partial``: load
    the state dict's keys only, leaving the checkpoint's others unread."""

    def __init__(self, *, partial: bool = False) -> None:
        super().__init__()
        self.partial = partial
        self._spelled: dict[int, dict[str, Any]] = {}  # set_as_spelled's, for this load
        # top-level key -> an optimizer's parameters by id, where the state dict holds the
        # optimizer itself (dckpt.api): its missing state is made placed as they are
        self.optimizer_params: dict[str, dict[int, torch.Tensor]] = {}
        self._made: list[tuple[Any, Any]] = []  # what make_missing_state made, to take back
        # top-level key -> the object that loads through its load_state_dict (dckpt.api)
        self.stateful: dict[str, object] = {}
        self._meta_problems: list[str] = []
        self.tied: list[Tied] = []
        self.destinations: dict[str, Any] = {}
        """The destinations of the tied and overlapping keys, read apart (``tied``)."""

    def set_up_planner(self, state_dict: dict[str, Any], metadata: Metadata | None = None,
                       is_coordinator: bool = False) -> None:
        with named_collisions("read"):  # each step walks the state dict recursively
            self._set_up(state_dict, metadata, is_coordinator)

    def _set_up(self, state_dict: dict[str, Any], metadata: Metadata | None,
                is_coordinator: bool) -> None:
        # an object's meta tensors would load nothing (dckpt.meta_tensors): refused
        self._meta_problems = [meta_problem(k, obj, keys) for k, obj in self.stateful.items()
                               if (keys := meta_keys(state_dict.get(k), k))]
        # DCP replaces meta tensors with empty ones on the process group's device before it
        # loads them; without a group it fails, so one process gets them on the CPU here
        if not torch.distributed.is_initialized():
            materialize_meta(state_dict)
        # IMPORTANT: the save flattens the state dict, then its ShardedTensors; DCP's load
        # takes the two steps the other way round, and the ShardedTensor step drops empty
        # dicts inside lists: [None, {}] was saved as "a.0" and looked for as "a", a save
        # that no load accepted. Here the load takes them in the save's order.
        if metadata is not None:
            made = make_missing_state(state_dict, metadata, self.optimizer_params, self._made)
            if made:
                log.info("made %d optimizer state entries the checkpoint holds and the state "
                         "dict lacked (an optimizer has none before its first step), to "
                         "load into", len(made))
        sharded, self.flatten_sharded_tensors = self.flatten_sharded_tensors, False
        try:
            super().set_up_planner(state_dict, metadata, is_coordinator)
        finally:
            self.flatten_sharded_tensors = sharded
        if sharded:
            self.state_dict = _sharded_flattened(self.state_dict)
        # destinations that share memory: refused where they overlap in part; a tied key is
        # read into a twin of its own, compared with its first key's after the reads (api)
        overlapping, self.tied = shared_memory(self.state_dict)
        self._meta_problems += overlapping
        self.destinations = read_apart(self.state_dict, self.tied)

    def forget_made(self) -> None:
        """Take back the optimizer state made for this load (it failed): a caller that goes
        on finds its state dict as it gave it."""
        forget(self._made)

    def create_local_plan(self) -> LoadPlan:
        """(all ranks) Check this rank's state dict, and hand its keys and problems on to the
        coordinator, which refuses them all at once (see ``create_global_plan``)."""
        assert self.metadata is not None  # set_up_planner ran
        problems = self._meta_problems + state_dict_problems(self.state_dict, self.metadata)
        # IMPORTANT: not DefaultLoadPlanner's: where this rank lacks a key of the checkpoint
        # (FSDP1's ShardedTensor without a local shard) it takes the checkpoint for one of
        # torch 2.3's, whose keys leave lists whole, and asked for "optim.param_groups"
        plan = LoadPlan([]) if problems else local_load_plan(
            self.state_dict, self.metadata, not self.allow_partial_load)
        return dataclasses.replace(plan, planner_data=_Asked(tuple(self.state_dict),
                                                             tuple(problems)))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        """(coordinator) Refuse every rank's problems, and the checkpoint keys that no rank
        asks for unless ``partial``, in one error."""
        asked = [p.planner_data if isinstance(p.planner_data, _Asked) else _Asked((), ())
                 for p in global_plan]
        problems = list(dict.fromkeys(
            (f"rank {r}: {p}" if len(asked) > 1 else p)
            for r, a in enumerate(asked) for p in a.problems))
        assert self.metadata is not None
        unasked = [] if self.partial else unasked_keys([a.keys for a in asked], self.metadata)
        problems += [f"{k}: in the checkpoint but no rank's state dict asks for it"
                     for k in unasked]
        if problems:
            fix = "Pass a state dict with the checkpoint's keys, shapes and dtypes"
            if unasked:
                fix += (", or partial=True to load only the keys the state dicts ask for (for "
                        "example after a change of world size, where the missing ranks' own "
                        "keys have no owner)")
            if any(".state." in k for k in unasked):
                fix += (". An optimizer has no state before its first step: dckpt makes the "
                        "state a checkpoint holds whole; state sharded over the ranks "
                        "(FSDP2's) is made where the load is given the optimizer itself (its "
                        "parameters place it), or through dckpt.TrainState(model, optimizer)")
            raise StateDictError(
                listing("the state dict does not fit the checkpoint", problems) + f"\n{fix}")
        return [dataclasses.replace(p, planner_data=None)
                for p in super().create_global_plan(global_plan)]

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = (io.BytesIO(value.getvalue()) if isinstance(value, RawBytes)
               else safe_load(value.getbuffer(), f"value {read_item.dest_index.fqn!r}"))
        if self.flatten_state_dict:
            set_as_spelled(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                           obj, self._spelled)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
