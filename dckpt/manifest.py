"""The on-disk manifest: frozen dataclasses -> versioned JSON, sealed with its checksum
(pure; docs/format.md is the spec). dckpt.decoder reads it back, checking every field.

It imports no torch (``python -m dckpt.prefetch`` decodes manifests before torch is loaded):
dtypes are names and item sizes here; dckpt.dtypes maps them to torch's.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, pairwise
from typing import Any

import xxhash

from dckpt.block_table import (
    CODECS,
    MAX_BLOCK_BYTES,
    MAX_OBJECT_BYTES,
    BlockRef,
    BlockTable,
    extents,
    join_columns,
    pack,
    pack_columns,
)
from dckpt.errors import IntegrityError
from dckpt.layout import MAX_STEP

__all__ = [
    "FORMAT", "VERSION", "BlockRef", "StoredData", "ChunkEntry", "TensorEntry", "ValueEntry",
    "Manifest", "Summary", "encode", "stored_datas", "extents", "DTYPE_SIZES", "MAX_BLOCK_BYTES",
    "MAX_VALUE_BYTES", "seal", "unseal", "metric_ok", "CODECS", "MAX_OBJECT_BYTES", "BlockTable",
]

FORMAT = "dckpt.manifest"
VERSION = 3
READS = (1, 2, 3)
"""Versions this dckpt reads: 1 (no checksum, values always torch.save bytes), 2 (block
rows in JSON) and 3 (a block table)."""

# IMPORTANT: the names are part of the format; add, never rename.
DTYPE_SIZES: dict[str, int] = {
    "float16": 2, "float32": 4, "float64": 8, "bfloat16": 2, "complex32": 4, "complex64": 8,
    "complex128": 16, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1, "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
}
MAX_VALUE_BYTES = 1 << 30
"""No non-tensor value is larger once serialized (a save refuses one that is: store such
data as a tensor); a reader allocates a value's bytes before it reads them."""
MAX_TENSOR_BYTES = 1 << 56
MAX_WORLD_SIZE = 1 << 24
ENCODINGS = ("torch", "bytes")
"""A value's stored bytes: ``torch.save`` output (loaded with ``weights_only=True``), or the
contents of an ``io.BytesIO``, handed back as one (never unpickled)."""
_SEAL = re.compile(rb',"checksum":"([0-9a-f]{32})"}$')


class StoredData:
    """The bytes of one stored item, as the concatenation of its blocks' raw bytes.

    Immutable. A decoded version 3 manifest's items hold rows of its ``BlockTable`` and
    build their ``blocks`` when first asked (a rank reads its own items' blocks, not every
    rank's: at 10^6 references a tuple of named tuples per block is 0.5 KB each)."""

    __slots__ = ("_blocks", "_count", "_first", "_table", "nbytes")

    def __init__(self, nbytes: int, blocks: tuple[BlockRef, ...] | None = None, *,
                 table: BlockTable | None = None, first: int = 0, count: int = 0) -> None:
        if (blocks is None) == (table is None):
            raise ValueError("StoredData takes its blocks or a table's rows: one of the two")
        init = object.__setattr__
        init(self, "nbytes", nbytes)
        init(self, "_blocks", blocks)
        init(self, "_table", table)
        init(self, "_first", first)
        init(self, "_count", count)

    nbytes: int
    _blocks: tuple[BlockRef, ...] | None
    _table: BlockTable | None
    _first: int
    _count: int

    @property
    def blocks(self) -> tuple[BlockRef, ...]:
        blocks = self._blocks
        if blocks is None:  # threads that race here build equal tuples: either one is kept
            assert self._table is not None
            blocks = self._table.refs(self._first, self._count)
            object.__setattr__(self, "_blocks", blocks)  # a cache: the value never changes
        return blocks

    @property
    def count(self) -> int:
        """How many blocks, without building them."""
        return len(self._blocks) if self._blocks is not None else self._count

    @property
    def block_size(self) -> int:
        """The raw length of the first block (the size the item was cut into: the last block
        may be shorter), without building the references; 0 when there is none."""
        if self._table is not None:
            return self._table.raw_length[self._first] if self._count else 0
        return self.blocks[0].raw_length if self.blocks else 0

    def spans(self) -> Iterator[tuple[str, int, int]]:
        """(segment, offset, length) of each block, without building the references."""
        if self._table is not None:
            return self._table.spans(self._first, self._count)
        return ((b[0], b[1], b[2]) for b in self.blocks)

    def extents(self) -> dict[str, int]:
        """``extents`` of the blocks, without building them."""
        if self._table is not None:
            return self._table.extents(self._first, self._count)
        return extents(self.blocks)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"StoredData is immutable: cannot set {name}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StoredData):
            return NotImplemented
        return self.nbytes == other.nbytes and self.blocks == other.blocks

    def __hash__(self) -> int:
        return hash((self.nbytes, self.blocks))

    def __repr__(self) -> str:
        return f"StoredData(nbytes={self.nbytes}, blocks={self.blocks!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # pickled by DCP's gather of every rank's write results: the blocks of a large item
        # as a block table (its bytes copied: 37 a block), a small one's as plain tuples (a
        # named tuple pickles through a Python call per block: 0.8 s against 0.3 s per
        # 300,000 blocks, docs/benchmarks.md)
        table = self._table
        if table is not None:
            return _stored_table, (self.nbytes, b"".join(table.columns(self._first,
                                                                       self._count)),
                                   table.segments)
        if len(self.blocks) >= _TABLE_FROM:
            segments = sorted({b[0] for b in self.blocks})
            index = {name: i for i, name in enumerate(segments)}
            return _stored_table, (self.nbytes, pack(list(self.blocks), index), segments)
        return _stored_data, (self.nbytes, tuple(map(tuple, self.blocks)))


_TABLE_FROM = 64
"""Blocks from which a stored item pickles as a table."""


def _stored_data(nbytes: int, blocks: tuple[tuple[Any, ...], ...]) -> StoredData:
    make = partial(tuple.__new__, BlockRef)  # as the decoder builds them: no call per block
    return StoredData(nbytes, tuple(map(make, blocks)))


def _stored_table(nbytes: int, raw: bytes, segments: list[str]) -> StoredData:
    table = BlockTable(raw, segments)  # from a peer of this job: its own bytes, not a file's
    return StoredData(nbytes, table=table, first=0, count=table.count)


@dataclass(frozen=True)
class ChunkEntry:
    """One saved shard of a tensor: the box at ``offsets`` of extent ``sizes``."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    data: StoredData


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    size: tuple[int, ...]
    requires_grad: bool
    chunks: tuple[ChunkEntry, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.data.nbytes for c in self.chunks)


@dataclass(frozen=True)
class ValueEntry:
    """A non-tensor value: torch.save bytes loaded with weights_only=True (``encoding``
    ``"torch"``), or an io.BytesIO's contents (``"bytes"``)."""

    data: StoredData
    encoding: str = "torch"

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


Entry = TensorEntry | ValueEntry


@dataclass(frozen=True)
class Manifest:
    step: int
    attempt: str
    created_at: float
    world_size: int
    items: dict[str, Entry]
    metrics: dict[str, float | int | str | bool | None] = field(default_factory=dict)
    bytes_logical: int = 0
    bytes_written: int = 0
    phase_s: dict[str, float] = field(default_factory=dict)
    block_size_bytes: int = 0
    dcp_version: str | None = None
    planner_data: dict[str, list[str | int]] | None = None

    def segments(self) -> list[str]:
        """Every object this checkpoint needs, in a stable order."""
        return sorted(self.extents())

    def extents(self) -> dict[str, int]:
        """Per object, the bytes it must hold for this checkpoint (``extents``), without
        building a decoded manifest's references: one pass over the rows of its table."""
        datas = [d for _, d in self.datas()]
        table = datas[0]._table if datas else None
        if table is not None and all(  # consecutive rows of one table: as decoded
                d._table is table and d._first == c._first + c._count
                for c, d in pairwise(datas)):
            first = datas[0]._first
            return table.extents(first, datas[-1]._first + datas[-1]._count - first)
        ends = extents(chain.from_iterable(d.blocks for d in datas if d._table is None))
        for d in datas:
            if d._table is not None:
                for segment, end in d.extents().items():
                    if end > ends.get(segment, -1):
                        ends[segment] = end
        return ends

    def refs(self) -> Iterator[BlockRef]:
        """Every block reference, in manifest order: ``blocks()`` without the keys, at C
        speed (a manifest may hold 10^6)."""
        return chain.from_iterable(d.blocks for _, d in self.datas())

    def spans(self) -> Iterator[tuple[str, int, int]]:
        """(segment, offset, length) of every block, in manifest order, without building a
        decoded manifest's references."""
        return chain.from_iterable(d.spans() for _, d in self.datas())

    def blocks(self) -> Iterator[tuple[str, StoredData, BlockRef]]:
        """Every block reference, with its item's key and stored data, in manifest order."""
        for fqn, e in self.items.items():
            for d in stored_datas(e):
                for b in d.blocks:
                    yield fqn, d, b

    def datas(self) -> Iterator[tuple[str, StoredData]]:
        """Every stored item (a value, or a tensor's chunk), with its key, in manifest order."""
        for fqn, e in self.items.items():
            for d in stored_datas(e):
                yield fqn, d


@dataclass(frozen=True)
class Summary:
    """A manifest's header, what a listing shows (``decoder.summary``): its items unread."""

    step: int
    attempt: str
    created_at: float
    world_size: int
    metrics: dict[str, float | int | str | bool | None]
    bytes_logical: int
    bytes_written: int
    phase_s: dict[str, float]


def stored_datas(entry: Entry) -> list[StoredData]:
    if isinstance(entry, TensorEntry):
        return [c.data for c in entry.chunks]
    return [entry.data]


# ---------------------------------------------------------------- encode


def _json_metric(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan", "inf", "-inf"
    return value


def seal(body: bytes) -> bytes:
    """A JSON object's bytes with its own checksum as the last field: the xxh3-128 of the
    bytes without that field (``body``)."""
    if not body.endswith(b"}") or body == b"{}":
        raise ValueError("seal expects the bytes of a non-empty JSON object")
    return body[:-1] + b',"checksum":"' + xxhash.xxh3_128_hexdigest(body).encode() + b'"}'


def unseal(raw: bytes, name: str) -> None:
    """Check the checksum ``seal`` added; IntegrityError when it is missing or does not match
    (the manifest is damaged)."""
    match = _SEAL.search(raw, max(0, len(raw) - 64))  # it ends the bytes: no scan of them
    if match is None:
        raise IntegrityError(f"{name}: the checksum field does not end the manifest; it is "
                             "truncated or damaged")
    h = xxhash.xxh3_128()  # over the bytes seal was given, without copying them
    h.update(memoryview(raw)[: match.start()])
    h.update(b"}")
    found = h.hexdigest()
    if found != match.group(1).decode():
        raise IntegrityError(f"{name}: the manifest's bytes have xxh3-128 {found}, its checksum "
                             f"says {match.group(1).decode()}; the manifest is damaged")


def encode(m: Manifest, *, segments: list[str] | None = None) -> bytes:
    """The manifest's bytes: JSON, its items and then its block table last, sealed. The
    items are written from templates, not built as dicts for ``json.dumps`` (10 us an item,
    0.2 s of the commit of a save of 20,000 tensors); every string in them but the keys is
    one the format names (a dtype, an encoding), and the keys are JSON-escaped.
    ``segments``: ``m.segments()``, where the caller has them (a pass over every block)."""
    segments = m.segments() if segments is None else segments
    index = {name: i for i, name in enumerate(segments)}
    doc = {
        "format": FORMAT, "version": VERSION, "step": m.step, "attempt": m.attempt,
        "created_at": m.created_at, "world_size": m.world_size,
        "metrics": {k: _json_metric(v) for k, v in m.metrics.items()},
        "bytes_logical": m.bytes_logical, "bytes_written": m.bytes_written,
        "phase_s": m.phase_s, "block_size_bytes": m.block_size_bytes,
        "dcp_version": m.dcp_version, "planner_data": m.planner_data,
        "segments": segments,
    }
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    body = [head[:-1], ',"items":{']
    add = body.append
    key = json.encoder.encode_basestring_ascii  # what json.dumps writes for a key
    lists: dict[tuple[int, ...], str] = {}  # sizes and offsets repeat: (0,), (4096,)

    def ints(values: tuple[int, ...]) -> str:
        text = lists.get(values)
        if text is None:
            text = lists[values] = "[" + ",".join([str(int(v)) for v in values]) + "]"
        return text

    tables: list[list[bytes]] = []  # the block table, in parts: tables' rows copied as
    refs: list[BlockRef] = []  # they are, the other items' references packed in runs
    rows = 0
    renumbers: dict[int, list[int] | None] = {}

    def data(d: StoredData) -> str:
        nonlocal rows
        first, table = rows, d._table
        if table is not None:
            if refs:
                tables.append(pack_columns(refs, index))
                refs.clear()
            if id(table) not in renumbers:  # once per table: it may name 10^3 objects
                renumbers[id(table)] = table.renumbering(index)
            tables.append(table.columns(d._first, d._count, renumbers[id(table)]))
            rows += d._count
        else:
            refs.extend(d.blocks)
            rows += len(d.blocks)
        return f'"nbytes":{d.nbytes:d},"blocks":[{first},{rows - first}]'

    for i, (fqn, e) in enumerate(m.items.items()):
        if i:
            add(",")
        if isinstance(e, TensorEntry):
            chunks = ",".join([f'{{"offsets":{ints(c.offsets)},"sizes":{ints(c.sizes)},'
                               f"{data(c.data)}}}" for c in e.chunks])
            add(f'{key(fqn)}:{{"kind":"tensor","dtype":"{e.dtype}","size":{ints(e.size)},'
                f'"requires_grad":{"true" if e.requires_grad else "false"},"chunks":[{chunks}]}}')
        else:
            add(f'{key(fqn)}:{{"kind":"value","encoding":"{e.encoding}",{data(e.data)}}}')
    add('},"block_table":"')
    tables.append(pack_columns(refs, index))
    add(base64.b64encode(join_columns(tables)).decode("ascii"))
    add('"}')
    return seal("".join(body).encode())


def metric_ok(value: object, *, stored: bool = True) -> bool:
    """Whether ``value`` is a metric the format holds: a number (an int within 64 bits; a
    float finite once stored, where inf and nan are strings), a string, a bool or None."""
    return (value is None or isinstance(value, (bool, str))
            or (type(value) is int and abs(value) <= MAX_STEP)
            or (type(value) is float and (math.isfinite(value) or not stored)))
