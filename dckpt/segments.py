"""Segments: the objects a rank writes, its items' bytes cut into blocks, hashed, and the
blocks the dedup index does not hold appended (compressed where the policy says so).

The Writer fills one segment per writer thread; an async save's pause writes what its
staging budget does not hold into one of its own (dckpt.saver). Both go through
``SegmentOut``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import BinaryIO

import torch
from torch.distributed.checkpoint.planner import WriteItem

from dckpt import codec
from dckpt.blocks import cut, digest
from dckpt.dedup import BlockIndex
from dckpt.direct import direct_pad
from dckpt.dtypes import flat_bytes
from dckpt.manifest import BlockRef

__all__ = ["SegmentOut", "tensor_bytes", "byte_planes", "item_nbytes", "balance",
           "segments_for"]


_NUMPY_DTYPES = frozenset({torch.float16, torch.float32, torch.float64, torch.complex64,
                           torch.complex128, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.uint8, torch.bool})
"""Dtypes whose tensors ``numpy()`` sees as they are."""


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The tensor's elements in row-major order as bytes; no copy when already contiguous."""
    t = t.detach()
    if (t.dtype in _NUMPY_DTYPES and t.device.type == "cpu" and t.is_contiguous()
            and t.numel() and not t.is_conj() and not t.is_neg()):
        # the common case, without the two views below (7 us of 12 a tensor)
        return memoryview(t.numpy()).cast("B")  # type: ignore[arg-type]
    if t.is_conj() or t.is_neg():  # a lazy conjugate's values, not its bits
        t = t.resolve_conj().resolve_neg()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = flat_bytes(t.contiguous())
    return memoryview(flat.numpy())  # type: ignore[arg-type]


def item_nbytes(item: WriteItem) -> int:
    """A tensor item's bytes (0 for a non-tensor value)."""
    if item.tensor_data is None:
        return 0
    return math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize


def balance(sizes: list[int], bins: int) -> list[list[int]]:
    """Greedy: the largest first into the lightest bin; each bin (indices into ``sizes``, in
    the order placed) becomes one segment, written by one thread. Empty bins are dropped."""
    loads = [0] * bins
    out: list[list[int]] = [[] for _ in range(bins)]
    for k in sorted(range(len(sizes)), key=lambda k: sizes[k], reverse=True):
        i = loads.index(min(loads))
        out[i].append(k)
        loads[i] += sizes[k]
    return [b for b in out if b]


def segments_for(total_bytes: int, threads: int) -> int:
    """How many segments a rank writes: one per writer thread, but no more than one per 64
    MiB, so that small states make one object (S3 pays per request)."""
    return max(1, min(threads, math.ceil(total_bytes / (64 << 20))))



class SegmentOut:
    """Appends the bytes of items to one open segment, cut into blocks and hashed.

    An item may come in pieces (``append`` once per piece); every piece but the last must
    be a multiple of the block size, so that blocks fall where one ``append`` would cut.

    ``align`` (nonzero for a ``DirectFile``): a large item starts where its memory's pages
    fall on the file's pages (``direct_pad``; zeros fill the gap, which no block references),
    so that the file writes them from the caller's memory.
    """

    ALIGN_FROM_BYTES = 1 << 20  # smaller items are packed: the padding would cost more
    WRITE_BYTES = 64 << 20
    """A run of blocks is written in calls of at most this many bytes (a whole number of
    pages), each a sign of progress (``beat``) for the wait on the writer threads."""

    def __init__(self, f: BinaryIO, name: str, block_size: int, *, align: int = 0,
                 index: BlockIndex | None = None, compress: bool = False) -> None:
        self.f = f
        self.name = name
        self.block_size = block_size
        self.align = align
        self.index = index
        self.compress = compress
        self.offset = 0
        self.written = 0  # stored bytes written (padding aside)
        self.raw_written = 0  # what they held before compression
        self.new_blocks = 0  # blocks written (the others the index held)
        self.rewritten = 0  # items written whole for their fragmentation
        self.changed = 0.0
        """The last ``append``'s fraction of blocks written, or where it rewrote the item for
        its fragmentation, the fraction it would have written: how much the item changed."""
        self.seconds = dict.fromkeys(("copy", "hash", "lookup", "compress", "io"), 0.0)
        """Where this segment's time went (a few clock reads per block: cheap)."""
        self.beat: Callable[[], None] = _nothing
        """Called after each write: progress, for a watchdog (dckpt.watchdog)."""

    def append(self, buf: memoryview, *, planes: int = 1, block_size: int | None = None,
               min_run_bytes: int | None = None) -> list[BlockRef]:
        """Store ``buf``'s blocks (those the index does not hold); ``planes``: the byte
        planes its elements split into before compression (see dckpt.codec);
        ``block_size``: this item's, instead of the segment's; ``min_run_bytes``: write
        every block anew when reusing the index's would leave the item to be read in runs
        shorter than this on average (``too_fragmented``)."""
        size = block_size or self.block_size
        if (0 < len(buf) <= min(size, self.WRITE_BYTES)
                and not (self.align and len(buf) >= self.ALIGN_FROM_BYTES)):
            return [self._one(buf, planes)]
        return self._blocks(buf, planes, size, min_run_bytes)

    def _blocks(self, buf: memoryview, planes: int, block_size: int,
                min_run_bytes: int | None) -> list[BlockRef]:
        """``append``'s general path: any item, cut into blocks, written in runs."""
        # a large item starts where its memory's pages fall on the file's pages (DirectFile
        # writes them without a copy), padded just before its first write: an item whose
        # blocks are all known writes nothing, not even the padding
        pad = (direct_pad(self.offset, buf)
               if self.align and len(buf) >= self.ALIGN_FROM_BYTES else 0)
        seconds = self.seconds
        clock = time.perf_counter
        cuts = list(cut(len(buf), block_size))
        found: list[tuple[str, BlockRef | None]] = []
        for start, length in cuts:
            t0 = clock()
            d = digest(buf[start: start + length])
            t1 = clock()
            found.append((d, self.index.get(d, length) if self.index is not None else None))
            seconds["hash"] += t1 - t0
            seconds["lookup"] += clock() - t1
        index = self.index
        new_before, rewrite = self.new_blocks, False
        if (index is not None and min_run_bytes is not None and len(found) > 1
                and too_fragmented([ref for _, ref in found], len(buf), min_run_bytes)):
            rewrite = True
            self.changed = sum(ref is None for _, ref in found) / len(found)
            found = [(d, None) for d, _ in found]  # written whole: contiguous again
            index = None
            self.rewritten += 1
        blocks = []
        pending = [0, 0]  # raw blocks not yet written: one write for a run of them

        def flush() -> None:
            for start in range(pending[0], pending[1], self.WRITE_BYTES):
                t = clock()
                self.f.write(buf[start: min(pending[1], start + self.WRITE_BYTES)])
                seconds["io"] += clock() - t
                self.beat()

        for (start, length), (d, ref) in zip(cuts, found):
            if ref is None and index is not None:
                ref = index.get(d, length)  # a block this item wrote already (zeros, repeats)
            if ref is None:
                if pad:
                    self.f.write(bytes(pad))
                    self.offset += pad
                    pad = 0
                t = clock()
                encoded = (codec.encode(buf[start: start + length], planes) if self.compress
                           else None)
                seconds["compress"] += clock() - t
                if encoded is None:
                    ref = BlockRef(self.name, self.offset, length, length, d)
                    if pending[1] != start:
                        flush()
                        pending[0] = start
                    pending[1] = start + length
                else:
                    ref = BlockRef(self.name, self.offset, len(encoded[1]), length, d, encoded[0])
                    flush()
                    pending[0] = pending[1] = start
                    t = clock()
                    self.f.write(encoded[1])
                    seconds["io"] += clock() - t
                    self.beat()
                self._count(ref)
            blocks.append(ref)
        flush()
        if not rewrite:
            self.changed = (self.new_blocks - new_before) / max(1, len(blocks))
        return blocks

    def _one(self, buf: memoryview, planes: int) -> BlockRef:
        """``append`` of an item of one block, as ``append`` stores it, without its cutting,
        its runs and its fragmentation check: most items of a state dict are this small
        (biases, norms, an optimizer's steps), and ``append``'s generality cost 4 us of
        each (0.1 s of a save of 20,000 tensors)."""
        seconds, clock, index, length = self.seconds, time.perf_counter, self.index, len(buf)
        t0 = clock()
        d = digest(buf)
        t1 = clock()
        ref = index.get(d, length) if index is not None else None
        t2 = clock()
        seconds["hash"] += t1 - t0
        seconds["lookup"] += t2 - t1
        self.changed = 0.0 if ref is not None else 1.0
        if ref is not None:
            return ref
        encoded = codec.encode(buf, planes) if self.compress else None
        t3 = clock()
        seconds["compress"] += t3 - t2
        if encoded is None:
            ref = BlockRef(self.name, self.offset, length, length, d)
            self.f.write(buf)
        else:
            ref = BlockRef(self.name, self.offset, len(encoded[1]), length, d, encoded[0])
            self.f.write(encoded[1])
        seconds["io"] += clock() - t3
        self.beat()
        self._count(ref)
        return ref

    def _count(self, ref: BlockRef) -> None:
        """A block written at the end of the segment: the offset, the counters, the index."""
        self.offset += ref.length
        self.written += ref.length
        self.raw_written += ref.raw_length
        self.new_blocks += 1
        if self.index is not None:
            t = time.perf_counter()
            self.index.add(ref)
            self.seconds["lookup"] += time.perf_counter() - t

    def append_tensor(self, t: torch.Tensor, window: torch.Tensor) -> list[BlockRef]:
        """A whole tensor's blocks: a CPU tensor's straight from its memory, a device
        tensor's through ``window`` (host uint8 memory, a whole number of blocks), one
        window at a time."""
        planes = byte_planes(t.dtype)
        if t.device.type == "cpu":
            return self.append(tensor_bytes(t), planes=planes)
        flat = flat_bytes(t.detach().resolve_conj().resolve_neg().contiguous())
        blocks: list[BlockRef] = []
        for start in range(0, flat.numel(), window.numel()):
            piece = window[: min(window.numel(), flat.numel() - start)]
            t0 = time.perf_counter()
            piece.copy_(flat[start: start + piece.numel()])
            self.seconds["copy"] += time.perf_counter() - t0
            blocks += self.append(memoryview(piece.numpy()), planes=planes)  # type: ignore[arg-type]
        return blocks


def read_runs(refs: list[BlockRef | None]) -> int:
    """Reads a restore of these blocks takes: the ranges of consecutive stored bytes they
    cover, each object's blocks in storage order (a restore reads them so: see
    ``reads.spans``). ``None`` stands for a block about to be written: an item's new blocks
    are written in one run, so together they are one more."""
    stored = sorted({(ref.segment, ref.offset, ref.length) for ref in refs if ref is not None})
    runs = int(any(ref is None for ref in refs))
    end: tuple[str, int] | None = None
    for segment, offset, length in stored:
        runs += end != (segment, offset)
        end = (segment, offset + length)
    return runs


def too_fragmented(refs: list[BlockRef | None], nbytes: int, min_run_bytes: int) -> bool:
    """Whether a restore would read these blocks (``nbytes`` in all) in runs of fewer than
    ``min_run_bytes`` on average: the policy ``SaveConfig.min_read_run_bytes``."""
    runs = read_runs(refs)
    return runs > 1 and nbytes < runs * min_run_bytes


def byte_planes(dtype: torch.dtype) -> int:
    """Byte planes worth splitting a tensor of ``dtype`` into: one per byte of a float."""
    if dtype.is_complex:
        return dtype.itemsize // 2
    return dtype.itemsize if dtype.is_floating_point and dtype.itemsize in (2, 4, 8) else 1


def _nothing() -> None:
    pass
