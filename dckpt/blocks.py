"""Cut bytes into blocks, hash them and check them on the way back (pure, no I/O)."""

from __future__ import annotations

import xxhash

from dckpt.errors import IntegrityError
from dckpt.manifest import BlockRef

__all__ = ["cut", "digest", "check"]


def cut(nbytes: int, block_size: int) -> list[tuple[int, int]]:
    """The (start, length) of each block of ``nbytes`` bytes: fixed size, the last one shorter."""
    return [(start, min(block_size, nbytes - start)) for start in range(0, nbytes, block_size)]


def digest(buf: memoryview | bytes) -> str:
    """xxh3-128 of the raw bytes, as 32 lowercase hex digits."""
    return xxhash.xxh3_128_hexdigest(buf)


def check(buf: memoryview | bytes, ref: BlockRef, *, what: str) -> None:
    """Raise IntegrityError unless ``buf`` holds exactly the raw bytes ``ref`` describes."""
    if len(buf) != ref.raw_length:
        raise IntegrityError(
            f"{what}: block at {ref.segment}@{ref.offset} holds {len(buf)} bytes, expected "
            f"{ref.raw_length}; the object is truncated or damaged")
    found = digest(buf)
    if found != ref.digest:
        raise IntegrityError(
            f"{what}: block at {ref.segment}@{ref.offset} ({ref.length} bytes) has xxh3-128 "
            f"{found}, the manifest says {ref.digest}; the object is damaged. Restore from "
            "another checkpoint (load with step=None falls back by itself)")
