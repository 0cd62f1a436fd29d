"""torch dtypes <-> the dtype names of the format (dckpt.manifest keeps names and sizes only,
so that it imports no torch), and a tensor's memory as bytes."""

from __future__ import annotations

import torch

from dckpt.errors import FormatError
from dckpt.manifest import DTYPE_SIZES

__all__ = ["dtype_name", "dtype_from_name", "flat_bytes"]

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


def flat_bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view, no copy). A tensor of
    one element or none is contiguous whatever its stride, and reshape and contiguous()
    keep that stride (a view of every other element, cut to one or to none), which a view
    as bytes refuses: a load into one failed with "self.stride(-1) must be 1", and so did a
    save of an empty bfloat16 one. Its stride is set to 1 (the same element, or none)."""
    flat = t.reshape(-1)
    if flat.numel() <= 1 and flat.stride(0) != 1:
        flat = flat.as_strided((flat.numel(),), (1,))
    return flat.view(torch.uint8)
