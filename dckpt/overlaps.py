"""Destination tensors of a load that share memory.

A load reads each key's bytes into its destination and checks them there against their
digests. Two keys whose destinations overlap would write into each other: the check of the
first then fails, and a sound checkpoint was reported damaged and skipped for an older one.
So:

- one view under several keys (tied weights: an output projection that is the embedding)
  is loaded once into its first key; the others are read into memory of their own and
  compared after the reads, equal or refused (``shared_memory``, ``read_apart``,
  ``differing``);
- plain tensors that overlap in part (views of one buffer that share some elements, as a
  save of them stores) are each read into memory of their own; after the reads each is
  copied into its destination, and each destination must then hold its key's values: the
  checkpoint agrees on the elements they share, or the load is refused naming both keys.
  Other destinations that overlap in part (DTensors) are refused before any read.

dckpt's load planner does this as it sets up; under ``dcp.load`` with DCP's own planner the
Reader does it around its reads (``ReadApart``): DCP's planner loaded the later key's values
into both keys there, silently, wherever the destination took its values through a copy (a
transposed view, a GPU tensor).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from dckpt.dtypes import flat_bytes
from dckpt.errors import StateDictError, listing
from dckpt.state_checks import PLAIN
from dckpt.torch_internals import held_tensors, is_dtensor

__all__ = ["shared_memory", "read_apart", "differing", "Tied", "ReadApart"]


class _Span(NamedTuple):
    start: int
    end: int  # bytes of the storage, end exclusive
    order: int
    key: str
    t: torch.Tensor


class Tied(NamedTuple):
    key: str
    first: str
    """The key whose destination receives the values; ``key``'s are read apart. With
    ``overlap``: a key whose destination shares some elements with ``key``'s."""
    overlap: bool = False
    """``key``'s own destination receives its values, copied after the reads (views that
    share some elements); then it must hold them."""


def _span(t: torch.Tensor, order: int, key: str) -> _Span:
    size = t.element_size()
    start = int(t.storage_offset()) * size
    last = sum((int(n) - 1) * abs(s) for n, s in zip(t.shape, t.stride(), strict=True))
    return _Span(start, start + (last + 1) * size, order, key, t)


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.storage_offset(), a.shape, a.stride(), a.dtype) == (
        b.storage_offset(), b.shape, b.stride(), b.dtype)


def _share_elements(a: _Span, b: _Span) -> bool:
    """Whether two views whose byte ranges intersect share an element: marked one byte per
    element over the bytes they span (views of one dtype size; others count as sharing)."""
    size = a.t.element_size()
    if b.t.element_size() != size or a.start % size or b.start % size:
        return True
    base = min(a.start, b.start) // size
    marks = torch.zeros(max(a.end, b.end) // size - base, dtype=torch.uint8)
    for s in (a, b):
        marks.as_strided(s.t.shape, s.t.stride(), s.t.storage_offset() - base).add_(1)
    return bool((marks > 1).any())


def shared_memory(flat: dict[str, Any]) -> tuple[list[str], list[Tied]]:
    """(one rank) Problems of a flattened destination state dict whose tensors overlap in
    part (other than plain tensors), the keys tied to an earlier key's very view, and the
    keys whose plain tensors overlap another's in part (``Tied.overlap``)."""
    problems: list[str] = []
    tied: dict[str, Tied] = {}
    overlaps: list[tuple[str, str]] = []
    for views in _sharing(flat):
        spans = sorted(_span(t, order, key) for order, key, t in views)
        for i, a in enumerate(spans):
            for j in range(i + 1, len(spans)):
                b = spans[j]
                if b.start >= a.end:
                    break
                first, later = (a, b) if a.order < b.order else (b, a)
                if later.key in tied or first.key == later.key:
                    continue
                problem = _pair(flat, first, later, tied, overlaps)
                if problem:
                    problems.append(problem)
    for pair in overlaps:  # a key tied to another's view: that key's destination holds it
        one, two = (tied[k].first if k in tied and not tied[k].overlap else k for k in pair)
        for key, other in ((one, two), (two, one)):
            if key != other and key not in tied:
                tied[key] = Tied(key, other, overlap=True)
    return problems, sorted(tied.values(), key=lambda t: t.key)


View = tuple[int, str, torch.Tensor]  # (the key's order, the key, a tensor it holds)


def _sharing(flat: dict[str, Any]) -> list[list[View]]:
    """The tensors of ``flat`` grouped by the storage they view, groups of two or more."""
    by_base: dict[int, list[View]] = {}
    for order, (key, value) in enumerate(flat.items()):
        if type(value) in PLAIN:  # most: no held_tensors; three calls each (20,000 tensors
            held: list[torch.Tensor] = [value]  # in 0.02 s with the collector paused)
        elif isinstance(value, torch.Tensor):
            held = held_tensors(value)
        else:
            continue
        for t in held:
            try:  # where its storage begins
                base = t.data_ptr() - int(t.storage_offset()) * t.element_size()
            except (RuntimeError, ValueError):  # no storage (sparse, lazy): refused as it is
                continue
            by_base.setdefault(base, []).append((order, key, t))
    by_storage: dict[tuple[torch.device, int], list[View]] = {}
    for base, views in by_base.items():
        if len(views) > 1:
            for order, key, t in views:
                if (t.layout == torch.strided and not t.is_nested and t.numel()
                        and t.device.type != "meta"):  # the others are refused as they are
                    by_storage.setdefault((t.device, base), []).append((order, key, t))
    return [views for views in by_storage.values() if len(views) > 1]


def _pair(flat: dict[str, Any], first: _Span, later: _Span, tied: dict[str, Tied],
          overlaps: list[tuple[str, str]]) -> str | None:
    """Two views whose bytes intersect: ``later`` tied to ``first``'s key (into ``tied``),
    a pair of plain tensors that share some elements (into ``overlaps``), or the problem
    they make."""
    if _same_view(first.t, later.t):
        if _tieable(flat[first.key], flat[later.key]):
            root = tied[first.key].first if first.key in tied else first.key
            tied[later.key] = Tied(later.key, root)
            return None
        return (f"{later.key}: the same memory as {first.key} (tied weights), which a load "
                "takes only into plain tensors and DTensors; load into separate tensors")
    if _share_elements(first, later):
        if type(flat[first.key]) in PLAIN and type(flat[later.key]) in PLAIN:
            overlaps.append((first.key, later.key))
            return None
        return (f"{later.key}: its memory overlaps that of {first.key} in part (views of one "
                "tensor that share elements), which a load takes only into plain tensors. "
                "Load into tensors that do not overlap, or into one tensor under both keys "
                "(tied weights)")
    return None


def _tieable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Destinations read apart into a twin of their own: plain tensors and DTensors."""
    return (type(a) in PLAIN and type(b) in PLAIN) or (is_dtensor(a) and is_dtensor(b))


def differing(flat: dict[str, Any], tied: list[Tied], destinations: dict[str, Any]
              ) -> list[str]:
    """(one rank, after the reads) Copy the values of keys that overlap another in part
    into their ``destinations`` (``read_apart``'s), then the keys whose values, read apart,
    differ bit for bit: a tied key's from its first key's, an overlapping key's from its
    destination's (the checkpoint holds other values for the elements they share)."""
    def bits(t: torch.Tensor) -> torch.Tensor:
        (local,) = held_tensors(t)
        return flat_bytes(local.detach().resolve_conj().resolve_neg().contiguous())

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        if a.device != b.device:  # a plain tensor's twin is on the host (planner)
            a, b = a.cpu(), b.cpu()
        return torch.equal(a, b)

    overlapping = [t for t in tied if t.overlap]
    with torch.no_grad():
        for t in overlapping:
            destinations[t.key].copy_(flat[t.key])
    return [f"{t.key}: its memory overlaps that of {t.first} in part, and the checkpoint "
            "holds different values for the elements they share; load into tensors that do "
            "not overlap" if t.overlap else
            f"{t.key}: one tensor with {t.first} in the state dict (tied weights), but the "
            "checkpoint holds different values for the two; load into separate tensors, or "
            "leave one of the keys out (partial=True)"
            for t in tied if not same(bits(flat[t.key]), bits(
                destinations[t.key] if t.overlap else flat[t.first]))]


def read_apart(flat: dict[str, Any], tied: list[Tied]) -> dict[str, Any]:
    """Give each tied key of ``flat`` a twin to be read into, in place of its destination
    (a plain tensor's twin on the host: a tied embedding gets no second copy on the GPU, not
    even for the load); the destinations replaced, by key."""
    replaced = {}
    for t in tied:
        dest = replaced[t.key] = flat[t.key]
        flat[t.key] = (torch.empty(dest.shape, dtype=dest.dtype) if type(dest) in PLAIN
                       else torch.empty_like(dest))
    return replaced


class ReadApart:
    """(one rank, around its reads) The shared memory of another planner's destinations
    (DCP's DefaultLoadPlanner under ``dcp.load``, which reads every key into its own
    destination): tied and overlapping keys read into twins, compared (and copied) after
    the reads, the other partial overlaps refused before any read; ``finish`` puts the
    destinations back."""

    def __init__(self, flat: dict[str, Any]) -> None:
        problems, self.tied = shared_memory(flat)
        if problems:
            raise StateDictError(listing("the state dict does not fit the checkpoint",
                                         problems))
        self.flat = flat
        self.replaced = read_apart(flat, self.tied)

    def finish(self, *, read: bool) -> None:
        """Where the reads completed (``read``), copy overlapping keys' values into their
        destinations; put the destinations back; refuse keys whose values differ."""
        problems = differing(self.flat, self.tied, self.replaced) if read else []
        self.flat.update(self.replaced)
        if problems:
            raise StateDictError(listing("the state dict does not fit the checkpoint",
                                         problems))
