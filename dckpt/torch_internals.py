"""The private parts of torch that dckpt relies on, in one place.

Each is a torch internal with no public equivalent (or whose public one costs a copy);
``tests/unit/test_torch_internals.py`` checks on every torch the suite runs against that they
still exist and behave as used here. Nothing else in dckpt imports a private torch name.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint._sharded_tensor_utils import (
    _flatten_sharded_tensors as flatten_sharded_tensors,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict as load_state_dict
from torch.distributed.checkpoint.utils import _DistWrapper as DistWrapper
from torch.distributed.tensor import DTensor

__all__ = ["DTensor", "is_dtensor", "local_shard", "with_local_shard", "narrow_tensor_by_index",
           "set_element", "flatten_sharded_tensors", "load_state_dict", "DistWrapper"]

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


def is_dtensor(obj: object) -> bool:
    return isinstance(obj, DTensor)


def local_shard(t: DTensor) -> torch.Tensor:
    """This rank's shard of ``t``, as stored (``to_local()`` adds an autograd view)."""
    return t._local_tensor


def with_local_shard(t: DTensor, local: torch.Tensor) -> Any:
    """A DTensor like ``t`` (mesh, placements, global shape and stride) over ``local``
    (public; kept here beside ``local_shard``, its inverse)."""
    return DTensor.from_local(local, t.device_mesh, t.placements, run_check=False,
                              shape=t.shape, stride=t.stride())
