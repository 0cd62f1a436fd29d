"""What a load reads, planned: the manifest as DCP's Metadata (each box's stored data in
its ``storage_data``), where a box's elements lie in its stored chunk, and the read-once
plan of replicated state (every rank loads a box whole: one rank reads it, the others get
it by broadcast; dckpt.reader carries it out).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem

from dckpt.dtypes import dtype_from_name
from dckpt.manifest import ChunkEntry, Manifest, StoredData, TensorEntry

__all__ = ["to_dcp_metadata", "box_range", "share_replicated", "Shared"]


def to_dcp_metadata(m: Manifest) -> Metadata:
    """The manifest as DCP Metadata; storage_data maps each box to its StoredData."""
    state: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    storage: dict[MetadataIndex, tuple[str, ChunkEntry | StoredData]] = {}
    for fqn, e in m.items.items():
        if isinstance(e, TensorEntry):
            props = TensorProperties(dtype=dtype_from_name(e.dtype), requires_grad=e.requires_grad)
            state[fqn] = TensorStorageMetadata(
                props, torch.Size(e.size),
                [ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)) for c in e.chunks])
            for c in e.chunks:
                storage[MetadataIndex(fqn, c.offsets)] = (e.dtype, c)
        else:
            state[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = (e.encoding, e.data)
    planner_data = ({k: tuple(v) for k, v in m.planner_data.items()}
                    if m.planner_data is not None else None)
    return Metadata(state_dict_metadata=state, planner_data=planner_data, storage_data=storage,
                    version=m.dcp_version)


def box_range(sizes: tuple[int, ...], offsets: tuple[int, ...],
              lengths: tuple[int, ...]) -> tuple[int, int] | None:
    """Element range [start, end) of a box inside a row-major chunk, or None when the box's
    elements are not one contiguous run."""
    n = len(sizes)
    k = n  # the first dimension, from the right, that is not taken whole
    while k > 0 and offsets[k - 1] == 0 and lengths[k - 1] == sizes[k - 1]:
        k -= 1
    if any(lengths[j] != 1 for j in range(k - 1)):
        return None
    strides = [math.prod(sizes[j + 1:]) for j in range(n)]
    start = sum(o * s for o, s in zip(offsets, strides))
    return start, start + math.prod(lengths)


@dataclass(frozen=True)
class Shared:
    """One replicated box in a rank's plan: read by ``owner``, broadcast to the others."""

    index: MetadataIndex
    owner: int
    item: ReadItem
    """This rank's read item for it (its destination), left out of the rank's reads unless
    the rank is the owner."""


def _whole(item: ReadItem, stored: object) -> bool:
    return (isinstance(stored, ChunkEntry) and tuple(item.lengths) == stored.sizes
            and not any(item.storage_offsets) and not any(item.dest_offsets))


def share_replicated(plans: list[LoadPlan], storage: dict,
                     near: Callable[[int, MetadataIndex], bool] | None = None) -> list[LoadPlan]:
    """Plans where every box that all ranks read whole, each into one tensor, is read by
    one rank only (owners chosen by least bytes so far, among the ranks ``near`` its bytes
    where any is) and broadcast in a fixed order."""
    per_rank: list[dict[MetadataIndex, list[ReadItem]]] = []
    for plan in plans:
        boxes: dict[MetadataIndex, list[ReadItem]] = {}
        for item in plan.items:
            boxes.setdefault(item.storage_index, []).append(item)
        per_rank.append(boxes)
    common = set(per_rank[0])
    for boxes in per_rank[1:]:
        common &= boxes.keys()
    replicated = sorted(
        (i for i in common
         if all(len(b[i]) == 1 and _whole(b[i][0], storage[i][1]) for b in per_rank)),
        key=lambda i: (i.fqn, tuple(i.offset or ()), i.index or 0))
    if not replicated:
        return plans
    load = [0] * len(plans)
    owners: dict[MetadataIndex, int] = {}
    for index in sorted(replicated, key=lambda i: -storage[i][1].data.nbytes):
        owner = min(range(len(plans)),
                    key=lambda r: (near is not None and not near(r, index), load[r]))
        owners[index] = owner
        load[owner] += storage[index][1].data.nbytes
    out = []
    for rank, plan in enumerate(plans):
        items = [it for it in plan.items
                 if it.storage_index not in owners or owners[it.storage_index] == rank]
        shared = [Shared(i, owners[i], per_rank[rank][i][0]) for i in replicated]
        out.append(dataclasses.replace(plan, items=items, storage_data=shared))
    return out
