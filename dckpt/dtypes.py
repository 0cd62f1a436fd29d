"""torch dtypes <-> the dtype names of the format (dckpt.manifest keeps names and sizes only,
so that it imports no torch)."""

from __future__ import annotations

import torch

from dckpt.errors import FormatError
from dckpt.manifest import DTYPE_SIZES

__all__ = ["dtype_name", "dtype_from_name"]

_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name) for name in DTYPE_SIZES
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _NAMES[dtype]
    except KeyError:
        raise FormatError(f"dtype {dtype} has no name in the dckpt format; supported: "
                          f"{', '.join(sorted(_DTYPES))}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise FormatError(f"dtype {name!r} is not known to this torch") from None
