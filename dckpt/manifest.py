"""The on-disk manifest: versioned JSON <-> frozen dataclasses (pure; docs/format.md is the spec)."""

from __future__ import annotations

import gc
import json
import math
import re
from dataclasses import dataclass, field

import torch

from dckpt.errors import FormatError
from dckpt.layout import check_object_name

__all__ = [
    "FORMAT", "VERSION", "BlockRef", "StoredData", "ChunkEntry", "TensorEntry", "ValueEntry",
    "Manifest", "encode", "decode", "dtype_name", "dtype_from_name", "stored_datas",
]

FORMAT = "dckpt.manifest"
VERSION = 1

# IMPORTANT: the names are part of the format; add, never rename.
_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float16", "float32", "float64", "bfloat16", "complex32", "complex64", "complex128",
        "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_HEX_RE = re.compile(r"[0-9a-f]*")
CODECS = ("raw", "zstd", "zstd-planes-2", "zstd-planes-4", "zstd-planes-8")
_CODEC_SET = frozenset(CODECS)


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} has no name in the dckpt format; supported: "
                          f"{', '.join(sorted(_DTYPES))}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise FormatError(f"unknown dtype {name!r} in manifest") from None


@dataclass(frozen=True)
class BlockRef:
    """One stored block: ``length`` bytes at ``offset`` of object ``segment``."""

    segment: str
    offset: int
    length: int
    raw_length: int
    digest: str
    codec: str = "raw"


@dataclass(frozen=True)
class StoredData:
    """The bytes of one stored item, as the concatenation of its blocks' raw bytes."""

    nbytes: int
    blocks: tuple[BlockRef, ...]


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
    """A non-tensor value, stored as torch.save bytes and loaded with weights_only=True."""

    data: StoredData

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
        names = {b.segment for e in self.items.values() for d in stored_datas(e) for b in d.blocks}
        return sorted(names)


def stored_datas(entry: Entry) -> list[StoredData]:
    if isinstance(entry, TensorEntry):
        return [c.data for c in entry.chunks]
    return [entry.data]


# ---------------------------------------------------------------- encode


def _json_metric(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; "nan", "inf", "-inf"
    return value


def encode(m: Manifest) -> bytes:
    segments = m.segments()
    index = {name: i for i, name in enumerate(segments)}

    def data_json(d: StoredData) -> dict:
        return {"nbytes": d.nbytes,
                "blocks": [[index[b.segment], b.offset, b.length, b.raw_length, b.digest, b.codec]
                           for b in d.blocks]}

    items: dict[str, dict] = {}
    for fqn, e in m.items.items():
        if isinstance(e, TensorEntry):
            items[fqn] = {"kind": "tensor", "dtype": e.dtype, "size": list(e.size),
                          "requires_grad": e.requires_grad,
                          "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes),
                                      **data_json(c.data)} for c in e.chunks]}
        else:
            items[fqn] = {"kind": "value", **data_json(e.data)}
    doc = {
        "format": FORMAT, "version": VERSION, "step": m.step, "attempt": m.attempt,
        "created_at": m.created_at, "world_size": m.world_size,
        "metrics": {k: _json_metric(v) for k, v in m.metrics.items()},
        "bytes_logical": m.bytes_logical, "bytes_written": m.bytes_written,
        "phase_s": m.phase_s, "block_size_bytes": m.block_size_bytes,
        "dcp_version": m.dcp_version, "planner_data": m.planner_data,
        "segments": segments, "items": items,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------- decode


def _obj(value: object, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(value).__name__}")
    missing = required - value.keys()
    unknown = value.keys() - required - optional
    if missing or unknown:
        raise FormatError(f"{where}: missing fields {sorted(missing)}, unknown fields "
                          f"{sorted(unknown)}; the manifest is damaged or of another version")
    return value


def _int(value: object, where: str, minimum: int = 0) -> int:
    if type(value) is not int or value < minimum:
        raise FormatError(f"{where}: expected an integer >= {minimum}, found {value!r}")
    return value


def _ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise FormatError(f"{where}: expected a list of integers, found {value!r}")
    return tuple(_int(v, where) for v in value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{where}: expected a string, found {value!r}")
    return value


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
    return tuple(map(BlockRef, map(segments.__getitem__, segs), offs, lens, raws, digests,
                     codecs))


def _blocks_checked(rows: list, where: str, segments: list[str]) -> tuple[BlockRef, ...]:
    blocks = []
    for i, b in enumerate(rows):
        w = f"{where}.blocks[{i}]"
        if not isinstance(b, list) or len(b) != 6:
            raise FormatError(f"{w}: expected [segment, offset, length, raw_length, digest, codec]")
        seg = _int(b[0], w)
        if seg >= len(segments):
            raise FormatError(f"{w}: segment index {seg} out of range ({len(segments)} segments)")
        digest, codec = _str(b[4], w), _str(b[5], w)
        if not _DIGEST_RE.fullmatch(digest):
            raise FormatError(f"{w}: digest {digest!r} is not 32 lowercase hex digits")
        if codec not in CODECS:
            raise FormatError(f"{w}: unknown codec {codec!r}; known: {', '.join(CODECS)}")
        ref = BlockRef(segments[seg], _int(b[1], w), _int(b[2], w), _int(b[3], w), digest, codec)
        if ref.length > ref.raw_length or (codec == "raw" and ref.length != ref.raw_length):
            raise FormatError(f"{w}: {ref.length} stored bytes for {ref.raw_length} raw bytes "
                              f"is impossible for codec {codec!r}")
        blocks.append(ref)
    return tuple(blocks)


def _data(doc: dict, where: str, segments: list[str]) -> StoredData:
    nbytes = _int(doc["nbytes"], f"{where}.nbytes")
    rows = doc["blocks"]
    if not isinstance(rows, list):
        raise FormatError(f"{where}.blocks: expected a list")
    blocks = _blocks_fast(rows, segments)
    if blocks is None:
        blocks = _blocks_checked(rows, where, segments)
    if sum(b.raw_length for b in blocks) != nbytes:
        raise FormatError(f"{where}: blocks hold {sum(b.raw_length for b in blocks)} bytes, "
                          f"nbytes says {nbytes}")
    return StoredData(nbytes, blocks)


def _entry(fqn: str, doc: object, segments: list[str]) -> Entry:
    where = f"items[{fqn!r}]"
    if not isinstance(doc, dict) or doc.get("kind") not in ("tensor", "value"):
        raise FormatError(f"{where}: expected an object with kind 'tensor' or 'value'")
    if doc["kind"] == "value":
        _obj(doc, where, {"kind", "nbytes", "blocks"})
        return ValueEntry(_data(doc, where, segments))
    _obj(doc, where, {"kind", "dtype", "size", "requires_grad", "chunks"})
    dtype = _str(doc["dtype"], f"{where}.dtype")
    itemsize = dtype_from_name(dtype).itemsize
    size = _ints(doc["size"], f"{where}.size")
    if not isinstance(doc["requires_grad"], bool) or not isinstance(doc["chunks"], list):
        raise FormatError(f"{where}: requires_grad must be a bool and chunks a list")
    chunks = []
    for i, c in enumerate(doc["chunks"]):
        w = f"{where}.chunks[{i}]"
        _obj(c, w, {"offsets", "sizes", "nbytes", "blocks"})
        offsets, sizes = _ints(c["offsets"], f"{w}.offsets"), _ints(c["sizes"], f"{w}.sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(
                o + s > n for o, s, n in zip(offsets, sizes, size)):
            raise FormatError(f"{w}: box offsets={list(offsets)} sizes={list(sizes)} "
                              f"does not fit a tensor of size {list(size)}")
        data = _data(c, w, segments)
        if data.nbytes != math.prod(sizes) * itemsize:
            raise FormatError(f"{w}: holds {data.nbytes} bytes, a {dtype} box of sizes "
                              f"{list(sizes)} needs {math.prod(sizes) * itemsize}")
        chunks.append(ChunkEntry(offsets, sizes, data))
    return TensorEntry(dtype, size, doc["requires_grad"], tuple(chunks))


_TOP_REQUIRED = {"format", "version", "step", "attempt", "created_at", "world_size", "metrics",
                 "bytes_logical", "bytes_written", "phase_s", "block_size_bytes", "dcp_version",
                 "planner_data", "segments", "items"}


def decode(raw: bytes, *, name: str = "manifest") -> Manifest:
    """Parse and check a manifest; anything unexpected raises FormatError naming ``name``."""
    # IMPORTANT: a differential checkpoint's manifest is 10^5 small lists; with the cyclic
    # garbage collector on, its passes over them took 2/3 of the decoding (0.7 s against
    # 0.2 s for 32k blocks), and the objects made here form no cycles
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode(raw, name)
    finally:
        if enabled:
            gc.enable()


def _decode(raw: bytes, name: str) -> Manifest:
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{name}: not valid JSON ({e}); the manifest is truncated or "
                          "damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{name}: not a dckpt manifest (format field is "
                          f"{doc.get('format') if isinstance(doc, dict) else None!r})")
    if doc.get("version") != VERSION:
        raise FormatError(f"{name}: format version {doc.get('version')!r} is not supported by "
                          f"this dckpt (it reads version {VERSION}); upgrade dckpt to load it")
    try:
        _obj(doc, name, _TOP_REQUIRED)
        segments = [check_object_name(s) for s in doc["segments"]]
        if not isinstance(doc["items"], dict) or not isinstance(doc["metrics"], dict):
            raise FormatError(f"{name}: items and metrics must be JSON objects")
        items = {fqn: _entry(fqn, e, segments) for fqn, e in doc["items"].items()}
        if not isinstance(doc["created_at"], (int, float)):
            raise FormatError(f"{name}: created_at must be a number")
        return Manifest(
            step=_int(doc["step"], "step"), attempt=_str(doc["attempt"], "attempt"),
            created_at=float(doc["created_at"]), world_size=_int(doc["world_size"], "world_size", 1),
            items=items, metrics=dict(doc["metrics"]),
            bytes_logical=_int(doc["bytes_logical"], "bytes_logical"),
            bytes_written=_int(doc["bytes_written"], "bytes_written"),
            phase_s={str(k): float(v) for k, v in dict(doc["phase_s"]).items()},
            block_size_bytes=_int(doc["block_size_bytes"], "block_size_bytes"),
            dcp_version=doc["dcp_version"], planner_data=doc["planner_data"],
        )
    except FormatError as e:
        if e.message.startswith(name):
            raise
        raise FormatError(f"{name}: {e.message}") from e
