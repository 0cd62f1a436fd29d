"""Block references: where one stored block lies (``BlockRef``), a version 3 manifest's
table of them (``BlockTable``, and ``pack`` to write one), and the bytes each object must
hold for them (``extents``). Pure: no torch, no numpy (``python -m dckpt.prefetch`` decodes
manifests before either is imported). docs/format.md is the spec.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from functools import partial
from operator import add, gt, itemgetter
from typing import Literal, NamedTuple

from dckpt.errors import FormatError

__all__ = ["BlockRef", "BlockTable", "pack", "pack_columns", "join_columns", "extents",
           "CODECS", "MAX_BLOCK_BYTES", "MAX_OBJECT_BYTES", "ROW_BYTES"]

CODECS = ("raw", "zstd", "zstd-planes-2", "zstd-planes-4", "zstd-planes-8")
"""IMPORTANT: a block table stores a codec as its index here; add, never reorder."""
MAX_BLOCK_BYTES = 1 << 30
"""No block holds more raw bytes (SaveConfig caps the block size there)."""
MAX_OBJECT_BYTES = 1 << 50
"""No block lies past this offset of its object (1 PiB)."""


class BlockRef(NamedTuple):
    """One stored block: ``length`` bytes at ``offset`` of object ``segment``. A named tuple,
    not a frozen dataclass: a manifest holds one per block (10^5 to 10^6 at scale, decoded
    on every rank before a restore reads), and a tuple is built in a quarter of the time."""

    segment: str
    offset: int
    length: int
    raw_length: int
    digest: str
    codec: str = "raw"


ROW_BYTES = 37
"""A block table row's bytes: offset 8, segment 4, length 4, raw length 4, codec 1, digest 16."""
_Code = Literal["Q", "I", "B"]
_COLUMNS: tuple[tuple[str, _Code, int], ...] = (
    ("offset", "Q", 8), ("segment", "I", 4), ("length", "I", 4), ("raw_length", "I", 4),
    ("codec", "B", 1))
_LITTLE = sys.byteorder == "little"


def _column(view: memoryview, code: _Code) -> Sequence[int]:
    """Little-endian integers as a sequence of Python ints: the bytes themselves on a
    little-endian machine."""
    if _LITTLE:
        return view.cast(code)
    column = array(code, view.tobytes())
    column.byteswap()
    return column


def _le(column: Sequence[int], code: _Code) -> bytes:
    """A column's values as little-endian bytes."""
    if _LITTLE:
        return bytes(column)  # type: ignore[call-overload]
    out = array(code, column)
    out.byteswap()
    return out.tobytes()


class BlockTable:
    """A version 3 manifest's block rows (docs/format.md, Block table): columns of
    little-endian integers and the digests' bytes, read in place; ``refs`` builds the
    references of a range of rows. ``check`` raises FormatError naming the first row that
    breaks a bound; the decoder calls it before anything reads the table. (No numpy: the
    prefetch decodes manifests before torch and numpy are imported.)"""

    __slots__ = (
        "codec",
        "count",
        "digests",
        "length",
        "offset",
        "raw_length",
        "segment",
        "segments",
    )

    offset: Sequence[int]
    segment: Sequence[int]
    length: Sequence[int]
    raw_length: Sequence[int]
    codec: Sequence[int]

    def __init__(self, raw: bytes, segments: list[str]) -> None:
        if len(raw) % ROW_BYTES:
            raise FormatError(f"block_table: {len(raw)} bytes is not a whole number of "
                              f"{ROW_BYTES}-byte rows")
        n = self.count = len(raw) // ROW_BYTES
        self.segments = segments
        view = memoryview(raw)
        at = 0
        for name, code, size in _COLUMNS:  # widest first: every column is aligned
            setattr(self, name, _column(view[at:at + size * n], code))
            at += size * n
        self.digests = view[at:]

    def check(self) -> None:
        """Every row within the bounds of docs/format.md: a pass over each column in C,
        and one over the offsets and lengths together only where an offset lies within
        4 GiB of the largest object."""
        if not self.count:
            return
        furthest = max(self.offset)
        ok = (max(self.segment) < len(self.segments) and max(self.codec) < len(CODECS)
              and max(self.raw_length) <= MAX_BLOCK_BYTES and furthest <= MAX_OBJECT_BYTES)
        if ok and furthest > MAX_OBJECT_BYTES - (1 << 32):  # length < 2^32
            ok = max(map(add, self.offset, self.length)) <= MAX_OBJECT_BYTES
        if ok and self.length != self.raw_length:  # equal columns (no block compressed): OK
            ok = not any(map(gt, self.length, self.raw_length)) and not any(
                c == 0 and n != r for c, n, r in zip(self.codec, self.length, self.raw_length))
        if not ok:
            row = next(i for i in range(self.count) if not self._row_ok(i))
            raise FormatError(
                f"block_table row {row}: segment {self.segment[row]} of "
                f"{len(self.segments)}, offset {self.offset[row]}, length {self.length[row]}, "
                f"raw length {self.raw_length[row]}, codec {self.codec[row]}: out of the "
                "bounds of docs/format.md")

    def _row_ok(self, i: int) -> bool:
        offset, length, raw, codec = (self.offset[i], self.length[i], self.raw_length[i],
                                      self.codec[i])
        return (self.segment[i] < len(self.segments) and codec < len(CODECS)
                and raw <= MAX_BLOCK_BYTES and offset + length <= MAX_OBJECT_BYTES
                and length <= raw and (codec != 0 or length == raw))

    def raw_bytes(self, first: int, count: int) -> int:
        return sum(self.raw_length[first:first + count])

    def refs(self, first: int, count: int) -> tuple[BlockRef, ...]:
        end = first + count
        text = self.digests[16 * first:16 * end].hex()
        digests = map(text.__getitem__, map(slice, range(0, 32 * count, 32),
                                            range(32, 32 * count + 32, 32)))
        return tuple(map(partial(tuple.__new__, BlockRef), zip(
            map(self.segments.__getitem__, self.segment[first:end]), self.offset[first:end],
            self.length[first:end], self.raw_length[first:end], digests,
            map(CODECS.__getitem__, self.codec[first:end]))))

    def renumbering(self, index: dict[str, int]) -> list[int] | None:
        """Each of this table's segment numbers in ``index``, for ``columns``; None where
        they are the same. A name no row of a range uses may be missing from the index: its
        number is never looked up."""
        renumber = [index.get(name, 0) for name in self.segments]
        return None if renumber == list(range(len(renumber))) else renumber

    def columns(self, first: int, count: int, renumber: list[int] | None = None
                ) -> list[bytes]:
        """A range of rows as ``pack_columns`` packs them, the segments numbered by
        ``renumber`` (``renumbering``; None: as here): the columns' bytes copied, not a
        reference built (the commit's gather sends large items as tables, and the
        coordinator writes them so)."""
        end = first + count
        if renumber is None:
            segment = _le(self.segment[first:end], "I")
        else:
            segment = _le(array("I", map(renumber.__getitem__, self.segment[first:end])), "I")
        return [_le(self.offset[first:end], "Q"), segment,
                _le(self.length[first:end], "I"), _le(self.raw_length[first:end], "I"),
                bytes(self.codec[first:end]), bytes(self.digests[16 * first:16 * end])]

    def spans(self, first: int, count: int) -> Iterator[tuple[str, int, int]]:
        """(segment, offset, length) of a range of rows, without building references."""
        end = first + count
        return zip(map(self.segments.__getitem__, self.segment[first:end]),
                   self.offset[first:end], self.length[first:end])

    def extents(self, first: int, count: int) -> dict[str, int]:
        """``extents`` of a range of rows, without building their references."""
        end = first + count
        ends: dict[int, int] = {}
        get = ends.get
        for segment, stop in zip(self.segment[first:end],
                                 map(add, self.offset[first:end], self.length[first:end])):
            if stop > get(segment, -1):
                ends[segment] = stop
        return {self.segments[s]: stop for s, stop in ends.items()}


def pack(refs: list[BlockRef], index: dict[str, int]) -> bytes:
    """The block table of ``refs`` (segments numbered by ``index``)."""
    return b"".join(pack_columns(refs, index))


def pack_columns(refs: list[BlockRef], index: dict[str, int]) -> list[bytes]:
    """``pack``, column by column (``join_columns`` puts several such tables together)."""
    if not refs:
        return [b""] * len(_COLUMNS) + [b""]

    def column(i: int) -> list:  # zip(*refs) takes 1.3 us a row, this 40 ns
        return list(map(itemgetter(i), refs))

    columns = [array("Q", column(1)), array("I", map(index.__getitem__, column(0))),
               array("I", column(2)), array("I", column(3))]
    if not _LITTLE:
        for c in columns:
            c.byteswap()
    return ([c.tobytes() for c in columns]
            + [bytes(map(_CODEC_INDEX.__getitem__, column(5))),
               bytes.fromhex("".join(column(4)))])


def join_columns(tables: list[list[bytes]]) -> bytes:
    """One table of the rows of ``tables`` (each from ``pack_columns`` or ``columns``), in
    order."""
    return b"".join(b"".join(t[i] for t in tables) for i in range(len(_COLUMNS) + 1))


_CODEC_INDEX = {c: i for i, c in enumerate(CODECS)}


def extents(refs: Iterable[BlockRef]) -> dict[str, int]:
    """Per object, the bytes it must hold for ``refs``: its blocks' furthest end (0 for an
    object of empty blocks alone: it must exist)."""
    ends: dict[str, int] = {}
    get = ends.get
    for segment, offset, length, _, _, _ in refs:  # unpacked: 2.5x faster than attributes
        end = offset + length
        if end > get(segment, -1):
            ends[segment] = end
    return ends
