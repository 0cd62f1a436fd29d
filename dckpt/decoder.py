"""The manifest decoder: bytes -> a Manifest whose every field was checked (type, bounds,
block rows, chunks that tile their tensor), or FormatError; a checksum that does not match
is an IntegrityError (pure, no torch: ``python -m dckpt.prefetch`` decodes with it).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

from dckpt.errors import DckptError, FormatError, IntegrityError
from dckpt.gcpause import paused_gc
from dckpt.layout import MAX_STEP, check_object_name
from dckpt.manifest import (
    CODECS,
    DTYPE_SIZES,
    ENCODINGS,
    FORMAT,
    MAX_BLOCK_BYTES,
    MAX_OBJECT_BYTES,
    MAX_TENSOR_BYTES,
    MAX_VALUE_BYTES,
    MAX_WORLD_SIZE,
    READS,
    BlockRef,
    ChunkEntry,
    Entry,
    Manifest,
    StoredData,
    Summary,
    TensorEntry,
    ValueEntry,
    metric_ok,
    unseal,
)

__all__ = ["decode", "summary", "reusing"]

_DIGEST_RE = re.compile(r"[0-9a-f]{32}")
_HEX_RE = re.compile(r"[0-9a-f]*")
_CODEC_SET = frozenset(CODECS)


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
    # a few rows (a small tensor's): one by one is faster than column by column
    blocks = _blocks_fast(rows, segments) if len(rows) > 4 else None
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


_reuse = threading.local()


@contextmanager
def reusing(memo: dict[bytes, Manifest], max_bytes: int) -> Iterator[None]:
    """Within, in this thread, ``decode`` of bytes it decoded before returns the Manifest it
    made then (manifests are immutable; the key is a BLAKE2 digest of the exact bytes), and
    keeps what it makes in ``memo`` while their bytes total at most ``max_bytes``. At the
    end, ``memo`` keeps only what was asked for within: a repository's upkeep after each
    commit reads every committed manifest twice (the retention's listing, gc), and decoding
    them was all of its time, growing with the checkpoints kept, beside training."""
    used: set[bytes] = set()
    outer = getattr(_reuse, "state", None)  # a run within another's: each keeps its own
    _reuse.state = (memo, used, max_bytes)
    try:
        yield
    finally:
        _reuse.state = outer
        for key in [k for k in memo if k not in used]:
            del memo[key]


def decode(raw: bytes, *, name: str = "manifest") -> Manifest:
    """Parse and check a manifest; anything unexpected raises FormatError (a checksum that
    does not match, IntegrityError) naming ``name``."""
    state = getattr(_reuse, "state", None)
    if state is not None and isinstance(raw, (bytes, bytearray)):
        memo, used, max_bytes = state
        key = hashlib.blake2b(raw, digest_size=20).digest() + len(raw).to_bytes(8, "little")
        known = memo.get(key)
        if known is not None:
            used.add(key)
            return known
        m = _checked(raw, name)
        if sum(int.from_bytes(k[20:], "little") for k in memo) + len(raw) <= max_bytes:
            memo[key] = m
            used.add(key)
        return m
    return _checked(raw, name)


def _checked(raw: bytes, name: str) -> Manifest:
    try:
        with paused_gc():
            return _decode(raw, name)
    except IntegrityError as e:
        if e.message.startswith(name):
            raise
        raise type(e)(f"{name}: {e.message}") from e
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError,
            MemoryError) as e:  # anything a hostile document could provoke in the checks
        raise FormatError(f"{name}: {type(e).__name__}: {str(e)[:200]}; the manifest is "
                          "damaged") from e


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise FormatError(f"the key {twice!r} appears twice in one JSON object")
    return out


def _parsed(raw: bytes, name: str) -> dict:
    """The manifest's JSON object, its format, version and checksum checked."""
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
    return doc


def _segments(doc: dict, name: str) -> list[str]:
    if not isinstance(doc["segments"], list):
        raise FormatError(f"{name}: segments must be a list")
    segments = [check_object_name(s) for s in doc["segments"]]
    if len(set(segments)) != len(segments):
        raise FormatError(f"{name}: an object is named twice in segments")
    return segments


def _summary(doc: dict, name: str) -> Summary:
    """The header fields, checked."""
    if not isinstance(doc["phase_s"], dict):
        raise FormatError(f"{name}: phase_s must be a JSON object")
    dcp_version = doc["dcp_version"]
    if dcp_version is not None and not isinstance(dcp_version, str):
        raise FormatError(f"{name}: dcp_version must be a string or null")
    _int(doc["block_size_bytes"], "block_size_bytes", maximum=MAX_BLOCK_BYTES)
    s = Summary(
        step=_int(doc["step"], "step"), attempt=_str(doc["attempt"], "attempt"),
        created_at=_float(doc["created_at"], "created_at"),
        world_size=_int(doc["world_size"], "world_size", 1, MAX_WORLD_SIZE),
        metrics=_metrics(doc["metrics"]),
        bytes_logical=_int(doc["bytes_logical"], "bytes_logical"),
        bytes_written=_int(doc["bytes_written"], "bytes_written"),
        phase_s={str(k): _float(v, f"phase_s[{k!r}]") for k, v in doc["phase_s"].items()})
    if s.created_at < 0:
        raise FormatError(f"{name}: created_at {s.created_at} is before 1970")
    return s


_HEAD_KEYS = _TOP_REQUIRED - {"items"}
_ITEMS_KEY = b',"items":{'


def summary(raw: bytes, *, name: str = "manifest") -> Summary:
    """What a listing shows of a manifest: its header fields and segment names, checked as
    ``decode`` checks them, after the checksum over every byte, but its items not built
    (``decode`` takes 0.5 s for 20,000 items, and a listing reads every manifest). The
    items' agreement with each other and the header (what a load and ``verify`` check) is
    not looked at: bytes that pass the checksum are the bytes written, so only a writer's
    bug or a forgery could make them disagree. The header is parsed alone where the bytes
    are laid out as ``encode`` writes them, items last; anything else (a first version's
    manifest, another order, damage) is decoded whole, which says what is wrong as a load
    would."""
    head = _head(raw, name)
    if head is not None:
        return head
    m = decode(raw, name=name)
    return Summary(m.step, m.attempt, m.created_at, m.world_size, m.metrics, m.bytes_logical,
                   m.bytes_written, m.phase_s)


def _head(raw: bytes, name: str) -> Summary | None:
    if not (isinstance(raw, (bytes, bytearray))
            and raw.startswith(b'{"format":"%s","version":2,' % FORMAT.encode())):
        return None
    try:
        unseal(raw, name)
        cut = raw.find(_ITEMS_KEY)
        # the top level up to items, closed: JSON only where items is a top-level key
        head = json.loads(raw[:cut] + b"}", object_pairs_hook=_unique_keys) if cut > 0 else None
        if not isinstance(head, dict) or head.keys() != _HEAD_KEYS:
            return None
        _segments(head, name)
        return _summary(head, name)
    except (DckptError, ValueError, TypeError, KeyError, AttributeError, OverflowError,
            RecursionError, MemoryError):
        return None


def _decode(raw: bytes, name: str) -> Manifest:
    doc = _parsed(raw, name)
    segments = _segments(doc, name)
    if not isinstance(doc["items"], dict):
        raise FormatError(f"{name}: items must be a JSON object")
    items = {fqn: _entry(fqn, e, segments, doc["version"]) for fqn, e in doc["items"].items()}
    s = _summary(doc, name)
    m = Manifest(
        step=s.step, attempt=s.attempt, created_at=s.created_at, world_size=s.world_size,
        items=items, metrics=s.metrics, bytes_logical=s.bytes_logical,
        bytes_written=s.bytes_written, phase_s=s.phase_s,
        block_size_bytes=doc["block_size_bytes"], dcp_version=doc["dcp_version"],
        planner_data=_planner_data(doc["planner_data"], items),
    )
    logical = sum(e.nbytes for e in items.values())
    if m.bytes_logical != logical:
        raise FormatError(f"{name}: bytes_logical says {m.bytes_logical}, its items hold "
                          f"{logical}; the manifest is damaged")
    return m
