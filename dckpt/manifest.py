"""The on-disk manifest: versioned JSON <-> frozen dataclasses (pure; docs/format.md is the spec).

It imports no torch (``python -m dckpt.prefetch`` decodes manifests before torch is loaded):
dtypes are names and item sizes here; dckpt.dtypes maps them to torch's.
"""

from __future__ import annotations

import gc
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import xxhash

from dckpt.errors import FormatError, IntegrityError
from dckpt.layout import MAX_STEP, check_object_name

__all__ = [
    "FORMAT", "VERSION", "BlockRef", "StoredData", "ChunkEntry", "TensorEntry", "ValueEntry",
    "Manifest", "encode", "decode", "stored_datas", "DTYPE_SIZES", "MAX_BLOCK_BYTES",
    "MAX_VALUE_BYTES", "seal", "unseal", "metric_ok",
]

FORMAT = "dckpt.manifest"
VERSION = 2
READS = (1, 2)
"""Versions this dckpt reads: 1 (no checksum, values always torch.save bytes) and 2."""

# IMPORTANT: the names are part of the format; add, never rename.
DTYPE_SIZES: dict[str, int] = {
    "float16": 2, "float32": 4, "float64": 8, "bfloat16": 2, "complex32": 4, "complex64": 8,
    "complex128": 16, "int8": 1, "int16": 2, "int32": 4, "int64": 8, "uint8": 1, "uint16": 2,
    "uint32": 4, "uint64": 8, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "float8_e4m3fnuz": 1, "float8_e5m2fnuz": 1,
}
MAX_BLOCK_BYTES = 1 << 30
"""No block holds more raw bytes (SaveConfig caps the block size there)."""
MAX_VALUE_BYTES = 1 << 30
"""No non-tensor value is larger once serialized (a save refuses one that is: store such
data as a tensor); a reader allocates a value's bytes before it reads them."""
MAX_OBJECT_BYTES = 1 << 50
"""No block lies past this offset of its object (1 PiB)."""
MAX_TENSOR_BYTES = 1 << 56
MAX_WORLD_SIZE = 1 << 24
ENCODINGS = ("torch", "bytes")
"""A value's stored bytes: ``torch.save`` output (loaded with ``weights_only=True``), or the
contents of an ``io.BytesIO``, handed back as one (never unpickled)."""
_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_HEX_RE = re.compile(r"[0-9a-f]*")
CODECS = ("raw", "zstd", "zstd-planes-2", "zstd-planes-4", "zstd-planes-8")
_CODEC_SET = frozenset(CODECS)
_SEAL = re.compile(rb',"checksum":"([0-9a-f]{32})"}$')


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
        return sorted({b.segment for _, _, b in self.blocks()})

    def blocks(self) -> Iterator[tuple[str, StoredData, BlockRef]]:
        """Every block reference, with its item's key and stored data, in manifest order."""
        for fqn, e in self.items.items():
            for d in stored_datas(e):
                for b in d.blocks:
                    yield fqn, d, b


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


def unseal(raw: bytes, name: str) -> bytes:
    """The bytes ``seal`` was given, after checking the checksum; IntegrityError when it is
    missing or does not match (the manifest is damaged)."""
    match = _SEAL.search(raw)
    if match is None:
        raise IntegrityError(f"{name}: the checksum field does not end the manifest; it is "
                             "truncated or damaged")
    body = raw[: match.start()] + b"}"
    found = xxhash.xxh3_128_hexdigest(body)
    if found != match.group(1).decode():
        raise IntegrityError(f"{name}: the manifest's bytes have xxh3-128 {found}, its checksum "
                             f"says {match.group(1).decode()}; the manifest is damaged")
    return body


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
            items[fqn] = {"kind": "value", "encoding": e.encoding, **data_json(e.data)}
    doc = {
        "format": FORMAT, "version": VERSION, "step": m.step, "attempt": m.attempt,
        "created_at": m.created_at, "world_size": m.world_size,
        "metrics": {k: _json_metric(v) for k, v in m.metrics.items()},
        "bytes_logical": m.bytes_logical, "bytes_written": m.bytes_written,
        "phase_s": m.phase_s, "block_size_bytes": m.block_size_bytes,
        "dcp_version": m.dcp_version, "planner_data": m.planner_data,
        "segments": segments, "items": items,
    }
    return seal(json.dumps(doc, separators=(",", ":"), allow_nan=False).encode())


# ---------------------------------------------------------------- decode


def _obj(value: object, where: str, required: set[str], optional: frozenset[str] = frozenset()
         ) -> dict:
    if not isinstance(value, dict):
        raise FormatError(f"{where}: expected a JSON object, found {type(value).__name__}")
    missing = required - value.keys()
    unknown = value.keys() - required - optional
    if missing or unknown:
        raise FormatError(f"{where}: missing fields {sorted(missing)}, unknown fields "
                          f"{sorted(unknown)}; the manifest is damaged or of another version")
    return value


def _int(value: object, where: str, minimum: int = 0, maximum: int = MAX_STEP) -> int:
    if type(value) is not int or not minimum <= value <= maximum:
        raise FormatError(f"{where}: expected an integer in [{minimum}, {maximum}], "
                          f"found {_short(value)}")
    return value


def _ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 64:
        raise FormatError(f"{where}: expected a list of at most 64 integers, found {_short(value)}")
    return tuple(_int(v, where, maximum=MAX_TENSOR_BYTES) for v in value)


def _str(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise FormatError(f"{where}: expected a string, found {_short(value)}")
    return value


def _float(value: object, where: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or abs(value) > 1e15:  # type: ignore[arg-type]
        raise FormatError(f"{where}: expected a finite number, found {_short(value)}")
    return float(value)  # type: ignore[arg-type]


def _short(value: object) -> str:
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
        ref = BlockRef(segments[seg], _int(b[1], w, maximum=MAX_OBJECT_BYTES),
                       _int(b[2], w, maximum=MAX_BLOCK_BYTES),
                       _int(b[3], w, maximum=MAX_BLOCK_BYTES), digest, codec)
        if ref.offset + ref.length > MAX_OBJECT_BYTES:
            raise FormatError(f"{w}: a block at offset {ref.offset} lies past the largest "
                              f"object dckpt writes ({MAX_OBJECT_BYTES} bytes)")
        if ref.length > ref.raw_length or (codec == "raw" and ref.length != ref.raw_length):
            raise FormatError(f"{w}: {ref.length} stored bytes for {ref.raw_length} raw bytes "
                              f"is impossible for codec {codec!r}")
        blocks.append(ref)
    return tuple(blocks)


def _data(doc: dict, where: str, segments: list[str], maximum: int) -> StoredData:
    nbytes = _int(doc["nbytes"], f"{where}.nbytes", maximum=maximum)
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


def _entry(fqn: str, doc: object, segments: list[str], version: int) -> Entry:
    where = f"items[{fqn!r}]"
    if not isinstance(doc, dict) or doc.get("kind") not in ("tensor", "value"):
        raise FormatError(f"{where}: expected an object with kind 'tensor' or 'value'")
    if doc["kind"] == "value":
        if version == 1:
            _obj(doc, where, {"kind", "nbytes", "blocks"})
            encoding = "torch"
        else:
            _obj(doc, where, {"kind", "encoding", "nbytes", "blocks"})
            encoding = _str(doc["encoding"], f"{where}.encoding")
            if encoding not in ENCODINGS:
                raise FormatError(f"{where}: unknown encoding {encoding!r}; known: "
                                  f"{', '.join(ENCODINGS)}")
        return ValueEntry(_data(doc, where, segments, MAX_VALUE_BYTES), encoding)
    _obj(doc, where, {"kind", "dtype", "size", "requires_grad", "chunks"})
    dtype = _str(doc["dtype"], f"{where}.dtype")
    itemsize = DTYPE_SIZES.get(dtype)
    if itemsize is None:
        raise FormatError(f"{where}: unknown dtype {dtype!r}")
    size = _ints(doc["size"], f"{where}.size")
    if math.prod(size) * itemsize > MAX_TENSOR_BYTES:
        raise FormatError(f"{where}: a {dtype} tensor of size {list(size)} is larger than "
                          f"any dckpt stores ({MAX_TENSOR_BYTES} bytes)")
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
        data = _data(c, w, segments, MAX_TENSOR_BYTES)
        if data.nbytes != math.prod(sizes) * itemsize:
            raise FormatError(f"{w}: holds {data.nbytes} bytes, a {dtype} box of sizes "
                              f"{list(sizes)} needs {math.prod(sizes) * itemsize}")
        chunks.append(ChunkEntry(offsets, sizes, data))
    why = _tiles(size, [(c.offsets, c.sizes) for c in chunks])
    if why:
        raise FormatError(f"{where}: {why}; the manifest is damaged")
    return TensorEntry(dtype, size, doc["requires_grad"], tuple(chunks))


def metric_ok(value: object, *, stored: bool = True) -> bool:
    """Whether ``value`` is a metric the format holds: a number (an int within 64 bits; a
    float finite once stored, where inf and nan are strings), a string, a bool or None."""
    return (value is None or isinstance(value, (bool, str))
            or (type(value) is int and abs(value) <= MAX_STEP)
            or (type(value) is float and (math.isfinite(value) or not stored)))


def _metrics(doc: object) -> dict[str, float | int | str | bool | None]:
    if not isinstance(doc, dict):
        raise FormatError("metrics: expected a JSON object")
    for k, v in doc.items():
        if not metric_ok(v):
            raise FormatError(f"metrics[{k!r}]: expected a number, string, bool or null, "
                              f"found {_short(v)}")
    return dict(doc)


def _planner_data(doc: object, items: dict[str, Entry]) -> dict[str, list[str | int]] | None:
    if doc is None:
        return None
    if not isinstance(doc, dict):
        raise FormatError("planner_data: expected a JSON object or null")
    for k, path in doc.items():
        if (k not in items or not isinstance(path, list) or not path
                or not all(type(p) in (str, int) for p in path)):
            raise FormatError(f"planner_data[{k!r}]: expected a non-empty path (strings and "
                              f"integers) of an item, found {_short(path)}")
    return doc


_TOP_REQUIRED = {"format", "version", "step", "attempt", "created_at", "world_size", "metrics",
                 "bytes_logical", "bytes_written", "phase_s", "block_size_bytes", "dcp_version",
                 "planner_data", "segments", "items"}


def decode(raw: bytes, *, name: str = "manifest") -> Manifest:
    """Parse and check a manifest; anything unexpected raises FormatError (a checksum that
    does not match, IntegrityError) naming ``name``."""
    # IMPORTANT: a differential checkpoint's manifest is 10^5 small lists; with the cyclic
    # garbage collector on, its passes over them took 2/3 of the decoding (0.7 s against
    # 0.2 s for 32k blocks), and the objects made here form no cycles
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode(raw, name)
    except IntegrityError as e:
        if e.message.startswith(name):
            raise
        raise type(e)(f"{name}: {e.message}") from e
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError,
            MemoryError) as e:  # anything a hostile document could provoke in the checks
        raise FormatError(f"{name}: {type(e).__name__}: {str(e)[:200]}; the manifest is "
                          "damaged") from e
    finally:
        if enabled:
            gc.enable()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise FormatError(f"the key {twice!r} appears twice in one JSON object")
    return out


def _decode(raw: bytes, name: str) -> Manifest:
    if not isinstance(raw, (bytes, bytearray)):
        raise FormatError(f"{name}: expected the manifest's bytes, got {type(raw).__name__}")
    try:
        doc = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{name}: not valid JSON ({e}); the manifest is truncated or "
                          "damaged") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise FormatError(f"{name}: not a dckpt manifest (format field is "
                          f"{_short(doc.get('format')) if isinstance(doc, dict) else None})")
    version = doc.get("version")
    if type(version) is not int or version not in READS:
        raise FormatError(f"{name}: format version {_short(version)} is not supported by "
                          f"this dckpt (it reads versions {READS}); upgrade dckpt to load it")
    if version >= 2:
        unseal(raw, name)
        _obj(doc, name, _TOP_REQUIRED | {"checksum"})
    else:
        _obj(doc, name, _TOP_REQUIRED)
    if not isinstance(doc["segments"], list):
        raise FormatError(f"{name}: segments must be a list")
    segments = [check_object_name(s) for s in doc["segments"]]
    if len(set(segments)) != len(segments):
        raise FormatError(f"{name}: an object is named twice in segments")
    if not isinstance(doc["items"], dict):
        raise FormatError(f"{name}: items must be a JSON object")
    items = {fqn: _entry(fqn, e, segments, version) for fqn, e in doc["items"].items()}
    if not isinstance(doc["phase_s"], dict):
        raise FormatError(f"{name}: phase_s must be a JSON object")
    dcp_version = doc["dcp_version"]
    if dcp_version is not None and not isinstance(dcp_version, str):
        raise FormatError(f"{name}: dcp_version must be a string or null")
    m = Manifest(
        step=_int(doc["step"], "step"), attempt=_str(doc["attempt"], "attempt"),
        created_at=_float(doc["created_at"], "created_at"),
        world_size=_int(doc["world_size"], "world_size", 1, MAX_WORLD_SIZE),
        items=items, metrics=_metrics(doc["metrics"]),
        bytes_logical=_int(doc["bytes_logical"], "bytes_logical"),
        bytes_written=_int(doc["bytes_written"], "bytes_written"),
        phase_s={str(k): _float(v, f"phase_s[{k!r}]") for k, v in doc["phase_s"].items()},
        block_size_bytes=_int(doc["block_size_bytes"], "block_size_bytes",
                              maximum=MAX_BLOCK_BYTES),
        dcp_version=dcp_version, planner_data=_planner_data(doc["planner_data"], items),
    )
    logical = sum(e.nbytes for e in items.values())
    if m.bytes_logical != logical:
        raise FormatError(f"{name}: bytes_logical says {m.bytes_logical}, its items hold "
                          f"{logical}; the manifest is damaged")
    if m.created_at < 0:
        raise FormatError(f"{name}: created_at {m.created_at} is before 1970")
    return m
