"""DCP load planner: checks the state dict against the checkpoint before any byte is read,
and loads non-tensor values without running code from the checkpoint."""

from __future__ import annotations

import io
import pickle

import torch
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, Metadata,
                                                   TensorStorageMetadata)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

from dckpt.errors import StateDictError, UnsafeValueError

__all__ = ["SafeLoadPlanner", "state_dict_problems", "safe_load", "RANK_LOCAL"]

RANK_LOCAL = "__rank"
"""A key component ``__rank<r>`` marks a value only rank r saved and loads (random states):
a checkpoint's rank-local keys that a state dict does not ask for are no problem, whatever
``partial`` says (the world size changed, or the value is optional)."""


def _rank_local(key: str) -> bool:
    return any(part.startswith(RANK_LOCAL) for part in key.split("."))


def state_dict_problems(flat: dict[str, object], metadata: Metadata, *,
                        partial: bool = False) -> list[str]:
    """Every way the (flattened) destination state dict does not fit the checkpoint;
    ``partial``: the checkpoint may hold keys the state dict does not ask for."""
    stored = metadata.state_dict_metadata
    problems = [f"{k}: in the state dict but not in the checkpoint" for k in flat if k not in stored]
    if not partial:
        problems += [f"{k}: in the checkpoint but not in the state dict (pass partial=True "
                     "to load only the state dict's keys)" for k in stored
                     if k not in flat and not _rank_local(k)]
    for key, value in flat.items():
        md = stored.get(key)
        if md is None:
            continue
        if isinstance(md, TensorStorageMetadata):
            if not isinstance(value, torch.Tensor):
                problems.append(f"{key}: the checkpoint holds a tensor, the state dict a "
                                f"{type(value).__name__}")
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


def safe_load(raw: bytes | memoryview, what: str) -> object:
    """Load a stored non-tensor value with ``weights_only=True``; refuse anything else."""
    try:
        return torch.load(io.BytesIO(raw), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise UnsafeValueError(
            f"{what}: refused to load a value that needs code to run "
            f"(torch.load(weights_only=True) said: {str(e).splitlines()[0]}). If you saved this "
            "type yourself, allow it with torch.serialization.add_safe_globals") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that (all ranks) refuses a state dict that does not fit, listing
    every problem, and loads non-tensor values with ``weights_only=True``. ``partial``: load
    the state dict's keys only, leaving the checkpoint's others unread."""

    def __init__(self, *, partial: bool = False) -> None:
        super().__init__()
        self.partial = partial

    def create_local_plan(self) -> LoadPlan:
        problems = state_dict_problems(self.state_dict, self.metadata, partial=self.partial)
        if problems:
            raise StateDictError(
                f"the state dict does not fit the checkpoint ({len(problems)} problems):\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nPass a state dict with the checkpoint's keys, shapes and dtypes")
        return super().create_local_plan()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = safe_load(value.getbuffer(), f"value {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
