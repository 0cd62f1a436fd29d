"""A restarted job's optimizer state, made before the load fills it.

An optimizer has no state until its first step: ``optimizer.state_dict()`` of a restarted
job holds ``{"state": {}, "param_groups": [...]}``, and a load into it found the checkpoint's
``optim.state.0.exp_avg`` asked for by no one (dckpt refused it; DCP's own load leaves such
keys unread, silently). ``torch.load`` users never met this: they got the saved dict back
whole. So before a load plans, each optimizer state dict in the destination gets, in place,
the entries the checkpoint holds for it and it lacks: an empty tensor of the stored size and
dtype, None for a value. The load fills them, and ``optimizer.load_state_dict`` (or dckpt's
rule for a top-level optimizer) takes the result, casting each tensor to its parameter's
device and dtype as it always does. DCP's ``get_state_dict`` makes the state by stepping the
optimizer once with a learning rate of 0 instead, which counts a step where no checkpoint
loads; nothing here steps.

Only state stored whole is made (one chunk covering the tensor): a sharded optimizer's state
(FSDP2's DTensors) needs its parameters' placements, which ``dckpt.TrainState`` brings.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

__all__ = ["make_missing_state"]

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


def _placeholder(md: object) -> object:
    """An empty tensor of the stored size and dtype, None for a value."""
    if isinstance(md, TensorStorageMetadata):
        return torch.empty(md.size, dtype=md.properties.dtype)
    assert isinstance(md, BytesStorageMetadata)
    return None


def _path(fqn: str, metadata: Metadata) -> tuple[str | int, ...]:
    mappings = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    path = mappings.get(fqn)
    return tuple(path) if path else tuple(fqn.split("."))


def _put(state: dict, ids: dict[str, Any], rel: tuple[str | int, ...], value: object) -> bool:
    """Put ``value`` at ``rel`` (a parameter id, then the state's own keys and indices) in
    ``state``, making the containers on the way; False where something is already there or
    the id is not one of the optimizer's parameters."""
    pid = ids.get(str(rel[0]))
    if pid is None:
        return False
    node: Any = state
    keys: list[Any] = [pid, *rel[1:]]
    for i, key in enumerate(keys):
        if isinstance(node, list) and isinstance(key, int):
            node.extend([None] * (key + 1 - len(node)))
            there = node[key] is not None
        elif isinstance(node, dict):
            there = key in node
        else:
            return False
        if i == len(keys) - 1:
            if not there:
                node[key] = value
            return not there
        if not there:
            node[key] = {} if isinstance(keys[i + 1], str) else []
        node = node[key]
    return False


def make_missing_state(state_dict: dict, metadata: Metadata) -> list[str]:
    """(each rank) In each optimizer state dict within ``state_dict``, make in place the state
    entries the checkpoint holds for its parameters and it lacks (module docstring); for an
    optimizer whose stored state is sharded, nothing (part of a state would load as if it
    were whole). Returns the checkpoint keys made."""
    made: list[str] = []
    for opt_path, opt in _optimizers(state_dict, ()):
        prefix = ".".join(map(str, (*opt_path, "state"))) + "."
        stored = [(fqn, md) for fqn, md in metadata.state_dict_metadata.items()
                  if fqn.startswith(prefix)]
        if any(isinstance(md, TensorStorageMetadata) and not _whole(md) for _, md in stored):
            continue
        ids = {str(p): p for g in opt["param_groups"] for p in g["params"]}
        for fqn, md in stored:
            path = _path(fqn, metadata)
            rel = path[len(opt_path) + 1:]
            if path[: len(opt_path) + 1] != (*opt_path, "state") or not rel:
                continue  # a key spelled otherwise than this optimizer's: leave it be
            if _put(opt["state"], ids, rel, _placeholder(md)):
                made.append(fqn)
    return made
