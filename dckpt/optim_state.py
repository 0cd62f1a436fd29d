"""A restarted job's optimizer state, made before the load fills it.

An optimizer has no state until its first step: ``optimizer.state_dict()`` of a restarted
job holds ``{"state": {}, "param_groups": [...]}``, and a load into it found the checkpoint's
``optim.state.0.exp_avg`` asked for by no one (dckpt refused it; DCP's own load leaves such
keys unread, silently). ``torch.load`` users never met this: they got the saved dict back
whole. So before a load plans, each optimizer state dict in the destination gets, in place,
the entries the checkpoint holds for it and it lacks: an empty tensor of the stored size and
dtype, None for a value (taken back if the load fails: nothing unread is left behind). The
load fills them, and ``optimizer.load_state_dict`` (or dckpt's rule for a top-level
optimizer) takes the result, casting each tensor to its parameter's device and dtype as it
always does. DCP's ``get_state_dict`` makes the state by stepping the optimizer once with a
learning rate of 0 instead, which counts a step where no checkpoint loads; nothing here
steps.

State stored whole (one chunk covering the tensor) is made anywhere. A sharded optimizer's
state (FSDP2's DTensors) needs its parameters' placements: it is made where the state dict
holds the optimizer itself at its top level (``dckpt.api`` hands its parameters over), as
``torch.empty_like`` of the parameter, and otherwise not at all (``dckpt.TrainState`` brings
the placements its own way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from dckpt.torch_internals import is_dtensor

__all__ = ["make_missing_state", "params_by_id", "forget"]

_KEYS = {"state", "param_groups"}


def _optimizer_like(value: object) -> bool:
    """What ``Optimizer.state_dict()`` returns: exactly "state" (a dict) and "param_groups"
    (dicts that list their parameters' ids)."""
    return (isinstance(value, dict) and value.keys() == _KEYS and isinstance(value["state"], dict)
            and isinstance(value["param_groups"], list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    for g in value["param_groups"]))


def _optimizers(node: object, path: tuple[str | int, ...]) -> Iterator[tuple[tuple, dict]]:
    """Each optimizer state dict within ``node``, with its path as DCP's flattening spells
    it (dict keys as strings, list indices as ints)."""
    if _optimizer_like(node):
        yield path, node  # type: ignore[misc]  # a dict, checked
    elif isinstance(node, dict):
        for k, v in node.items():
            if isinstance(v, dict | list):
                yield from _optimizers(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            if isinstance(v, dict | list):
                yield from _optimizers(v, (*path, i))


def _whole(md: TensorStorageMetadata) -> bool:
    return (len(md.chunks) == 1 and list(md.chunks[0].sizes) == list(md.size)
            and not any(md.chunks[0].offsets))


def _makeable(md: object, param: torch.Tensor | None) -> bool:
    """Whether ``_placeholder`` can make the entry: a value, a tensor stored whole, or one
    shaped as its parameter, a DTensor, whose placements it takes."""
    return (not isinstance(md, TensorStorageMetadata) or _whole(md)
            or (param is not None and is_dtensor(param) and tuple(md.size) == tuple(param.shape)))


def _placeholder(md: object, param: torch.Tensor | None) -> object:
    """An empty tensor of the stored size and dtype (a DTensor placed as its parameter where
    the parameter is one of that shape; on its device), None for a value."""
    if not isinstance(md, TensorStorageMetadata):
        assert isinstance(md, BytesStorageMetadata)
        return None
    dtype = md.properties.dtype
    if param is not None and tuple(md.size) == tuple(param.shape):
        return torch.empty_like(param, dtype=dtype)
    return torch.empty(md.size, dtype=dtype, device=None if param is None else param.device)


def _path(fqn: str, metadata: Metadata) -> tuple[str | int, ...]:
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    path = mappings.get(fqn)
    return tuple(path) if path else tuple(fqn.split("."))


def _put(state: dict, rel: tuple[Any, ...], make: Callable[[], object],
         undo: list[tuple[Any, Any]]) -> bool:
    """Put ``make()`` at ``rel`` (a parameter id, then the state's own keys and indices) in
    ``state``, making the containers on the way; False (nothing made) where something is
    already there. ``undo`` gets the (container, key) of the first thing made."""
    node: Any = state
    made_any = False
    for i, key in enumerate(rel):
        if isinstance(node, list) and isinstance(key, int):
            node.extend([None] * (key + 1 - len(node)))
            there = node[key] is not None
        elif isinstance(node, dict):
            there = key in node
        else:
            return False
        if not there and not made_any:
            undo.append((node, key))
            made_any = True
        if i == len(rel) - 1:
            if not there:
                node[key] = make()
            return not there
        if not there:
            node[key] = {} if isinstance(rel[i + 1], str) else []
        node = node[key]
    return False


def forget(undo: list[tuple[Any, Any]]) -> None:
    """Take back what ``make_missing_state`` made (a load that failed): a dict's new key
    removed, a list's new slot emptied again."""
    for node, key in reversed(undo):
        if isinstance(node, dict):
            node.pop(key, None)
        else:
            node[key] = None
    undo.clear()


def _missing(state: dict, rel: tuple[Any, ...]) -> bool:
    node: Any = state
    for key in rel:
        if isinstance(node, dict):
            there = key in node
        else:
            there = (isinstance(node, list) and isinstance(key, int) and key < len(node)
                     and node[key] is not None)
        if not there:
            return True
        node = node[key]
    return False


def params_by_id(optimizer: object, packed: object) -> dict[int, torch.Tensor] | None:
    """An optimizer's parameters by the ids its ``state_dict()`` (``packed``) gives them; None
    for anything else."""
    if not isinstance(optimizer, torch.optim.Optimizer) or not _optimizer_like(packed):
        return None
    assert isinstance(packed, dict)
    return {pid: p for group, ids in zip(optimizer.param_groups, packed["param_groups"])
            for pid, p in zip(ids["params"], group["params"])}


def make_missing_state(state_dict: dict, metadata: Metadata,
                       params: dict[str, dict[int, torch.Tensor]] | None = None,
                       undo: list[tuple[Any, Any]] | None = None) -> list[str]:
    """(each rank) In each optimizer state dict within ``state_dict``, make in place the state
    entries the checkpoint holds for its parameters and it lacks (module docstring).
    ``params``: for a top-level key holding an optimizer itself, its parameters by id, so
    that sharded state (FSDP2's DTensors) is made placed as its parameter. An optimizer any
    of whose missing entries cannot be made gets none (part of a state would load as if it
    were all). Returns the checkpoint keys made; ``undo`` gets what ``forget`` takes back
    where the load fails (the tensors made are uninitialized: the load fills every one)."""
    made: list[str] = []
    for opt_path, opt in _optimizers(state_dict, ()):
        prefix = ".".join(map(str, (*opt_path, "state"))) + "."
        ids = {str(p): p for g in opt["param_groups"] for p in g["params"]}
        by_id = (params or {}).get(str(opt_path[0])) if len(opt_path) == 1 else None
        missing = []
        for fqn, md in metadata.state_dict_metadata.items():
            if not fqn.startswith(prefix):
                continue
            path = _path(fqn, metadata)
            rel = path[len(opt_path) + 1:]
            pid = ids.get(str(rel[0])) if rel else None
            if path[: len(opt_path) + 1] != (*opt_path, "state") or pid is None:
                continue  # spelled otherwise, or not one of its parameters: left to the plan
            rel = (pid, *rel[1:])
            if _missing(opt["state"], rel):
                missing.append((fqn, rel, md, None if by_id is None else by_id.get(pid)))
        if not all(_makeable(md, param) for _, _, md, param in missing):
            continue
        for fqn, rel, md, param in missing:
            if _put(opt["state"], rel, partial(_placeholder, md, param),
                    [] if undo is None else undo):
                made.append(fqn)
    return made
