"""Which blocks a save need not write: the repository already holds their bytes.

The index maps a block's digest (xxh3-128 of its raw bytes) and length to where a committed
checkpoint stores it. It comes only from a checkpoint this process knows good (``trusted``):
one it committed itself, or one it loaded whole (every byte verified), and only while that
checkpoint is still committed and every object its blocks lie in is there and long enough
(``usable_base``). A checkpoint damaged since, or one nobody here verified, is never a base:
the save writes in full instead, so damage does not spread into new checkpoints and never
stops training from saving. Each rank keeps the blocks of its own last save: when the
coordinator names that attempt as the next save's base, the rank does not read its manifest
back (``written``, ``index_for``); nothing needs calling after a commit, so ``dcp.save``
with a ``dckpt.Writer`` deduplicates as ``dckpt.save`` does.
A save adds its own new blocks as it goes (identical blocks in one save are written once).

Only blocks of committed checkpoints are referenced. A checkpoint deleted while a save that
references its blocks is in flight keeps its blocks for ``gc``'s grace period (``min_age_s``);
the commit checks that every object it references still exists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable
from itertools import chain

from dckpt.errors import DckptError, IntegrityError
from dckpt.manifest import BlockRef, Manifest, TensorEntry
from dckpt.repository import missing_object, read_manifest
from dckpt.storage import Store

__all__ = ["BlockIndex", "index_for", "written", "committed", "usable_base", "forget",
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
    the items' block-size history (see ``block_size_for``).

    No lock: each operation is one call into the dict's C code with keys of str and int,
    which runs no Python code and so is atomic under the GIL (and per dict in free-threaded
    builds). A lock per block made the writer threads queue behind the GIL (docs/design.md,
    Differential saves)."""

    def __init__(self, base: tuple[int, str] | None, refs: Iterable[BlockRef] = (),
                 history: History | None = None) -> None:
        self.base = base
        """The checkpoint (step, attempt) whose blocks these are; None for an empty index."""
        self._refs = {(r.digest, r.raw_length): r for r in refs}
        self.history: History = dict(history or {})

    def __len__(self) -> int:
        return len(self._refs)

    def copy(self) -> BlockIndex:
        """An index of the same blocks and history that grows on its own."""
        return BlockIndex(self.base, list(self._refs.values()), self.history)

    @classmethod
    def of_manifest(cls, m: Manifest, keys: Collection[str] | None = None) -> BlockIndex:
        """The blocks and history of the manifest's stored items, or of those whose
        ``item_key`` is in ``keys`` (the items a rank is about to write: at 10^6 references
        every rank indexing every rank's blocks took 0.5 KB and 1 us each)."""
        history: History = {}
        refs = []
        for fqn, e in m.items.items():
            chunks = ([(c.offsets, c.data) for c in e.chunks] if isinstance(e, TensorEntry)
                      else [(None, e.data)])
            for offsets, d in chunks:
                key = item_key(fqn, offsets)
                if keys is not None and key not in keys:
                    continue
                if d.count > 1:
                    history[key] = (d.block_size, None)
                refs.append(d.blocks)
        return cls((m.step, m.attempt), chain.from_iterable(refs), history)

    def get(self, digest: str, raw_length: int) -> BlockRef | None:
        return self._refs.get((digest, raw_length))

    def add(self, ref: BlockRef) -> None:
        self._refs.setdefault((ref[4], ref[3]), ref)  # (digest, raw_length)


class _State:
    """What this process knows of one repository (guarded by ``_lock``)."""

    def __init__(self) -> None:
        self.written: BlockIndex | None = None
        """This rank's blocks of its last save there (``written``): the next save's index
        when the coordinator names that attempt as the base."""
        self.trusted: tuple[int, str] | None = None
        """(coordinator) The (step, attempt) known good: committed here, or loaded whole."""
        self.extents: dict[str, int] | None = None
        """(coordinator) Per object the trusted step's blocks lie in, the bytes they need."""


_state: dict[str, _State] = {}  # store URL -> what this process knows of it
_lock = threading.Lock()


def _of(store: Store) -> _State:
    return _state.setdefault(store.url, _State())


def forget() -> None:
    """Forget every repository: what a restarted process knows."""
    with _lock:
        _state.clear()


def index_for(store: Store, base: tuple[int, str] | None,
              keys: Collection[str] | None = None) -> BlockIndex:
    """(all ranks, before writing) A fresh index of the blocks of the base checkpoint
    ``(step, attempt)`` the coordinator chose (None: empty): this rank's own blocks when its
    last save was that attempt, else the base's manifest's, of the items ``keys`` names
    (``item_key``: the items this rank writes) or of every item."""
    if base is None:
        return BlockIndex(None)
    with _lock:
        written = _of(store).written
    if written is not None and written.base == base:
        return written.copy()
    try:
        m = read_manifest(store, base[0])
    except DckptError as e:  # deleted or damaged since the listing: write everything
        log.warning("no dedup against step %d of %s: %s", base[0], store.url, str(e))
        return BlockIndex(None)
    if m.attempt != base[1]:
        log.warning("no dedup against step %d of %s: it was committed again meanwhile",
                    base[0], store.url)
        return BlockIndex(None)
    return BlockIndex.of_manifest(m, keys)


def written(store: Store, base: tuple[int, str], refs: Iterable[BlockRef],
            history: History) -> None:
    """(all ranks, after writing attempt ``base = (step, attempt)``) This rank's blocks and
    items' history: the next save's index, if the coordinator commits the attempt and names
    it as the next save's base (``index_for``); nothing to call after the commit."""
    with _lock:
        _of(store).written = BlockIndex(base, refs, history)


def committed(store: Store, base: tuple[int, str], ends: dict[str, int]) -> None:
    """(coordinator, after a commit or a load that read and verified every byte) The
    checkpoint ``(step, attempt)`` and all its blocks are known good: the next save's base,
    checked by ``usable_base`` without reading its manifest again; ``ends``: its objects'
    ``extents``."""
    with _lock:
        state = _of(store)
        state.trusted, state.extents = base, ends


def usable_base(store: Store, committed_steps: list[int]) -> tuple[int, str] | None:
    """(coordinator, before a save writes) The trusted checkpoint, if it is still committed,
    and every block inside an object that is there; else None (a warning says why): the
    save then writes every block."""
    with _lock:
        state = _of(store)
        base, ends = state.trusted, state.extents
    if base is None or base[0] not in committed_steps or ends is None:
        return None
    try:
        why = missing_object(store, ends)
        if why is not None:
            raise IntegrityError(why)
    except (DckptError, OSError) as e:
        log.warning("no dedup against step %d of %s: %s; this save writes every block",
                    base[0], store.url, str(e))
        with _lock:
            _of(store).trusted = None
        return None
    return base
