"""The distinct blocks that gc finds live, and the bytes of each object they hold.

Held as numpy columns (object number, offset, length: 16 bytes a block), not as a Python
object per block: with 9.7 million distinct blocks in 30 checkpoints, gc took 887 MB and
40-46 s holding them as sets of Python ints, 700 MB and 23 s as columns
(benchmarks/bench_gc.py, docs/benchmarks.md). Each checkpoint's references are appended as
they are read (a version 3 manifest's block table in place, without a tuple per row);
duplicates (a block shared by checkpoints, or twice within one) are dropped by a sort once
the appended ones outgrow the kept ones, so memory stays within a few times the distinct
blocks, whatever the number of checkpoints. A block is its object and offset: an object is
written once, by one save, and its blocks do not overlap.
"""

from __future__ import annotations

import numpy as np

from dckpt.block_table import BlockTable
from dckpt.decoder import Reference

__all__ = ["LiveBlocks"]

MERGE_ROWS = 1 << 22
"""Appended rows that trigger a merge, at least (4M rows: 64 MB)."""


class LiveBlocks:
    """Blocks added per checkpoint; ``bytes_per_object`` counts each distinct one once."""

    def __init__(self, merge_rows: int = MERGE_ROWS) -> None:
        self._ids: dict[str, int] = {}
        self._names: list[str] = []
        self._kept: tuple[np.ndarray, np.ndarray, np.ndarray] = _empty()
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._merge_rows = merge_rows

    def add(self, refs: BlockTable | list[Reference]) -> None:
        """One checkpoint's references: a block table's rows, or (object, offset, length)."""
        if isinstance(refs, BlockTable):
            names = refs.segments
            local = np.asarray(refs.segment, dtype=np.uint32)
            offset = np.array(refs.offset, dtype=np.uint64)  # copies: not the manifest's
            length = np.array(refs.length, dtype=np.uint32)  # bytes kept until the merge
        else:
            names = sorted({segment for segment, _, _ in refs})
            at = {name: i for i, name in enumerate(names)}
            local = np.fromiter((at[s] for s, _, _ in refs), np.uint32, len(refs))
            offset = np.fromiter((o for _, o, _ in refs), np.uint64, len(refs))
            length = np.fromiter((n for _, _, n in refs), np.uint32, len(refs))
        if not len(local):
            return
        ids = np.fromiter((self._id(n) for n in names), np.uint32, len(names))
        self._pending.append((ids[local], offset, length))
        self._pending_rows += len(local)
        if self._pending_rows >= max(self._merge_rows, len(self._kept[0])):
            self._merge()

    def bytes_per_object(self) -> dict[str, int]:
        """Each object some block lives in -> the bytes of its distinct live blocks."""
        self._merge()
        ids, _, length = self._kept
        count = np.bincount(ids, minlength=len(self._names))
        total = np.bincount(ids, weights=length, minlength=len(self._names))  # exact to 2^53
        return {name: int(total[i]) for i, name in enumerate(self._names) if count[i]}

    def clear(self) -> None:
        """Forget every block (their memory goes)."""
        self._kept, self._pending, self._pending_rows = _empty(), [], 0

    def __len__(self) -> int:
        """The distinct blocks (after a merge of what was added since the last one)."""
        self._merge()
        return len(self._kept[0])

    def _id(self, name: str) -> int:
        found = self._ids.get(name)
        if found is None:
            found = self._ids[name] = len(self._names)
            self._names.append(name)
        return found

    def _merge(self) -> None:
        if not self._pending:
            return
        parts = [self._kept, *self._pending]
        self._kept, self._pending, self._pending_rows = _empty(), [], 0
        ids = np.concatenate([p[0] for p in parts])  # a column at a time, each part's
        offset = np.concatenate([p[1] for p in parts])  # freed once all three are copied
        length = np.concatenate([p[2] for p in parts])
        del parts
        order = _order(ids, offset)
        ids = ids[order]
        offset = offset[order]
        length = length[order]
        del order
        first = np.ones(len(ids), dtype=bool)  # the first row of each (object, offset)
        first[1:] = (ids[1:] != ids[:-1]) | (offset[1:] != offset[:-1])
        self._kept = (ids[first], offset[first], length[first])


def _order(ids: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """The rows sorted by object, then offset: one sort of a packed key where both fit in 64
    bits (offsets below 2^40 beside 2^24 objects, say), else a sort on the two columns."""
    shift = int(offset.max()).bit_length()
    if shift + int(ids.max()).bit_length() <= 64:
        key = ids.astype(np.uint64)
        key <<= np.uint64(shift)
        key |= offset
        return np.argsort(key)
    return np.lexsort((offset, ids))


def _empty() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.empty(0, np.uint32), np.empty(0, np.uint64), np.empty(0, np.uint32))
