"""Tensors on the meta device in a load's destination: shapes without memory. DCP replaces a
plain value's in the state dict by one holding the loaded values; an object that loads
through its ``load_state_dict`` (a module) would copy them into the meta tensors, which
keeps nothing, and the load would report success with the object unchanged."""

from __future__ import annotations

from typing import Any

import torch

from dckpt.torch_internals import held_tensors, is_dtensor

__all__ = ["materialize_meta", "meta_keys", "meta_problem"]


def _is_meta(t: torch.Tensor) -> bool:
    return t.device.type == "meta" or any(x.device.type == "meta" for x in held_tensors(t))


def materialize_meta(obj: Any) -> Any:
    """Replace, in the dicts and lists of ``obj``, every plain meta tensor by an empty CPU
    tensor of its shape and dtype (what DCP's load does with a gloo group)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = materialize_meta(v)
    elif isinstance(obj, list):
        obj[:] = [materialize_meta(v) for v in obj]
    elif isinstance(obj, torch.Tensor) and obj.device.type == "meta" and not is_dtensor(obj):
        return torch.empty_like(obj, device="cpu")
    return obj


def meta_keys(obj: Any, prefix: str) -> list[str]:
    """The keys, dotted from ``prefix``, of the meta tensors in ``obj`` (nested dicts,
    lists and tuples)."""
    if isinstance(obj, torch.Tensor):
        return [prefix] if _is_meta(obj) else []
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, list | tuple):
        items = enumerate(obj)
    else:
        return []
    return [k for key, v in items for k in meta_keys(v, f"{prefix}.{key}")]


def meta_problem(key: str, obj: object, keys: list[str]) -> str:
    """Why the object under top-level ``key`` cannot load while ``keys`` are meta tensors."""
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    return (f"{key}: {len(keys)} tensor{'s' if len(keys) != 1 else ''} of this "
            f"{type(obj).__name__} {'are' if len(keys) != 1 else 'is'} on the meta device "
            f"({shown}): its load_state_dict would copy nothing into them; materialize it "
            "first (module.to_empty(device=...)), or load into a state dict of your own and "
            "call load_state_dict(sd, assign=True)")
