"""The distinct blocks that gc finds live, and the bytes of each object they hold.

Held as numpy arrays per object (each live block's offset and length, sorted by offset: 12
bytes a block), not as a Python object per block: with 9.7 million distinct blocks in 30
checkpoints, gc took 887 MB and 34-37 s holding them as sets of Python ints, 298 MB and
14-16 s this way (benchmarks/bench_gc.py, docs/benchmarks.md). Each checkpoint's references are read in
place (a version 3 manifest's block table, without a tuple per row), sorted by object and
offset, and each object's run of them is merged into what that object already holds: only
blocks not seen before are inserted, so memory follows the distinct blocks, whatever the
number of checkpoints that share them. A block is its object and offset: an object is
written once, by one save, and its blocks do not overlap.
"""

from __future__ import annotations

import numpy as np

from dckpt.block_table import BlockTable
from dckpt.decoder import Reference

__all__ = ["LiveBlocks"]


class LiveBlocks:
    """Blocks added per checkpoint; ``bytes_per_object`` counts each distinct one once."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (offsets, lengths)

    def add(self, refs: BlockTable | list[Reference]) -> None:
        """One checkpoint's references: a block table's rows, or (object, offset, length)."""
        if isinstance(refs, BlockTable):
            names = refs.segments
            local = np.asarray(refs.segment, dtype=np.uint32)
            offset = np.asarray(refs.offset, dtype=np.uint64)
            length = np.asarray(refs.length, dtype=np.uint32)
        else:
            names = sorted({segment for segment, _, _ in refs})
            at = {name: i for i, name in enumerate(names)}
            local = np.fromiter((at[s] for s, _, _ in refs), np.uint32, len(refs))
            offset = np.fromiter((o for _, o, _ in refs), np.uint64, len(refs))
            length = np.fromiter((n for _, _, n in refs), np.uint32, len(refs))
        if not len(local):
            return
        order = _order(local, offset)
        local, offset, length = local[order], offset[order], length[order]
        del order
        first = np.ones(len(local), dtype=bool)  # the first row of each (object, offset)
        first[1:] = (local[1:] != local[:-1]) | (offset[1:] != offset[:-1])
        local, offset, length = local[first], offset[first], length[first]
        starts = np.flatnonzero(np.r_[True, local[1:] != local[:-1]])
        ends = np.r_[starts[1:], len(local)]
        for start, end in zip(starts.tolist(), ends.tolist()):
            self._merge(names[local[start]], offset[start:end], length[start:end])

    def _merge(self, name: str, offset: np.ndarray, length: np.ndarray) -> None:
        """Insert the blocks of ``name`` at ``offset`` (sorted, distinct) it lacks."""
        held = self._held.get(name)
        if held is None:
            self._held[name] = (offset.copy(), length.copy())  # not views of the manifest
            return
        kept, kept_length = held
        at = np.searchsorted(kept, offset)
        found = kept[np.minimum(at, len(kept) - 1)] == offset
        if found.all():  # shared with a checkpoint before: the common case
            return
        new = ~found
        self._held[name] = (np.insert(kept, at[new], offset[new]),
                            np.insert(kept_length, at[new], length[new]))

    def bytes_per_object(self) -> dict[str, int]:
        """Each object some block lives in -> the bytes of its distinct live blocks."""
        return {name: int(length.sum(dtype=np.uint64))
                for name, (_, length) in self._held.items()}

    def clear(self) -> None:
        """Forget every block (their memory goes)."""
        self._held = {}

    def __len__(self) -> int:
        """The distinct blocks."""
        return sum(len(offsets) for offsets, _ in self._held.values())


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
