"""Which blocks a save need not write: the repository already holds their bytes.

The index maps a block's digest (xxh3-128 of its raw bytes) and length to where a committed
checkpoint stores it. It comes only from a checkpoint this process knows good (``trusted``):
one it committed itself, or one it loaded whole (every byte verified), and only while that
checkpoint is still committed and every object its blocks lie in is there and long enough
(``usable_base``). A checkpoint damaged since, or one nobody here verified, is never a base:
the save writes in full instead, so damage does not spread into new checkpoints and never
stops training from saving. Within one process the index of the save just committed is
kept, so the next save does not read its manifest back.
A save adds its own new blocks as it goes (identical blocks in one save are written once).

Only blocks of committed checkpoints are referenced. A checkpoint deleted while a save that
references its blocks is in flight keeps its blocks for ``gc``'s grace period (``min_age_s``);
the commit checks that every object it references still exists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from dckpt.errors import DckptError, IntegrityError
from dckpt.manifest import BlockRef, Manifest, TensorEntry, stored_datas
from dckpt.repository import read_manifest
from dckpt.storage import Store

__all__ = ["BlockIndex", "index_for", "remember", "trust", "usable_base", "record_extents",
           "block_size_for", "item_key"]

log = logging.getLogger(__name__)


History = dict[str, tuple[int, float | None]]
"""Per stored item (``item_key``): the block size of its last save and the fraction of its
blocks that save had to write (None when only the size is known, from a manifest)."""

DENSE = 0.9
"""An item whose save wrote at least this fraction of its blocks changed densely."""


def item_key(fqn: str, offsets: Iterable[int] | None) -> str:
    return fqn if offsets is None else f"{fqn}@{','.join(str(o) for o in offsets)}"


def block_size_for(history: History, key: str, nbytes: int, default: int,
                   sparse: int | None) -> int:
    """The block size for an item: ``sparse`` for one whose last save wrote some of its
    blocks but not most (sparse updates: an embedding table, say, where small blocks find
    the unchanged rows), back to ``default`` once it changes densely; an unchanged item keeps
    its size, so that it keeps matching. The save that changes an item's size matches none of
    its blocks, so it records no fraction: the size holds until the next save measures."""
    if sparse is not None and sparse >= default:
        sparse = None
    last = history.get(key)
    if sparse is None or last is None or nbytes < 16 * default:
        return default if last is None or sparse is None else last[0]
    size, fraction = last
    if fraction is None or fraction == 0.0:
        return size
    return sparse if fraction < DENSE else default


class BlockIndex:
    """digest and raw length -> a stored block; safe to share between writer threads. Also
    the items' block-size history (see ``block_size_for``)."""

    def __init__(self, base_step: int | None, refs: Iterable[BlockRef] = (),
                 history: History | None = None) -> None:
        self.base_step = base_step
        self._refs = {(r.digest, r.raw_length): r for r in refs}
        self.history: History = dict(history or {})
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._refs)

    @classmethod
    def of_manifest(cls, m: Manifest) -> BlockIndex:
        history: History = {}
        for fqn, e in m.items.items():
            chunks = ([(c.offsets, c.data) for c in e.chunks] if isinstance(e, TensorEntry)
                      else [(None, e.data)])
            for offsets, d in chunks:
                if len(d.blocks) > 1:
                    history[item_key(fqn, offsets)] = (d.blocks[0].raw_length, None)
        return cls(m.step, (b for e in m.items.values() for d in stored_datas(e)
                            for b in d.blocks), history)

    def get(self, digest: str, raw_length: int) -> BlockRef | None:
        return self._refs.get((digest, raw_length))

    def add(self, ref: BlockRef) -> None:
        with self._lock:
            self._refs.setdefault((ref.digest, ref.raw_length), ref)


_last: dict[str, BlockIndex] = {}  # store URL -> blocks of this process's last commit there
_last_lock = threading.Lock()


def index_for(store: Store, base_step: int | None) -> BlockIndex:
    """A fresh index of the blocks of committed checkpoint ``base_step`` (None: empty)."""
    if base_step is None:
        return BlockIndex(None)
    with _last_lock:
        last = _last.get(store.url)
    if last is not None and last.base_step == base_step:
        return BlockIndex(base_step, last._refs.values(), last.history)
    try:
        return BlockIndex.of_manifest(read_manifest(store, base_step))
    except DckptError as e:  # deleted or damaged since the listing: write everything
        log.warning("no dedup against step %d of %s: %s", base_step, store.url, e)
        return BlockIndex(None)


def remember(store: Store, step: int, refs: Iterable[BlockRef], history: History) -> None:
    """(after a commit) This rank's blocks of committed ``step`` and its items' history:
    the next save's index."""
    with _last_lock:
        _last[store.url] = BlockIndex(step, refs, history)
        _trusted[store.url] = step


_trusted: dict[str, int] = {}  # store URL -> the checkpoint this process knows good there


def trust(store: Store, step: int) -> None:
    """(after a load that read and verified every byte of ``step``) A base for the next save."""
    with _last_lock:
        _trusted[store.url] = step


_extents: dict[str, tuple[int, dict[str, int]]] = {}
"""store URL -> the trusted step and, per object its blocks lie in, the bytes they need."""


def record_extents(store: Store, step: int, refs: Iterable[BlockRef]) -> dict[str, int]:
    """(coordinator, after a commit or a restore) The bytes each object must hold for the
    blocks of ``step``: what ``usable_base`` checks before later saves, without reading the
    manifest again."""
    ends: dict[str, int] = {}
    for b in refs:
        ends[b.segment] = max(ends.get(b.segment, 0), b.offset + b.length)
    with _last_lock:
        _extents[store.url] = (step, ends)
    return ends


def usable_base(store: Store, committed: list[int]) -> int | None:
    """(coordinator, before a save writes) The trusted checkpoint, if it is still committed,
    its manifest sound, and every block inside an object that is there; else None (a
    warning says why): the save then writes every block."""
    with _last_lock:
        step = _trusted.get(store.url)
    if step is None or step not in committed:
        return None
    try:
        with _last_lock:
            known = _extents.get(store.url)
        ends = known[1] if known is not None and known[0] == step else None
        if ends is None:  # a restored base: its manifest once, then kept
            ends = record_extents(store, step, (b for _, _, b in read_manifest(store, step).blocks()))
        sizes: dict[str, dict[str, int]] = {}
        for segment, end in ends.items():
            folder, _, base = segment.rpartition("/")
            if folder not in sizes:
                sizes[folder] = store.list_sizes(folder)
            if end > sizes[folder].get(base, -1):
                raise IntegrityError(f"object {segment} is missing or shorter than the "
                                     f"{end} bytes its blocks need")
    except (DckptError, OSError) as e:
        log.warning("no dedup against step %d of %s: %s; this save writes every block",
                    step, store.url, e)
        with _last_lock:
            _trusted.pop(store.url, None)
        return None
    return step
