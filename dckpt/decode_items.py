"""A manifest's items decoded and checked (pure, no torch): entries, chunks that tile their
tensor, block rows, each field's type and bounds; anything else is a FormatError naming the
field. ``dckpt.decoder`` decodes the rest of the manifest with the same checks."""

from __future__ import annotations

import math
import re
from functools import partial

from dckpt.errors import FormatError
from dckpt.layout import MAX_STEP
from dckpt.manifest import (
    CODECS,
    DTYPE_SIZES,
    ENCODINGS,
    MAX_BLOCK_BYTES,
    MAX_OBJECT_BYTES,
    MAX_TENSOR_BYTES,
    MAX_VALUE_BYTES,
    BlockRef,
    BlockTable,
    ChunkEntry,
    Entry,
    StoredData,
    TensorEntry,
    ValueEntry,
)

__all__ = ["entry", "Rows", "Blocks", "check_obj", "check_int", "check_ints", "check_str",
           "check_float", "short"]

_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_HEX_RE = re.compile(r"[0-9a-f]*")
_CODEC_SET = frozenset(CODECS)


def check_obj(value: object, where: str, required: set[str],
              optional: frozenset[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(value).__name__}")
    missing = required - value.keys()
    unknown = value.keys() - required - optional
    if missing or unknown:
        raise FormatError(f"{where}: missing fields {sorted(missing)}, unknown fields "
                          f"{sorted(unknown)}; the manifest is damaged or of another version")
    return value


def check_int(value: object, where: str, minimum: int = 0, maximum: int = MAX_STEP) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise FormatError(f"{where}: expected an integer in [{minimum}, {maximum}], "
                          f"found {short(value)}")
    return value


def check_ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise FormatError(f"{where}: expected a list of at most 64 integers, found {short(value)}")
    return tuple(check_int(v, where, maximum=MAX_TENSOR_BYTES) for v in value)


def check_str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{where}: expected a string, found {short(value)}")
    return value


def check_float(value: object, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > 1e15:  # type: ignore[arg-type]
        raise FormatError(f"{where}: expected a finite number, found {short(value)}")
    return float(value)  # type: ignore[arg-type]


def short(value: object) -> str:
    text = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _blocks_fast(rows: list, segments: list[str]) -> tuple[BlockRef, ...] | None:
    """The block rows checked column by column (a differential checkpoint's manifest holds
    10^5 of them, and a restore waits for their decoding); None when any check fails, and
    ``_blocks_checked`` then names the first bad block."""
    if not rows:
        return ()
    if set(map(type, rows)) != {list} or set(map(len, rows)) != {6}:
        return None
    segs, offs, lens, raws, digests, codecs = zip(*rows)
    ints = segs + offs + lens + raws
    if set(map(type, ints)) != {int} or min(ints) < 0 or max(segs) >= len(segments):
        return None
    if max(raws) > MAX_BLOCK_BYTES or max(map(int.__add__, offs, lens)) > MAX_OBJECT_BYTES:
        return None
    if (set(map(type, digests)) != {str} or set(map(len, digests)) != {32}
            or not _HEX_RE.fullmatch("".join(digests))):
        return None
    if set(map(type, codecs)) != {str}:
        return None
    kinds = set(codecs)
    if not kinds <= _CODEC_SET:
        return None
    if kinds == {"raw"}:
        if lens != raws:
            return None
    elif any(n > r or (c == "raw" and n != r) for n, r, c in zip(lens, raws, codecs)):
        return None
    # built by tuple.__new__ as BlockRef._make does, without its Python-level call per block
    make = partial(tuple.__new__, BlockRef)
    return tuple(map(make, zip(map(segments.__getitem__, segs), offs, lens, raws, digests,
                               codecs)))


def _blocks_checked(rows: list, where: str, segments: list[str]) -> tuple[BlockRef, ...]:
    blocks = []
    for i, b in enumerate(rows):
        w = f"{where}.blocks[{i}]"
        if not isinstance(b, list) or len(b) != 6:
            raise FormatError(f"{w}: expected [segment, offset, length, raw_length, digest, codec]")
        seg = check_int(b[0], w)
        if seg >= len(segments):
            raise FormatError(f"{w}: segment index {seg} out of range ({len(segments)} segments)")
        digest, codec = check_str(b[4], w), check_str(b[5], w)
        if not _DIGEST_RE.fullmatch(digest):
            raise FormatError(f"{w}: digest {digest!r} is not 32 lowercase hex digits")
        if codec not in CODECS:
            raise FormatError(f"{w}: unknown codec {codec!r}; known: {', '.join(CODECS)}")
        ref = BlockRef(segments[seg], check_int(b[1], w, maximum=MAX_OBJECT_BYTES),
                       check_int(b[2], w, maximum=MAX_BLOCK_BYTES),
                       check_int(b[3], w, maximum=MAX_BLOCK_BYTES), digest, codec)
        if ref.offset + ref.length > MAX_OBJECT_BYTES:
            raise FormatError(f"{w}: a block at offset {ref.offset} lies past the largest "
                              f"object dckpt writes ({MAX_OBJECT_BYTES} bytes)")
        if ref.length > ref.raw_length or (codec == "raw" and ref.length != ref.raw_length):
            raise FormatError(f"{w}: {ref.length} stored bytes for {ref.raw_length} raw bytes "
                              f"is impossible for codec {codec!r}")
        blocks.append(ref)
    return tuple(blocks)


class Rows:
    """A version 3 manifest's block table as its items take their rows: in order, each row
    once (``take``), every row by the end (``finish``)."""

    def __init__(self, table: BlockTable) -> None:
        self.table = table
        self.next = 0

    def take(self, value: object, nbytes: int) -> StoredData | None:
        """The rows ``[first, count]`` as an item's stored data, or None when they are not
        the next rows or their raw bytes are not ``nbytes``."""
        if type(value) is not list or len(value) != 2:
            return None
        first, count = value
        if (type(first) is not int or type(count) is not int or first != self.next
                or count < 0 or first + count > self.table.count
                or self.table.raw_bytes(first, count) != nbytes):
            return None
        self.next = first + count
        return StoredData(nbytes, table=self.table, first=first, count=count)

    def why(self, value: object, nbytes: int) -> str:
        if (type(value) is not list or len(value) != 2
                or any(type(v) is not int or v < 0 for v in value)):
            return f"expected [first row, row count], found {short(value)}"
        first, count = value
        if first != self.next:
            return f"rows from {first}, where the item before ends at row {self.next}"
        if first + count > self.table.count:
            return f"rows {first}..{first + count - 1} of a table of {self.table.count}"
        return (f"blocks hold {self.table.raw_bytes(first, count)} bytes, nbytes says "
                f"{nbytes}")

    def finish(self, name: str) -> None:
        if self.next != self.table.count:
            raise FormatError(f"{name}: the block table holds {self.table.count} rows, the "
                              f"items use {self.next}; the manifest is damaged")


Blocks = list[str] | Rows
"""Where an item's blocks are: version 1 and 2 rows name segments by index; version 3
items take rows of the block table."""


def _data(doc: dict, where: str, source: Blocks, maximum: int) -> StoredData:
    nbytes = check_int(doc["nbytes"], f"{where}.nbytes", maximum=maximum)
    rows = doc["blocks"]
    if isinstance(source, Rows):
        data = source.take(rows, nbytes)
        if data is None:
            raise FormatError(f"{where}.blocks: {source.why(rows, nbytes)}")
        return data
    if not isinstance(rows, list):
        raise FormatError(f"{where}.blocks: expected a list")
    # a few rows (a small tensor's): one by one is faster than column by column
    blocks = _blocks_fast(rows, source) if len(rows) > 4 else None
    if blocks is None:
        blocks = _blocks_checked(rows, where, source)
    if sum(b.raw_length for b in blocks) != nbytes:
        raise FormatError(f"{where}: blocks hold {sum(b.raw_length for b in blocks)} bytes, "
                          f"nbytes says {nbytes}")
    return StoredData(nbytes, blocks)


def _tiles(size: tuple[int, ...], boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> str:
    """Why the boxes (offsets, sizes) do not cover a tensor of ``size`` exactly once, or ''."""
    volume = math.prod(size)
    covered = sum(math.prod(s) for _, s in boxes)
    if covered != volume:
        return (f"its chunks cover {covered} elements of the {volume} its size "
                f"{list(size)} holds")
    if len(size) == 0 or len(boxes) < 2:
        return ""
    # equal volumes: exact when no two boxes overlap; sweep along the first dimension
    live = sorted((b for b in boxes if math.prod(b[1])), key=lambda b: b[0][0])
    active: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for offsets, sizes in live:
        active = [a for a in active if a[0][0] + a[1][0] > offsets[0]]
        for o, s in active:
            if all(oa < ob + sb and ob < oa + sa
                   for oa, sa, ob, sb in zip(offsets, sizes, o, s)):
                return f"chunks at offsets {list(o)} and {list(offsets)} overlap"
        active.append((offsets, sizes))
    return ""


_TENSOR_KEYS = {"kind", "dtype", "size", "requires_grad", "chunks"}
_CHUNK_KEYS = {"offsets", "sizes", "nbytes", "blocks"}


def _block_fast(row: object, segments: list[str]) -> BlockRef | None:
    """One block row checked as ``_blocks_checked`` checks it, or None (which names it)."""
    if type(row) is not list or len(row) != 6:
        return None
    seg, offset, length, raw_length, digest, codec = row
    if (type(seg) is not int or type(offset) is not int or type(length) is not int
            or type(raw_length) is not int or not 0 <= seg < len(segments)
            or offset < 0 or length < 0 or raw_length > MAX_BLOCK_BYTES
            or offset + length > MAX_OBJECT_BYTES or type(digest) is not str
            or len(digest) != 32 or not _HEX_RE.fullmatch(digest) or type(codec) is not str
            or codec not in _CODEC_SET
            or length > raw_length or (codec == "raw" and length != raw_length)):
        return None
    return tuple.__new__(BlockRef, (segments[seg], offset, length, raw_length, digest, codec))


def _whole_tensor_fast(doc: dict, source: Blocks) -> TensorEntry | None:
    """The common tensor entry, one chunk that covers it, checked as ``entry`` checks it
    without building a field's name for a message it will not write (a third of the decode
    of a manifest of many small tensors); None for anything else, which ``entry`` then
    checks and names."""
    if doc.keys() != _TENSOR_KEYS or doc["kind"] != "tensor":
        return None
    dtype, size, requires_grad, chunks = (doc["dtype"], doc["size"], doc["requires_grad"],
                                          doc["chunks"])
    itemsize = DTYPE_SIZES.get(dtype) if type(dtype) is str else None
    if (itemsize is None or type(size) is not list or len(size) > 64
            or type(requires_grad) is not bool or type(chunks) is not list or len(chunks) != 1
            or any(type(n) is not int or not 0 <= n <= MAX_TENSOR_BYTES for n in size)):
        return None
    chunk = chunks[0]
    if (type(chunk) is not dict or chunk.keys() != _CHUNK_KEYS or chunk["sizes"] != size
            or any(type(n) is not int for n in chunk["sizes"])):  # True == 1, 1.0 == 1
        return None
    offsets, nbytes, rows = chunk["offsets"], chunk["nbytes"], chunk["blocks"]
    volume = math.prod(size) * itemsize
    if (type(offsets) is not list or len(offsets) != len(size) or any(o != 0 for o in offsets)
            or any(type(o) is not int for o in offsets) or volume > MAX_TENSOR_BYTES
            or type(nbytes) is not int or nbytes != volume):
        return None
    if isinstance(source, Rows):
        data = source.take(rows, nbytes)
        if data is None:
            return None
        return TensorEntry(dtype, tuple(size), requires_grad,
                           (ChunkEntry(tuple(offsets), tuple(size), data),))
    if type(rows) is not list:
        return None
    if len(rows) <= 4:
        few = [_block_fast(row, source) for row in rows]
        blocks = None if None in few else tuple(b for b in few if b is not None)
    else:
        blocks = _blocks_fast(rows, source)
    if blocks is None or sum(b.raw_length for b in blocks) != nbytes:
        return None
    return TensorEntry(dtype, tuple(size), requires_grad,
                       (ChunkEntry(tuple(offsets), tuple(size), StoredData(nbytes, blocks)),))


def entry(fqn: str, doc: object, source: Blocks, version: int) -> Entry:
    """One item of the manifest, checked; FormatError naming the field that is wrong."""
    if type(doc) is dict:
        fast = _whole_tensor_fast(doc, source)
        if fast is not None:
            return fast
    return _entry_checked(fqn, doc, source, version)


def _entry_checked(fqn: str, doc: object, source: Blocks, version: int) -> Entry:
    where = f"items[{fqn!r}]"
    if not isinstance(doc, dict) or doc.get("kind") not in ("tensor", "value"):
        raise FormatError(f"{where}: expected an object with kind 'tensor' or 'value'")
    if doc["kind"] == "value":
        if version == 1:
            check_obj(doc, where, {"kind", "nbytes", "blocks"})
            encoding = "torch"
        else:
            check_obj(doc, where, {"kind", "encoding", "nbytes", "blocks"})
            encoding = check_str(doc["encoding"], f"{where}.encoding")
            if encoding not in ENCODINGS:
                raise FormatError(f"{where}: unknown encoding {encoding!r}; known: "
                                  f"{', '.join(ENCODINGS)}")
        return ValueEntry(_data(doc, where, source, MAX_VALUE_BYTES), encoding)
    check_obj(doc, where, {"kind", "dtype", "size", "requires_grad", "chunks"})
    dtype = check_str(doc["dtype"], f"{where}.dtype")
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    size = check_ints(doc["size"], f"{where}.size")
    if math.prod(size) * itemsize > MAX_TENSOR_BYTES:
        raise FormatError(f"{where}: a {dtype} tensor of size {list(size)} is larger than "
                          f"any dckpt stores ({MAX_TENSOR_BYTES} bytes)")
    if not isinstance(doc["requires_grad"], bool) or not isinstance(doc["chunks"], list):
        raise FormatError(f"{where}: requires_grad must be a bool and chunks a list")
    chunks = []
    for i, c in enumerate(doc["chunks"]):
        w = f"{where}.chunks[{i}]"
        check_obj(c, w, {"offsets", "sizes", "nbytes", "blocks"})
        offsets = check_ints(c["offsets"], f"{w}.offsets")
        sizes = check_ints(c["sizes"], f"{w}.sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > n for o, s, n in zip(offsets, sizes, size)):
            raise FormatError(f"{w}: box offsets={list(offsets)} sizes={list(sizes)} "
                              f"does not fit a tensor of size {list(size)}")
        data = _data(c, w, source, MAX_TENSOR_BYTES)
        if data.nbytes != math.prod(sizes) * itemsize:
            raise FormatError(f"{w}: holds {data.nbytes} bytes, a {dtype} box of sizes "
                              f"{list(sizes)} needs {math.prod(sizes) * itemsize}")
        chunks.append(ChunkEntry(offsets, sizes, data))
    why = _tiles(size, [(c.offsets, c.sizes) for c in chunks])
    if why:
        raise FormatError(f"{where}: {why}; the manifest is damaged")
    return TensorEntry(dtype, size, doc["requires_grad"], tuple(chunks))
