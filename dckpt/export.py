"""Export one checkpoint: a self-contained dckpt repository, or the full unsharded state as
one torch.save file or one safetensors file. Every byte is verified on the way."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import struct
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from dckpt import layout
from dckpt.blocks import check
from dckpt.codec import decode
from dckpt.dtypes import flat_bytes
from dckpt.errors import (
    ArgumentError,
    CheckpointExistsError,
    IntegrityError,
    StateDictError,
    StorageError,
)
from dckpt.files import replaced_by_rename
from dckpt.items import read_item
from dckpt.manifest import BlockRef, Entry, Manifest, StoredData, TensorEntry, encode
from dckpt.reads import READ_THREADS, Fetcher
from dckpt.repository import mark_repository
from dckpt.storage import Store

__all__ = ["export_checkpoint", "unflatten", "FORMATS"]

log = logging.getLogger(__name__)

FORMATS = ("dckpt", "torch", "safetensors")

Progress = Callable[[int, int], None]

# safetensors' dtype names (https://github.com/huggingface/safetensors, the format spec)
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
    "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "float8_e4m3fnuz": "F8_E4M3FNUZ", "float8_e5m2fnuz": "F8_E5M2FNUZ",
    "complex64": "C64",
}
"""Those safetensors' own torch loader maps back (0.8): complex128, complex32, float8_e8m0fnu
and float4_e2m1fn_x2 have no name there (export format="torch" holds them)."""


def _check_outside(store: Store, to: str) -> None:
    """Refuse a local destination that is the local repository exported or lies in one of
    its own folders: a file under ``manifests/`` would be a damaged checkpoint of it (and
    stop its gc), one under ``data/`` garbage that gc takes. Elsewhere under its root is
    fine."""
    if not store.local or ("://" in to and not to.startswith("file://")):
        return
    root = os.path.realpath(store.root)
    target = os.path.realpath(to[len("file://"):] if to.startswith("file://") else to)
    owned = [os.path.join(root, name) for name in layout.REPOSITORY_NAMES]
    if target == root or any(target == p or target.startswith(p + os.sep) for p in owned):
        raise ArgumentError(f"export destination {to!r} is the repository {store.url} or "
                            "lies in one of its folders; export to a path outside them")


def export_checkpoint(store: Store, m: Manifest, to: str, fmt: str, *,
                      storage_options: dict | None = None,
                      progress: Progress | None = None) -> int:
    """Write checkpoint ``m`` of ``store`` to ``to`` in format ``fmt``; returns bytes written."""
    if fmt not in FORMATS:
        raise ArgumentError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    _check_outside(store, to)
    total = sum(e.nbytes for e in m.items.values())
    done = [0]

    def step(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(done[0], total)

    if fmt != "dckpt":  # a file, replaced whole
        parent, _, base = to.rstrip("/").rpartition("/")
        if not base:
            raise ArgumentError(f"export destination {to!r} names no file")
        dest = Store(parent or ".", storage_options)
        _check_replaceable(dest, base, to)
    else:
        try:
            return _export_dckpt(store, m, Store(to, storage_options), step)
        finally:
            store.close_files()
    with contextlib.ExitStack() as stack:
        try:  # first: a destination that cannot be written fails before the reads
            f = stack.enter_context(dest.open_replace(base))
        except OSError as e:
            raise StorageError(f"export destination {to} cannot be written ({type(e).__name__}"
                               f": {e}); nothing was read or written: name a file in a folder "
                               "this process can write") from e
        try:
            with Fetcher(store, READ_THREADS) as fetcher:
                flat = {fqn: read_item(fetcher, m, fqn, step) for fqn in m.items}
        finally:
            store.close_files()
        if fmt == "torch":
            torch.save(unflatten(flat, m.planner_data), f)
        else:
            _write_safetensors(flat, m, f)
    return dest.size(base)


def _check_replaceable(dest: Store, base: str, to: str) -> None:
    """An export replaces a file at ``to`` as a whole (a new file renamed over it); anything
    else there is refused: a rename over a device made /dev/full a regular file."""
    if not dest.local:
        return
    path = dest.path(base)
    what = replaced_by_rename(path) or (  # where the link points, a file may be expected
        "a link to nothing" if os.path.islink(path) and not os.path.exists(path) else None)
    if what:
        raise ArgumentError(f"export destination {to} is {what}, not a file; an export "
                            "writes a new file there, replacing only a file")


def _read_block(store: Store, ref: BlockRef, what: str) -> bytearray:
    """One block's stored bytes (not decoded: the dckpt export copies them as they are)."""
    buf = bytearray(ref.length)
    try:
        n = store.read_into(ref.segment, ref.offset, memoryview(buf))
    except FileNotFoundError:
        raise IntegrityError(f"{what}: object {ref.segment} is missing from {store.url}") from None
    if n != ref.length:
        raise IntegrityError(f"{what}: object {ref.segment} is truncated at {ref.offset}")
    return buf


def unflatten(flat: dict[str, Any], planner_data: dict[str, list[str | int]] | None
               ) -> dict[str, Any]:
    """The nested state dict: DCP's planner data maps each flat key to its path."""
    if not planner_data:
        return flat
    out: dict[str, Any] = {}
    for key, value in flat.items():
        path = planner_data.get(key, [key])
        node: Any = out
        for part, nxt in itertools.pairwise(path):
            if isinstance(node, list):
                while len(node) <= part:  # type: ignore[operator]
                    node.append(None)
                if node[part] is None:  # type: ignore[index]
                    node[part] = [] if isinstance(nxt, int) else {}  # type: ignore[index]
                node = node[part]  # type: ignore[index]
            else:
                node = node.setdefault(part, [] if isinstance(nxt, int) else {})
        last = path[-1]
        if isinstance(node, list):
            while len(node) <= last:  # type: ignore[operator]
                node.append(None)
        node[last] = value  # type: ignore[index]
    return out


def _write_safetensors(flat: dict[str, Any], m: Manifest, f: BinaryIO) -> None:
    """Tensors as safetensors; non-tensor values that JSON holds go to ``__metadata__``
    (as JSON strings, the format's rule), and any other value is refused."""
    header: dict[str, Any] = {}
    metadata = {"dckpt.step": str(m.step)}
    tensors = []
    offset = 0
    for key, value in flat.items():
        if isinstance(value, torch.Tensor):
            name = _SAFETENSORS_DTYPES.get(m.items[key].dtype)  # type: ignore[union-attr]
            if name is None:
                raise StateDictError(f"{key}: dtype {value.dtype} has no safetensors name; "
                                     "export --format torch instead")
            n = value.numel() * value.element_size()
            header[key] = {"dtype": name, "shape": list(value.shape),
                           "data_offsets": [offset, offset + n]}
            tensors.append(value)
            offset += n
        else:
            try:
                metadata[key] = json.dumps(value)
            except (TypeError, ValueError):
                raise StateDictError(
                    f"{key}: a {type(value).__name__} value fits neither a safetensors tensor "
                    "nor its JSON metadata; export --format torch instead") from None
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data begins 8-aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for t in tensors:
        if t.numel():
            data = flat_bytes(t.contiguous()).numpy()
            f.write(memoryview(data))  # type: ignore[arg-type]


def _export_dckpt(store: Store, m: Manifest, dest: Store, step: Callable[[int], None]) -> int:
    """A new repository holding only this checkpoint: its blocks (each verified, stored
    bytes copied as they are, once even when shared) packed into one segment."""
    if dest.exists(layout.manifest_name(m.step)):
        raise CheckpointExistsError(f"{dest.url} already holds step {m.step}")
    mark_repository(dest)
    attempt = layout.new_attempt(m.step)
    name = layout.segment_name(attempt, 0, 0)
    moved: dict[tuple[str, int], BlockRef] = {}
    written = 0
    with dest.open_write(name) as f:
        def copy(data: StoredData, what: str) -> StoredData:
            nonlocal written
            blocks = []
            for ref in data.blocks:
                new = moved.get((ref.segment, ref.offset))
                if new is None:
                    payload = _read_block(store, ref, what)
                    raw = memoryview(bytearray(ref.raw_length))
                    if ref.codec == "raw":
                        raw[:] = payload
                    else:
                        decode(ref.codec, payload, raw, what=what)
                    check(raw, ref, what=what)
                    new = ref._replace(segment=name, offset=written)
                    f.write(payload)
                    written += len(payload)
                    moved[(ref.segment, ref.offset)] = new
                blocks.append(new)
                step(ref.raw_length)
            return StoredData(data.nbytes, tuple(blocks))

        items: dict[str, Entry] = {}
        for fqn, e in m.items.items():
            what = f"item {fqn!r} of checkpoint step {m.step} in {store.url}"
            if isinstance(e, TensorEntry):
                items[fqn] = dataclasses.replace(e, chunks=tuple(  # type: ignore[assignment]
                    dataclasses.replace(c, data=copy(c.data, what)) for c in e.chunks))
            else:
                items[fqn] = dataclasses.replace(e, data=copy(e.data, what))  # type: ignore[assignment]
    dest.sync_folder(f"{layout.DATA_DIR}/{attempt}")
    exported = dataclasses.replace(m, attempt=attempt, items=items, bytes_written=written)
    dest.create_exclusive(layout.manifest_name(m.step), encode(exported))
    return written
