"""Non-tensor values: their stored bytes and back, never running code from a checkpoint.

A value is stored as ``torch.save`` bytes that must load with ``weights_only=True`` (checked
at save time, so that what a save accepts a load restores), or, for an ``io.BytesIO``, as its
raw contents (``RawBytes``, encoding ``"bytes"``).
"""

from __future__ import annotations

import io
import struct
import threading
from collections.abc import Callable, Hashable
from typing import Any

import torch

from dckpt.errors import StateDictError, UnsafeValueError
from dckpt.manifest import MAX_VALUE_BYTES

__all__ = ["RawBytes", "safe_load", "serialize", "check_loadable"]


class RawBytes(io.BytesIO):
    """The contents of a state dict's io.BytesIO, stored as they are (encoding ``"bytes"``)
    and handed back as an io.BytesIO: never pickled, never unpickled (DCP hands such a value
    back too)."""


def _refusal(e: BaseException) -> str:
    """The line of torch's weights-only refusal that names the type and how to allow it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if "WeightsUnpickler error" in ln or "add_safe_globals" in ln]
    return (named or lines or [type(e).__name__])[0].removeprefix("WeightsUnpickler error: ")


_SAFE: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [bytes]
"""Allowed beside torch's own safe types: ``bytes`` (an empty one pickles as a call of
``bytes()``, which weights_only refuses by default; it builds only bytes)."""
_LOCK = threading.Lock()  # safe_globals sets torch's global list for the time of the load


def _weights_only(raw: bytes | bytearray | memoryview) -> object:
    with _LOCK, torch.serialization.safe_globals(_SAFE):
        return torch.load(io.BytesIO(raw), weights_only=True)


# the memos' bounds: entries; parts and characters of a value saved; bytes of one loaded
_MEMO_ENTRIES = 4096
_MEMO_PARTS = 64
_MEMO_CHARS = 1024
_LOADED_BYTES = 4096

_LOADED: dict[bytes, object] = {}
"""Values loaded before that no caller can change (numbers, strings, None, and tuples of
them), by their stored bytes: the hyper-parameters of a flattened optimizer, one checking
``torch.load`` (0.15 ms) each at every restore."""


def _immutable(value: object) -> bool:
    kind = type(value)
    if value is None or kind in (bool, int, float, str, bytes):
        return True
    return kind is tuple and all(map(_immutable, value))  # type: ignore[call-overload]


def safe_load(raw: bytes | bytearray | memoryview, what: str) -> object:
    """Load a stored non-tensor value with ``weights_only=True``; refuse anything else."""
    key = bytes(raw) if len(raw) <= _LOADED_BYTES else None
    if key is not None and key in _LOADED:
        return _LOADED[key]
    try:
        value = _weights_only(raw)
    except Exception as e:
        raise UnsafeValueError(
            f"{what}: refused to load a value that needs code to run or is damaged "
            f"(torch.load(weights_only=True) said: {_refusal(e)}). If you saved this "
            "type yourself, allow it with torch.serialization.add_safe_globals") from None
    if key is not None and _immutable(value):
        if len(_LOADED) >= _MEMO_ENTRIES:
            _LOADED.clear()
        _LOADED[key] = value
    return value


_MEMO: dict[Hashable, bytes] = {}
"""Stored bytes of small plain values (numbers, strings, None and tuples, lists and dicts of
them) already serialized and checked, by exact contents: an optimizer's hyper-parameters
come back at every save, one per parameter once flattened (12 each for Adam: 3,500 values
for a model of 300 parameters), and each took a ``torch.save`` and a checking
``torch.load`` (0.2-0.4 ms)."""


def _plain_key(value: object, budget: list[int]) -> Hashable | None:
    """A key that names ``value`` exactly, its types and every float's bits (0.0 and -0.0,
    1 and 1.0 and True differ), or None when it is not a small plain value. Exact types
    only: a subclass (an IntEnum, a namedtuple) pickles as its class."""
    budget[0] -= 1
    if budget[0] < 0:
        return None
    kind = type(value)
    if value is None or kind is bool or kind is int:
        return (kind, value)
    if kind is float:
        return (kind, struct.pack("<d", value))
    if kind is str or kind is bytes:
        return (kind, value) if len(value) <= _MEMO_CHARS else None  # type: ignore[arg-type]
    if kind is tuple or kind is list:
        parts = [_plain_key(v, budget) for v in value]  # type: ignore[attr-defined]
        return None if None in parts else (kind, tuple(parts))
    if kind is dict:
        pairs = [(_plain_key(k, budget), _plain_key(v, budget))
                 for k, v in value.items()]  # type: ignore[attr-defined]
        return (None if any(a is None or b is None for a, b in pairs)
                else (kind, tuple(pairs)))
    return None


def check_loadable(key: str, raw: bytes | memoryview, what: str = "its value") -> None:
    """StateDictError naming ``key`` unless ``raw`` (torch.save's bytes) loads back with
    ``weights_only=True``, as every load reads it."""
    try:
        _weights_only(raw)
    except Exception as e:
        raise StateDictError(
            f"{key}: {what} would be refused by the load "
            f"(torch.load(weights_only=True): {_refusal(e)}); store it as tensors, "
            "numbers, strings, lists and dicts, or allow its type on every process "
            "that saves or loads with torch.serialization.add_safe_globals") from None


def serialize(key: str, value: object) -> RawBytes | io.BytesIO:
    """A non-tensor value's stored bytes, checked to load back with ``weights_only=True``;
    StateDictError naming ``key`` when a load could not restore it. A small plain value
    seen before takes its bytes from the memo (``_MEMO``)."""
    memo_key = _plain_key(value, [_MEMO_PARTS])
    if memo_key is not None:
        known = _MEMO.get(memo_key)
        if known is not None:
            return io.BytesIO(known)
    if isinstance(value, io.BytesIO):
        raw: io.BytesIO = RawBytes(value.getvalue())
    else:
        raw = io.BytesIO()
        try:
            torch.save(value, raw)
        except Exception as e:
            raise StateDictError(f"{key}: a {type(value).__name__} cannot be saved "
                                 f"({type(e).__name__}: {str(e)[:200]}); store its state as "
                                 "tensors, numbers, strings, lists and dicts") from None
        check_loadable(key, raw.getbuffer(), f"a {type(value).__name__}")
    if raw.getbuffer().nbytes > MAX_VALUE_BYTES:
        raise StateDictError(f"{key}: a {type(value).__name__} of {raw.getbuffer().nbytes} "
                             f"bytes is larger than a non-tensor value may be "
                             f"({MAX_VALUE_BYTES}); store large data as a tensor")
    if memo_key is not None:
        if len(_MEMO) >= _MEMO_ENTRIES:
            _MEMO.clear()
        _MEMO[memo_key] = raw.getvalue()
    return raw
