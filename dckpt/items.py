"""One stored item read whole and made what was saved: a tensor (its chunks assembled) or a
value loaded with ``weights_only=True``, every byte verified (export, status). The reads
themselves are ``dckpt.reads``, which stays free of torch."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch

from dckpt.dtypes import dtype_from_name
from dckpt.manifest import Manifest, TensorEntry
from dckpt.reads import READ_THREADS, Fetcher, read_stored
from dckpt.storage import Store
from dckpt.values import safe_load

__all__ = ["read_item", "read_value"]


def read_value(store: Store, m: Manifest, fqn: str) -> Any:
    """One item of checkpoint ``m``, whole (a tensor, or a value loaded with
    weights_only=True), every byte verified."""
    if fqn not in m.items:
        raise KeyError(f"checkpoint step {m.step} has no item {fqn!r}")
    try:
        with Fetcher(store, READ_THREADS) as fetcher:
            return read_item(fetcher, m, fqn, lambda n: None)
    finally:
        store.close_files()


def read_item(fetcher: Fetcher, m: Manifest, fqn: str, step: Callable[[int], None]) -> Any:
    """Item ``fqn`` of ``m`` whole: a tensor (its chunks assembled) or a value; ``step(n)``
    after every n bytes."""
    e = m.items[fqn]
    what = f"item {fqn!r} of checkpoint step {m.step} in {fetcher.store.url}"
    if not isinstance(e, TensorEntry):
        raw = read_stored(fetcher, e.data, what)
        step(len(raw))
        return io.BytesIO(bytes(raw)) if e.encoding == "bytes" else safe_load(raw, what)
    dtype = dtype_from_name(e.dtype)
    full = torch.empty(e.size, dtype=dtype)
    for c in e.chunks:
        raw = read_stored(fetcher, c.data, what)
        shard = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
        box = full
        for dim, (o, n) in enumerate(zip(c.offsets, c.sizes)):
            box = box.narrow(dim, o, n)
        box.copy_(shard.reshape(c.sizes))
        step(len(raw))
    return full
