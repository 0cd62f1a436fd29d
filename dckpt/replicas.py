"""The memory tier across nodes: every node's folder, peer replicas, and restores that fetch
what a node lacks from the nodes that hold it.

Each node has its own memory folder. A memory save writes each rank's segments into its
node's folder, sends them to ``replicas`` ranks on the next nodes of a ring over the nodes
(``MemoryWriter``, over the memory save's gloo group, before the commit), and after the
commit copies the manifest to every node's folder. So each node holds the manifest, its
ranks' segments and replicas of the previous nodes' segments.

A restore takes every node's inventory (which manifests and whole segments it holds),
chooses the newest step whose every segment is whole somewhere (``choose``: the same on
every rank), and loads it through ``MemoryReader``: once the coordinator knows what each
rank reads, the segments a node lacks are sent to it by a node that holds them, before any
rank reads. Every block read is checked against its digest as always; where one fails,
the nodes check every block they hold, drop the damaged segments and choose again (from a
replica), and failing that the manager restores from storage.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from dckpt import dist, layout
from dckpt.blocks import check
from dckpt.errors import DckptError, IntegrityError, StorageError
from dckpt.manifest import ChunkEntry, StoredData
from dckpt.memory import bytes_tensor, mapped_segments, recycled_write, reserve
from dckpt.read_plan import share_replicated
from dckpt.reader import Reader
from dckpt.reads import Fetcher, read_stored
from dckpt.repository import committed_steps, read_manifest
from dckpt.storage import Store
from dckpt.writer import Writer

__all__ = ["Nodes", "Inventory", "Choice", "choose", "inventory", "MemoryWriter",
           "MemoryReader"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Nodes:
    """Which node each rank runs on (``of[rank]``), and the ring of replicas over them."""

    of: tuple[int, ...]

    @classmethod
    def gather(cls, group: Any) -> Nodes:
        """(all ranks) Every rank's node (``dist.node()``)."""
        return cls(tuple(int(n) for n in dist.gather(dist.node(), group)))  # type: ignore[call-overload]

    @functools.cached_property
    def names(self) -> list[int]:
        return sorted(set(self.of))

    @functools.cached_property
    def _ranks(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for rank, node in enumerate(self.of):
            out.setdefault(node, []).append(rank)
        return out

    def ranks(self, node: int) -> list[int]:
        return self._ranks.get(node, [])

    def leader(self, node: int) -> int:
        """The rank that keeps the node's folder (lists, prunes and removes it)."""
        return self.ranks(node)[0]

    def peer(self, rank: int, k: int) -> int:
        """The rank that holds replica ``k`` (1, 2...) of ``rank``'s segments: the one at the
        same place on the node ``k`` after ``rank``'s on the ring."""
        names = self.names
        mine = self.ranks(self.of[rank])
        there = self.ranks(names[(names.index(self.of[rank]) + k) % len(names)])
        return there[mine.index(rank) % len(there)]


@dataclass(frozen=True)
class Inventory:
    """What one node's memory folder holds: its whole segments' sizes, and for each
    committed manifest the size each segment it references must have at least."""

    node: int
    segments: dict[str, int]
    manifests: dict[int, dict[str, int]]


@dataclass(frozen=True)
class Choice:
    """The memory checkpoint to restore, the same on every rank."""

    step: int
    manifest_node: int
    holders: dict[str, tuple[int, ...]]
    """Each segment it needs -> the nodes that hold it whole."""
    sizes: dict[str, int] = field(default_factory=dict)


def choose(inventories: list[Inventory], storage_newest: int | None) -> Choice | None:
    """The newest step committed in some node's memory, not older than storage's newest,
    whose every segment is whole on some node; None where there is none."""
    steps = sorted({s for inv in inventories for s in inv.manifests}, reverse=True)
    for step in steps:
        if storage_newest is not None and step < storage_newest:
            break
        having = [inv for inv in inventories if step in inv.manifests]
        needs = having[0].manifests[step]
        holders = {seg: tuple(inv.node for inv in inventories
                              if inv.segments.get(seg, -1) >= size)
                   for seg, size in needs.items()}
        if all(holders.values()):
            sizes = {seg: next(inv.segments[seg] for inv in inventories
                               if inv.node == holders[seg][0]) for seg in needs}
            return Choice(step, having[0].node, holders, sizes)
        log.info("memory checkpoint of step %d: %d segments are whole on no node", step,
                 sum(not h for h in holders.values()))
    return None


def inventory(store: Store, node: int, *, check_blocks: bool = False) -> Inventory:
    """(a node's leader) What the node's memory folder at ``store`` holds. With
    ``check_blocks`` every block of every segment is checked first, and a damaged segment
    is deleted (a replica elsewhere serves it)."""
    manifests: dict[int, dict[str, int]] = {}
    for step in committed_steps(store):
        try:
            m = read_manifest(store, step)
        except Exception as e:  # unreadable here: another node's copy may do
            log.warning("memory tier %s: manifest of step %d unreadable: %s", store.url,
                        step, str(e))
            continue
        manifests[step] = m.extents()
        if check_blocks:
            _drop_damaged(store, m, step)
    segments: dict[str, int] = {}
    for attempt in store.list_names(layout.DATA_DIR):
        folder = os.path.join(store.url, layout.DATA_DIR, attempt)
        for name in os.listdir(folder) if os.path.isdir(folder) else []:
            if name.endswith(".seg"):
                segments[f"{layout.DATA_DIR}/{attempt}/{name}"] = os.path.getsize(
                    os.path.join(folder, name))
    return Inventory(node, segments, manifests)


def _drop_damaged(store: Store, manifest: Any, step: int) -> None:
    damaged: set[str] = set()
    with mapped_segments(store.url) as mapped:
        for fqn, _, b in manifest.blocks():
            if b.segment in damaged:
                continue
            mm = mapped(b.segment)
            if mm is None:
                continue
            try:
                check(memoryview(mm)[b.offset: b.offset + b.length], b,
                      what=f"memory checkpoint of step {step}, {fqn!r}")
            except IntegrityError as e:
                log.warning("%s; dropping the segment", str(e).splitlines()[0])
                damaged.add(b.segment)
    for seg in damaged:
        os.unlink(os.path.join(store.url, seg))


class MemoryWriter(Writer):
    """The memory tier's Writer: segments into this node's folder, replicas to the peer
    nodes before the commit, the manifest to every node after it."""

    shared_storage = False  # each node's folder holds its own ranks' segments

    def __init__(self, url: str, *, nodes: Nodes, replicas: int, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.nodes = nodes
        self.replicas = replicas

    def _group(self) -> Any:
        return dist.checkpoint_group(self.config.collective_timeout_s, purpose="memory")

    def open_segment(self, name: str, direct: bool, nbytes: int) -> Any:
        return recycled_write(self.store.url, os.path.join(self.store.url, name), nbytes)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        if not self.replicas:
            return super().write_data(plan, planner)
        try:
            future = super().write_data(plan, planner)
        except BaseException:
            self._replicate(None)  # in step with the other ranks, which then send nothing
            raise
        self._replicate(sorted({b.segment for r in future.value()
                                for b in r.storage_data.data.blocks}))
        return future

    def _replicate(self, written: list[str] | None) -> None:
        """(all ranks) Send this rank's segments to its peers and take theirs. Nothing is
        sent when a rank's writes failed (``written`` None) or one cannot hold what it
        would receive (a full folder): every rank learns it from the same gather first, so
        none waits for a peer that left (the failing rank raises; DCP tells the others)."""
        t0 = time.perf_counter()
        me, group = dist.rank(), self._group()
        mine = (None if written is None else
                [(name, os.path.getsize(os.path.join(self.store.url, name))) for name in written])
        everyone: list[list[tuple[str, int]] | None] = dist.gather(mine, group)  # type: ignore[assignment]
        if any(e is None for e in everyone):
            return
        senders = [(r, k) for k in range(1, self.replicas + 1)
                   for r in range(len(everyone)) if self.nodes.peer(r, k) == me]
        incoming = [(r, name, size) for r, _ in senders for name, size in everyone[r] or ()]
        into = reserve(self.store.url, [(n, s) for _, n, s in incoming], group,
                       f"cannot take its peers' replicas into {self.store.url} (free room "
                       "there, or lower memory_replicas)")
        if into is None:  # another rank cannot: it raises, DCP tells every rank
            return
        try:
            with mapped_segments(self.store.url) as mapped:
                sends = [(self.nodes.peer(me, k), bytes_tensor(mapped(name), size))
                         for k in range(1, self.replicas + 1) for name, size in mine or ()]
                dist.exchange(sends, [(r, t) for (r, _, _), t in
                                      zip(incoming, into.tensors, strict=True)], group)
            into.commit()
        finally:
            into.close()
        log.info("rank %d: %d segments (%d bytes) replicated to %s, %d received, in %.3f s",
                 me, len(mine or ()), sum(size for _, size in mine or ()),
                 [self.nodes.peer(me, k) for k in range(1, self.replicas + 1)], len(incoming),
                 time.perf_counter() - t0)

    def after_commit(self, group: Any) -> None:
        """(all ranks) The manifest, into every other node's folder."""
        if len(self.nodes.names) < 2:
            return
        raw = dist.broadcast(self.committed_raw if self.is_coordinator else None, group)
        me = dist.rank()
        node = self.nodes.of[me]
        if self.nodes.leader(node) == me and node != self.nodes.of[0]:
            assert isinstance(raw, bytes)
            try:
                self.store.create_exclusive(layout.manifest_name(self.step), raw)
            except FileExistsError:
                pass


class MemoryReader(Reader):
    """The memory tier's Reader: before any rank reads, each node gets the segments its
    ranks read and it lacks, from a node that holds them (``choice``)."""

    def __init__(self, url: str, *, nodes: Nodes, choice: Choice, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.nodes = nodes
        self.choice = choice
        self.tier = "memory"
        """After the load: "peer" where this rank read segments fetched from another node."""
        self._segments_memo: dict[MetadataIndex, frozenset[str]] = {}

    @property
    def broadcasts(self) -> bool:  # replicated state crosses nodes once, not per rank
        return len(self.nodes.names) > 1 or super().broadcasts

    @property
    def plans_items(self) -> bool:  # the coordinator plans the segments each node fetches
        return True

    def _segments_of(self, index: MetadataIndex) -> frozenset[str]:
        found = self._segments_memo.get(index)
        if found is None:
            stored = self._storage[index][1]
            data = stored.data if isinstance(stored, ChunkEntry) else stored
            assert isinstance(data, StoredData)
            found = self._segments_memo[index] = frozenset(b.segment for b in data.blocks)
        return found

    def _segments(self, plan: LoadPlan) -> set[str]:
        return {s for item in plan.items for s in self._segments_of(item.storage_index)}

    def _near(self, rank: int, index: MetadataIndex) -> bool:
        """Whether ``rank``'s node holds every segment of the box ``index``."""
        node = self.nodes.of[rank]
        return all(node in self.choice.holders[s] for s in self._segments_of(index))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """(coordinator) Plan the transfers: each segment a rank reads and its node lacks
        comes once to that node, from the first node that holds it."""
        if len(plans) > 1 and self.broadcasts:
            plans = share_replicated(plans, self._storage, self._near)
        plans, values = self._values_apart(plans)
        transfers: list[tuple[str, int, int, int]] = []  # segment, size, from, to
        fetched: dict[tuple[int, str], None] = {}
        peer: list[bool] = []
        for rank, plan in enumerate(plans):
            node = self.nodes.of[rank]
            remote = sorted(s for s in self._segments(plan)
                            if node not in self.choice.holders[s])
            for seg in remote:
                if (node, seg) not in fetched:
                    fetched[(node, seg)] = None
                    src = self.nodes.leader(self.choice.holders[seg][0])
                    transfers.append((seg, self.choice.sizes[seg], src, rank))
            peer.append(bool(remote))
        return [dataclasses.replace(p, storage_data=(p.storage_data, transfers, peer[r],
                                                     values))
                for r, p in enumerate(plans)]

    def _values_apart(self, plans: list[LoadPlan]) -> tuple[list[LoadPlan], list[Any]]:
        """Plans without the values stored on other nodes, and those values as (index,
        the rank that reads and sends it, the rank that takes it, its read item): a value
        (replicated state written once) is sent alone, not its whole segment."""
        values: list[Any] = []
        out = []
        for rank, plan in enumerate(plans):
            kept = []
            for item in plan.items:
                index = item.storage_index
                if (isinstance(self._storage[index][1], StoredData)
                        and not self._near(rank, index)):
                    holder = next((n for n in self.nodes.names
                                   if all(n in self.choice.holders[s]
                                          for s in self._segments_of(index))), None)
                    if holder is not None:
                        values.append((index, self.nodes.leader(holder), rank, item))
                        continue
                kept.append(item)
            out.append(dataclasses.replace(plan, items=kept))
        return out, values

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        shared, transfers, peer, values = plan.storage_data
        self._fetch(transfers)
        self._send_values(values, planner)
        self.tier = "peer" if peer else "memory"
        return super().read_data(dataclasses.replace(plan, storage_data=shared), planner)

    def _send_values(self, values: list[Any], planner: LoadPlanner) -> None:
        """(all ranks) The values planned apart, in one order everywhere: read and checked
        by the rank that holds them, checked again by the rank that takes them."""
        if not values:
            return
        me, group = dist.rank(), self._group()
        held: dict[int, Any] = {}  # read first: a value that fails its check here stops
        failure: DckptError | None = None  # every rank before any waits on a send
        with Fetcher(self.store, 1) as fetcher:
            for k, (index, src, _, _) in enumerate(values):
                if me == src and failure is None:
                    data = self._storage[index][1]
                    assert isinstance(data, StoredData)
                    try:
                        held[k] = read_stored(fetcher, data, self._what("value", index.fqn))
                    except DckptError as e:
                        failure = e
        if dist.any_true(failure is not None, group):
            raise failure or IntegrityError("a value this restore needs failed its check on "
                                            "the node that holds it")
        for k, (index, src, dst, item) in enumerate(values):
            kind, data = self._storage[index]
            assert isinstance(data, StoredData)
            what = self._what("value", index.fqn)
            if me == src:
                buf = held[k]
                if buf:
                    dist.exchange([(dst, torch.frombuffer(buf, dtype=torch.uint8))], [], group)
            elif me == dst:
                buf = bytearray(data.nbytes)
                if buf:
                    dist.exchange([], [(src, torch.frombuffer(buf, dtype=torch.uint8))], group)
                at = 0
                for b in data.blocks:  # memory saves store values raw and contiguous
                    check(memoryview(buf)[at: at + b.length], b, what=what)
                    at += b.length
                self.deliver_value(buf, index.fqn, kind, [item], planner)

    def _fetch(self, transfers: list[tuple[str, int, int, int]]) -> None:
        """(all ranks) The planned transfers, in one order everywhere; then every rank
        waits until all arrived."""
        if not transfers:
            return
        me, group = dist.rank(), self._group()
        outgoing: dict[int, torch.Tensor] = {}
        with mapped_segments(self.store.url) as mapped:
            def check() -> None:  # what this rank sends is here, whole
                for k, (seg, size, src, _) in enumerate(transfers):
                    if src == me:
                        outgoing[k] = bytes_tensor(mapped(seg), size)
                        if outgoing[k].numel() != size:
                            raise FileNotFoundError(f"{seg} is gone from {self.store.url}")

            into = reserve(self.store.url, [(seg, size) for seg, size, _, dst in transfers
                                            if dst == me], group,
                           "cannot send or take the segments a node lacks (free room in the "
                           "memory folder; the restore goes to storage)", check)
            if into is None:  # every rank stops: the reads after need them all
                raise StorageError("the segments a node lacks cannot be sent to it (another "
                                   "rank could not send or take them)")
            try:
                arriving = iter(into.tensors)
                for k, (_, _, src, dst) in enumerate(transfers):
                    if me == src:
                        dist.exchange([(dst, outgoing[k])], [], group)
                    elif me == dst:
                        dist.exchange([], [(src, next(arriving))], group)
                into.commit()
            finally:
                into.close()
        dist.any_true(False, group)  # a barrier: the node's other ranks read these files
        log.info("rank %d: %d segments fetched from other nodes' memory", me,
                 sum(1 for t in transfers if t[3] == me))
