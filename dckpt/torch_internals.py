"""The private parts of torch that dckpt relies on, in one place.

Each is a torch internal with no public equivalent (or whose public one costs a copy);
``tests/unit/test_torch_internals.py`` checks on every torch the suite runs against that they
still exist and behave as used here. Nothing else in dckpt imports a private torch name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint._sharded_tensor_utils import (
    _flatten_sharded_tensors as flatten_sharded_tensors,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict as load_state_dict
from torch.distributed.checkpoint.utils import _DistWrapper as DistWrapper
from torch.distributed.tensor import DTensor

__all__ = ["DTensor", "is_dtensor", "local_shard", "with_local_shard", "narrow_tensor_by_index",
           "is_sharded_tensor", "held_tensors", "foreach_copy",
           "set_element", "set_as_spelled", "flatten_sharded_tensors", "load_state_dict", "DistWrapper"]

# narrow_tensor_by_index(tensor, offsets, sizes): a tensor's box, as DCP's own reader takes it
# set_element(root, path, value): put a loaded value at its path in a nested state dict, the
#   way DCP's default load planner does for flattened keys
# flatten_sharded_tensors(state_dict): ShardedTensors of 2-D parallelism as flat ones, the
#   step DCP's default planners take beside flattening the state dict
# load_state_dict(state_dict, storage_reader, process_group, coordinator_rank, no_dist,
#   planner): dcp.load without its rule for top-level Stateful values, which checks every
#   value against the runtime protocol twice (dckpt.api applies the rule itself)
# DistWrapper(group, use_dist, coordinator_rank): DCP's object collectives, .reduce_scatter
#   and .all_reduce, which carry each rank's exception to every rank as a CheckpointException;
#   dckpt.global_plan runs a save's steps on them, as dcp.save does
# ShardedTensor: FSDP1's sharded tensors, recognised (is_sharded_tensor, held_tensors)
# foreach_copy(dsts, srcs): torch._foreach_copy_, each source into its destination in one
#   call (the optimizers' own); a Python loop of copy_ costs 10 us a tensor

foreach_copy = torch._foreach_copy_


def is_dtensor(obj: object) -> bool:
    return isinstance(obj, DTensor)


def is_sharded_tensor(obj: object) -> bool:
    """A ShardedTensor (FSDP1's sharded state dicts): a torch.Tensor whose own strides,
    sizes in bytes and flags raise; its local shards hold the memory."""
    return isinstance(obj, ShardedTensor)


def held_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The memory this rank holds of ``t``: a DTensor's local shard, a ShardedTensor's
    local shards (none on a rank without one), or ``t`` itself."""
    if is_dtensor(t):
        return [local_shard(t)]  # type: ignore[arg-type]
    if isinstance(t, ShardedTensor):
        return [shard.tensor for shard in t.local_shards()]
    return [t]


def local_shard(t: DTensor) -> torch.Tensor:
    """This rank's shard of ``t``, as stored (``to_local()`` adds an autograd view)."""
    return t._local_tensor


def with_local_shard(t: DTensor, local: torch.Tensor) -> Any:
    """A DTensor like ``t`` (mesh, placements, global shape and stride) over ``local``
    (public; kept here beside ``local_shard``, its inverse)."""
    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                              shape=t.shape, stride=t.stride())


def set_as_spelled(root: dict, path: tuple, value: object, spelled: dict[int, dict[str, Any]]
                   ) -> None:
    """Put a loaded value at its path, along the keys ``root`` holds: DCP's flattening spells
    every dict key as a string (its traverse takes ``str(key)``), and its ``set_element`` set
    a value loaded under an int key (an optimizer's parameter ids) beside it, under "0", the
    int key keeping its old value. Dicts and lists as ``set_element`` walks them (a missing
    container made, a list extended); anything else left to ``set_element``. ``spelled``:
    each dict's keys by their strings, made once per dict, for a dict the path's string is
    not a key of."""
    node: Any = root
    for i, p in enumerate(path):
        if isinstance(node, dict):
            if p not in node:
                names = spelled.get(id(node))
                if names is None:
                    names = spelled[id(node)] = {str(k): k for k in node}
                p = names.get(p, p)
        elif isinstance(node, list) and type(p) is int:
            node.extend([None] * (p + 1 - len(node)))
        else:
            set_element(root, path, value)
            return
        if i == len(path) - 1:
            node[p] = value
            return
        if (node.get(p) if isinstance(node, dict) else node[p]) is None:
            node[p] = {} if type(path[i + 1]) is str else []
        node = node[p]
