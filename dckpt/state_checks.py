"""What a state dict must be: savable (every tensor one a load could restore, ranks that
agree on what a shared key holds) and, to load, fitting a checkpoint (its keys, shapes and
dtypes, and destinations that hold values in place). Each check lists every problem it
finds, named by key; the planners refuse with them, the same on every rank."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan

from dckpt.dtypes import dtype_name
from dckpt.errors import DckptError, StateDictError, listing
from dckpt.torch_internals import held_tensors, is_sharded_tensor

__all__ = ["RANK_LOCAL", "PLAIN", "state_dict_problems", "unasked_keys", "tensor_problem",
           "named_collisions", "refuse", "replica_problems", "differing_values"]

PLAIN = (torch.Tensor, torch.nn.Parameter)
"""The tensor types that are their own one shard (no DTensor, ShardedTensor or lazy
parameter): checked and looked up on paths of their own."""

RANK_LOCAL = "__rank"
"""A key component ``__rank<r>`` marks a value only rank r saved and loads (random states):
a checkpoint's rank-local keys that a state dict does not ask for are no problem, whatever
``partial`` says (the world size changed, or the value is optional)."""


def _rank_local(key: str) -> bool:
    return any(part.startswith(RANK_LOCAL) for part in key.split("."))


def state_dict_problems(flat: dict[str, object], metadata: Metadata) -> list[str]:
    """Every way the (flattened) destination state dict of one rank does not fit the
    checkpoint. Keys of the checkpoint that no rank asks for are ``unasked_keys``'s question:
    it needs every rank's keys."""
    stored = metadata.state_dict_metadata
    missing = [k for k in flat if k not in stored]
    shaped = _shape_hints(missing, stored) if missing else {}
    problems = [f"{k}: in the state dict but not in the checkpoint{shaped.get(k, '')}"
                for k in missing]
    for key, value in flat.items():
        md = stored.get(key)
        if md is None:
            continue
        if isinstance(md, TensorStorageMetadata):
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key}: the checkpoint holds a tensor, the state dict a "
                                f"{type(value).__name__}")
                continue
            problem = tensor_problem(key, value, into=True)
            if problem:  # before its size: a nested tensor has none
                problems.append(problem)
                continue
            if tuple(value.size()) != tuple(md.size):
                problems.append(f"{key}: shape {list(value.size())} in the state dict, "
                                f"{list(md.size)} in the checkpoint")
            if value.dtype != md.properties.dtype:
                problems.append(f"{key}: dtype {value.dtype} in the state dict, "
                                f"{md.properties.dtype} in the checkpoint")
        elif isinstance(md, BytesStorageMetadata) and isinstance(value, torch.Tensor):
            problems.append(f"{key}: the checkpoint holds a non-tensor value, the state dict a "
                            "tensor")
    return problems


def _shape_hints(missing: list[str], stored: Iterable[str]) -> dict[str, str]:
    """For keys of the state dict that the checkpoint lacks, where it holds the same path
    shaped otherwise: nested under the key (a dict or list saved, a value given), or as
    one value above it (the other way round)."""
    under: dict[str, list[str]] = {}
    for k in stored:
        parts = k.split(".")
        for i in range(1, len(parts)):
            under.setdefault(".".join(parts[:i]), []).append(k)
    stored_keys = set(stored)
    compiled = {_uncompiled(k): k for k in stored_keys if "_orig_mod" in k}
    if any("_orig_mod" in k for k in missing):
        compiled.update((_uncompiled(k), k) for k in stored_keys)
    hints = {}
    why = (": one side's module was torch.compile'd (its keys hold _orig_mod); save and load "
           "the module alike, or through dckpt.TrainState, which keys it as the module itself")
    for k in missing:
        other = compiled.get(_uncompiled(k))
        if other is not None and other != k:
            hints[k], why = f"; the checkpoint holds it as {other}{why}", ""  # said once
            continue
        if k in under:
            inside = under[k]
            hints[k] = (f"; the checkpoint holds {k} as a nested dict or list ("
                        f"{', '.join(inside[:3])}{f' and {len(inside) - 3} more' if len(inside) > 3 else ''}"
                        f"): give {k} that structure")
            continue
        parts = k.split(".")
        above = next((p for i in range(1, len(parts))
                      if (p := ".".join(parts[:i])) in stored_keys), None)
        if above is not None:
            hints[k] = (f"; the checkpoint holds {above} as one value: give {above} a value, "
                        "not a dict or list")
    return hints


def _uncompiled(key: str) -> str:
    """``key`` without the ``_orig_mod`` components a torch.compile'd module's keys hold."""
    return ".".join(p for p in key.split(".") if p != "_orig_mod")


def unasked_keys(asked: Iterable[Iterable[str]], metadata: Metadata) -> list[str]:
    """The checkpoint's keys that no rank's state dict asks for (``asked``: each rank's
    keys), rank-local ones aside: ranks may hold keys of their own (a data loader's
    position, ``rank3.x``), so the question is about the union of every rank's keys."""
    union = set().union(*map(set, asked))
    return sorted(k for k in metadata.state_dict_metadata
                  if k not in union and not _rank_local(k))


def tensor_problem(key: str, t: torch.Tensor, *, into: bool = False) -> str | None:
    """Why a tensor cannot be saved, or with ``into``, receive a checkpoint's values in
    place; None when it can."""
    held: Sequence[torch.Tensor]
    every: Sequence[torch.Tensor]
    if type(t) in PLAIN:  # the common case, checked once per tensor at every save and load
        held = every = (t,)
    elif torch.nn.parameter.is_lazy(t):  # its shape and flags raise
        return (f"{key}: an uninitialized parameter (a lazy module before its first forward) "
                "has no shape or values; run a forward pass first")
    else:
        held = held_tensors(t)
        # a ShardedTensor answers for its shards only (its own flags raise)
        every = held if is_sharded_tensor(t) else [t, *held]
    if any(x.is_nested for x in every):  # DCP fails inside the write, on its sizes
        return (f"{key}: a nested tensor is not supported; "
                + ("load into" if into else "save") + " its components (t.unbind()) as a "
                "list of tensors")
    if layout := next((x.layout for x in every if x.layout != torch.strided), None):
        return (f"{key}: layout {layout} is not supported; "
                + ("load into" if into else "convert it to") + " a dense (strided) tensor")
    if any(x.device.type == "meta" for x in held):
        return (f"{key}: a meta tensor has no memory; materialize it first (for example "
                "module.to_empty(device=...))")
    if into:
        if any(stride == 0 and size > 1  # an empty one shares no element: torch gives
               for x in held if x.numel()  # some stride 0 (2 x 0 x 1, made by arithmetic)
               for size, stride in zip(x.shape, x.stride())):
            return (f"{key}: its elements share memory (an expanded view, stride 0); load "
                    "into a tensor that owns its elements (.clone() it)")
        return None
    try:
        dtype_name(t.dtype)
    except DckptError as e:
        return f"{key}: {e}"
    return None


@contextlib.contextmanager
def named_collisions(done: str) -> Iterator[None]:
    """DCP's flattening of a state dict whose keys collide, or that holds itself, as a
    StateDictError that says so."""
    try:
        yield
    except RecursionError:  # DCP flattens recursively: a CommitError said only this
        raise StateDictError(
            "the state dict holds itself (a dict or list inside itself, at some depth) or is "
            f"nested deeper than Python's recursion limit; nothing was {done}") from None
    except ValueError as e:
        if "duplicated flatten key" not in str(e):
            raise
        raise StateDictError(
            f"{str(e).rsplit(' ', 1)[-1]}: two entries of the state dict flatten to this key "
            "(keys are joined with dots and spelled as strings: a key with a dot beside nested "
            f"dicts that spell the same path, as {{'a.b': x, 'a': {{'b': y}}}}, or keys such "
            f"as 1 and '1' in one dict); rename one. Nothing was {done}") from None


def refuse(problems: list[str]) -> None:
    """Raise StateDictError listing ``problems`` of a state dict to save, if any."""
    if problems:
        raise StateDictError(listing("the state dict cannot be saved", problems)
                             + "\nNothing was written")


def replica_problems(plans: list[SavePlan]) -> list[str]:
    """Keys that several ranks save differently: tensors of different shapes or dtypes (whole
    tensors, or a DTensor's global size), or a tensor on one rank and another value on
    another. DCP keeps one rank's copy of a key that every rank holds, and the checkpoint
    would not load into the others' state (a tensor and a value under one key failed inside
    DCP's plan merge, on an assertion)."""
    first: dict[str, tuple[int, torch.Size | None, torch.dtype | None]] = {}
    problems: dict[str, str] = {}

    def what(size: torch.Size | None, dtype: torch.dtype | None) -> str:
        return "a value that is not a tensor" if size is None else f"shape {list(size)} {dtype}"

    for rank, plan in enumerate(plans):  # every rank's items: one dict lookup each
        for item in plan.items:
            data = item.tensor_data
            size, dtype = (None, None) if data is None else (data.size, data.properties.dtype)
            fqn = item.index.fqn
            seen = first.get(fqn)
            if seen is None:
                first[fqn] = (rank, size, dtype)
            elif (seen[1] != size or seen[2] != dtype) and fqn not in problems:
                problems[fqn] = (
                    f"{fqn}: {what(seen[1], seen[2])} on rank {seen[0]}, {what(size, dtype)} "
                    f"on rank {rank}; a key saved by several ranks must hold the same tensor "
                    "on each (give state that differs per rank a key of its own)")
    return list(problems.values())


def differing_values(plans: list[SavePlan]) -> list[str]:
    """Values (non-tensor ones, and small integer tensors: dckpt.planner.exact_tensors) that
    several ranks save under one key with different contents: DCP keeps one rank's
    (whichever its dedup picks), and every rank loads that one back: a per-rank data
    loader's position, or a generator's state, saved under a shared key comes back the same
    on every rank. Ranks that sent no digests are not judged."""
    first: dict[str, tuple[int, str]] = {}
    differ: dict[str, list[int]] = {}
    for rank, plan in enumerate(plans):
        for fqn, d in getattr(plan.planner_data, "value_digests", {}).items():
            seen = first.setdefault(fqn, (rank, d))
            if seen[1] != d:
                differ.setdefault(fqn, []).append(rank)
    return [f"{fqn} (rank {first[fqn][0]} holds another value than rank"
            f"{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks[:5]))}"
            f"{' and more' if len(ranks) > 5 else ''})" for fqn, ranks in differ.items()]
