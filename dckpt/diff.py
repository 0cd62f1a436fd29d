"""What differs between two checkpoints, from their manifests alone (pure: no data read).

An item is the same when its dtype, shape, shards and every block's digest are; a changed
item reports how many of its bytes sit in blocks that differ. ``bytes_shared``: the stored
bytes of the second checkpoint that the first also references (the same block in the same
object), the saving of a differential save.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from dckpt.manifest import BlockRef, Manifest, StoredData, TensorEntry, stored_datas

__all__ = ["ItemDiff", "Diff", "diff_manifests"]


@dataclass(frozen=True)
class ItemDiff:
    fqn: str
    change: str
    """"added", "removed", "changed", "layout" (dtype, shape or sharding differ)."""
    nbytes: int
    """The item's size in the second checkpoint (the first for "removed")."""
    changed_bytes: int
    """Bytes in blocks whose digest differs (the whole item for added/removed/layout)."""


@dataclass(frozen=True)
class Diff:
    step_a: int
    step_b: int
    items: tuple[ItemDiff, ...]
    """Only the items that differ."""
    same: int
    """Items equal in both."""
    bytes_b: int
    bytes_shared: int

    @property
    def changed_bytes(self) -> int:
        return sum(i.changed_bytes for i in self.items)


def _layout(m: Manifest, fqn: str) -> tuple:
    e = m.items[fqn]
    if isinstance(e, TensorEntry):
        return ("tensor", e.dtype, tuple(e.size),
                tuple((tuple(c.offsets), tuple(c.sizes)) for c in e.chunks))
    return ("value",)


def _offsets(d: StoredData) -> Iterator[tuple[int, BlockRef]]:
    pos = 0
    for x in d.blocks:
        yield pos, x
        pos += x.raw_length


def _changed_bytes(a: list[StoredData], b: list[StoredData]) -> int:
    changed = 0
    for da, db in zip(a, b):
        if [x.raw_length for x in da.blocks] == [x.raw_length for x in db.blocks]:
            changed += sum(xb.raw_length for xa, xb in zip(da.blocks, db.blocks)
                           if xa.digest != xb.digest)
        else:  # other block sizes: unchanged where the first has the same bytes in place
            known = {(o, x.raw_length, x.digest) for o, x in _offsets(da)}
            changed += sum(x.raw_length for o, x in _offsets(db)
                           if (o, x.raw_length, x.digest) not in known)
    return changed


def diff_manifests(a: Manifest, b: Manifest) -> Diff:
    items, same = [], 0
    for fqn in sorted(a.items.keys() | b.items.keys()):
        if fqn not in a.items:
            n = b.items[fqn].nbytes
            items.append(ItemDiff(fqn, "added", n, n))
        elif fqn not in b.items:
            n = a.items[fqn].nbytes
            items.append(ItemDiff(fqn, "removed", n, n))
        elif _layout(a, fqn) != _layout(b, fqn):
            n = b.items[fqn].nbytes
            items.append(ItemDiff(fqn, "layout", n, n))
        else:
            changed = _changed_bytes(stored_datas(a.items[fqn]), stored_datas(b.items[fqn]))
            if changed:
                items.append(ItemDiff(fqn, "changed", b.items[fqn].nbytes, changed))
            else:
                same += 1
    in_a = {(segment, offset) for segment, offset, _ in a.spans()}
    seen: set[tuple[str, int]] = set()
    total = shared = 0
    for segment, offset, length in b.spans():
        if (segment, offset) in seen:
            continue
        seen.add((segment, offset))
        total += length
        if (segment, offset) in in_a:
            shared += length
    return Diff(a.step, b.step, tuple(items), same, total, shared)
