"""What the coordinator commits: the manifest's entries, from DCP's metadata and every
rank's report of where each item's blocks are, and the check that every object they
reference is there, whole, before the manifest is created (writer.py)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from dckpt import dist, layout
from dckpt.dtypes import dtype_name
from dckpt.errors import CommitError
from dckpt.manifest import BlockRef, ChunkEntry, Entry, StoredData, TensorEntry, ValueEntry
from dckpt.storage import Store

__all__ = ["Stored", "sums", "entries", "planner_data", "check_references"]


@dataclass(frozen=True)
class Stored:
    """One rank's report for one item: where its blocks are (WriteResult.storage_data)."""

    data: StoredData
    written: int = 0  # stored bytes this save wrote for it (the rest it references)
    raw_written: int = 0  # what they held before compression
    encoding: str = "torch"  # a value's: torch.save bytes, or an io.BytesIO's ("bytes")


def sums(blocks: tuple[BlockRef, ...]) -> tuple[int, int]:
    """(stored, raw) bytes of ``blocks``."""
    return sum(b.length for b in blocks), sum(b.raw_length for b in blocks)


def entries(metadata: Metadata,
            stored: dict[tuple[str, tuple[int, ...] | None], Stored]) -> dict[str, Entry]:
    """The manifest's items: DCP's metadata of each, where the ranks stored it."""
    items: dict[str, Entry] = {}
    dtypes: dict[torch.dtype, str] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            value = stored[fqn, None]
            items[fqn] = ValueEntry(value.data, value.encoding)
        elif isinstance(md, TensorStorageMetadata):
            chunks = tuple([ChunkEntry(tuple(c.offsets), tuple(c.sizes),
                                       stored[fqn, c.offsets].data) for c in md.chunks])
            dtype = md.properties.dtype
            name = dtypes.get(dtype) or dtypes.setdefault(dtype, dtype_name(dtype))
            items[fqn] = TensorEntry(name, tuple(md.size), bool(md.properties.requires_grad),
                                     chunks)
    return items


def planner_data(data: object) -> dict[str, list[str | int]] | None:
    """DCP's default planner maps each flat key to its path in the nested state dict."""
    if not isinstance(data, dict):
        return None
    out = {k: list(v) for k, v in data.items() if isinstance(v, (tuple, list))}
    try:
        json.dumps(out)
    except (TypeError, ValueError):
        return None
    return out


def check_references(store: Store, ends: dict[str, int], *, step: int, attempt: str,
                     shared_storage: bool = True) -> None:
    """(coordinator) Every object the manifest references (``ends``: each one's furthest
    block end) is there, whole, as the coordinator sees the store: one listing per attempt
    folder. An earlier attempt's object may be gone (a gc with a grace period shorter than
    this save took it); this save's own may never have been visible here (a rank that wrote
    to another folder, or to its node's own disk): a checkpoint no load could read is not
    committed. Without ``shared_storage`` (the memory tier: every node its own) this save's
    own objects are not looked for."""
    mine = f"{layout.DATA_DIR}/{attempt}"
    folders: dict[str, dict[str, int]] = {}
    for segment, end in ends.items():
        folder, _, base = segment.rpartition("/")
        if folder != mine or shared_storage:
            folders.setdefault(folder, {})[base] = end
    for folder, wanted in folders.items():
        sizes = store.list_sizes(folder)
        bad = sorted(b for b, end in wanted.items() if sizes.get(b, -1) < end)
        if not bad:
            continue
        if folder == mine:
            raise CommitError(
                f"step {step}: {len(bad)} objects the ranks wrote are missing or short in "
                f"{store.url} as the coordinator (rank {dist.rank()}) sees it "
                f"({folder}/{bad[0]}...); every rank must save to the same shared storage "
                "and URL (not a node-local path); nothing was committed")
        raise CommitError(
            f"step {step} references blocks in {len(bad)} objects of {folder} that are "
            f"missing or short in {store.url} (a gc whose min_age_s is shorter than this save "
            "took them, or a rank wrote them where the coordinator cannot see: every rank "
            "must save to the same shared storage); nothing was committed, save again")
