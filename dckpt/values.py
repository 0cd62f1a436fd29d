"""Non-tensor values: their stored bytes and back, never running code from a checkpoint.

A value is stored as ``torch.save`` bytes that must load with ``weights_only=True`` (checked
at save time, so that what a save accepts a load restores), or, for an ``io.BytesIO``, as its
raw contents (``RawBytes``, encoding ``"bytes"``).
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from typing import Any

import torch

from dckpt.errors import StateDictError, UnsafeValueError
from dckpt.manifest import MAX_VALUE_BYTES

__all__ = ["RawBytes", "safe_load", "serialize"]


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


def safe_load(raw: bytes | bytearray | memoryview, what: str) -> object:
    """Load a stored non-tensor value with ``weights_only=True``; refuse anything else."""
    try:
        return _weights_only(raw)
    except Exception as e:
        raise UnsafeValueError(
            f"{what}: refused to load a value that needs code to run or is damaged "
            f"(torch.load(weights_only=True) said: {_refusal(e)}). If you saved this "
            "type yourself, allow it with torch.serialization.add_safe_globals") from None


def serialize(key: str, value: object) -> RawBytes | io.BytesIO:
    """A non-tensor value's stored bytes, checked to load back with ``weights_only=True``;
    StateDictError naming ``key`` when a load could not restore it."""
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
        try:
            _weights_only(raw.getbuffer())
        except Exception as e:
            raise StateDictError(
                f"{key}: a {type(value).__name__} would be refused by the load "
                f"(torch.load(weights_only=True): {_refusal(e)}); store it as tensors, "
                "numbers, strings, lists and dicts, or allow its type on every process "
                "that saves or loads with torch.serialization.add_safe_globals") from None
    if raw.getbuffer().nbytes > MAX_VALUE_BYTES:
        raise StateDictError(f"{key}: a {type(value).__name__} of {raw.getbuffer().nbytes} "
                             f"bytes is larger than a non-tensor value may be "
                             f"({MAX_VALUE_BYTES}); store large data as a tensor")
    return raw
