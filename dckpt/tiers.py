"""The CheckpointManager's memory tier beside its storage tier: memory saves on a schedule of
their own, and restores from whichever tier holds the newest checkpoint.

Memory saves go through an AsyncSaver of their own (its own staging memory, persist thread
and gloo group, ``purpose="memory"``), so that a memory save never waits behind a storage
save still writing. Each is self-contained (no dedup, no compression, buffered writes into
``/dev/shm``, by ``replicas.MemoryWriter``: replicas to the next nodes, the manifest to
every node); after its commit the node's leader (its lowest rank) prunes the older one, so
the tier holds the newest committed checkpoint, the one being written, and the one being
copied to storage. A restore chooses from every node's inventory (``replicas.choose``) and
reads through ``replicas.MemoryReader``, which fetches what a node lacks.

A storage save is a copy of a memory checkpoint (``drain``): the step is saved into memory,
and once that commits each rank hands its items, mapped from the memory files and checked
against their digests, to a storage Writer (deduplicating against storage's own base) on a
gloo group of its own (``purpose="drain"``). The device is copied from once per step,
whichever tiers save it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import torch
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.stateful import Stateful

from dckpt import api, dist, layout
from dckpt.config import LoadConfig, SaveConfig
from dckpt.errors import (
    ArgumentError,
    CommitError,
    DckptError,
    StateDictError,
    StorageError,
    headline,
)
from dckpt.global_plan import PlanCache, run_save
from dckpt.handle import SaveHandle
from dckpt.info import CheckpointInfo
from dckpt.memory import MemoryTier, room_problem
from dckpt.planner import StagedPlanner
from dckpt.replicas import Choice, Inventory, MemoryReader, MemoryWriter, Nodes, choose, inventory
from dckpt.repository import committed_steps, open_repository, read_manifest_raw
from dckpt.saver import AsyncSaver, lower_priority
from dckpt.torch_internals import held_tensors
from dckpt.triggers import Trigger
from dckpt.writer import Writer

__all__ = ["MemorySaves", "state_bytes"]

log = logging.getLogger(__name__)


def state_bytes(obj: Any) -> int:
    """This rank's tensor bytes in a state dict (DTensors: the local shard; a Stateful:
    its state_dict())."""
    if isinstance(obj, Stateful) and not isinstance(obj, torch.Tensor):
        obj = obj.state_dict()
    if isinstance(obj, Mapping):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    if isinstance(obj, torch.Tensor) and not torch.nn.parameter.is_lazy(obj):  # lazy: none yet
        return sum(t.numel() * t.element_size() for t in held_tensors(obj))
    return 0


class MemorySaves:
    """(all ranks) The memory tier of one manager: constructed, called and closed on every
    rank, in the same calls."""

    def __init__(self, url: str, memory_dir: str | None, trigger: Trigger, save: SaveConfig,
                 load: LoadConfig, *, drains: bool, replicas: int = 0) -> None:
        self.group = dist.checkpoint_group(save.collective_timeout_s, purpose="memory-control")
        self.nodes = Nodes.gather(self.group)
        if replicas >= len(self.nodes.names):  # before anything is made
            raise ArgumentError(f"memory_replicas={replicas} needs more than {replicas} nodes "
                                "(each replica lives on another node); this job runs on "
                                f"{len(self.nodes.names)}: lower memory_replicas, or run on "
                                "more nodes")
        self.tier = self._open_tier(url, memory_dir)
        self.trigger = trigger
        self.config = dataclasses.replace(save, dedup=False, compression="off",
                                          direct_io=False, staging_bytes=None, overlap=False,
                                          if_busy="wait")
        self.skippable = dataclasses.replace(self.config, if_busy=save.if_busy)
        self.load_config = load
        self.copies = 3 if drains else 2
        """Checkpoints the tier may hold at once: the newest, the one being written and,
        where storage saves copy from memory (``drains``), the one being copied."""
        self.replicas = replicas
        self.leader = self.nodes.leader(self.nodes.of[dist.rank()]) == dist.rank()
        """Lists, prunes and removes the node's folder."""
        self.saver = AsyncSaver(purpose="memory", writer=functools.partial(
            MemoryWriter, nodes=self.nodes, replicas=replicas))
        self.drain_group: Any = None  # made at the first copy to storage (collective)
        self._timeout_s = save.collective_timeout_s
        self._drainer = ThreadPoolExecutor(1, thread_name_prefix="dckpt-drain")
        self._draining: dict[int, SaveHandle] = {}  # step -> its storage copy in flight
        self._drain_plans = PlanCache()  # the drain thread's: one copy at a time
        self._latest: SaveHandle | None = None  # the newest memory save started
        self._plan: Any = None  # the local plan it staged
        self.step: int | None = None
        """The newest memory checkpoint this job committed or restored."""
        self.refused: int | None = None
        """The memory checkpoint a restore did not load into the caller's state dict, which
        did not fit it: a clean end keeps it, until a memory save commits."""
        self.held_bytes = 0
        """(the node's leader) What the tier held after the last prune."""
        self._pending: SaveHandle | None = None
        self._failed: list[tuple[int, BaseException]] = []
        self._room_checked = False

    def _open_tier(self, url: str, memory_dir: str | None) -> MemoryTier:
        """(all ranks) This node's tier; a refusal on any rank, or two nodes that share one
        folder (agents on one machine without a memory_dir each), is the same error on
        every rank."""
        made: MemoryTier | DckptError
        locked: DckptError | None = None  # another job holds the folder
        try:
            made = MemoryTier(url, memory_dir)
            st = os.stat(made.folder)
            if self.nodes.leader(self.nodes.of[dist.rank()]) == dist.rank():
                try:
                    made.lock()
                except DckptError as e:
                    locked = e
            mine: object = (self.nodes.of[dist.rank()], made.folder,
                            (socket.gethostname(), st.st_dev, st.st_ino), locked)
        except DckptError as e:  # on one node only, maybe
            made = mine = e
        everyone = dist.gather(mine, self.group)
        refused: list[DckptError] = []
        nodes: dict[object, tuple[str, set[int]]] = {}
        for entry in everyone:
            if isinstance(entry, tuple):
                nodes.setdefault(entry[2], (entry[1], set()))[1].add(entry[0])
        shared = [(folder, sorted(n)) for folder, n in nodes.values() if len(n) > 1]
        folders: dict[int, dict[object, tuple[str, list[int]]]] = {}  # node -> folder's
        for r, entry in enumerate(everyone):  # identity -> (its path, the ranks naming it)
            if isinstance(entry, tuple):
                folders.setdefault(entry[0], {}).setdefault(entry[2], (entry[1], []))[1].append(r)
        apart = [(n, f) for n, f in sorted(folders.items()) if len(f) > 1]
        if shared:
            refused.append(ArgumentError(
                f"nodes {shared[0][1]} share the memory tier's folder {shared[0][0]}; give "
                "each node a folder of its own (memory_dir=, or DCKPT_MEMORY_DIR per "
                "torchrun agent)"))
        if apart:
            node, named = apart[0]
            refused.append(ArgumentError(
                f"the ranks of node {node} name different memory tier folders ("
                + "; ".join(f"{folder} on {dist.ranks_text(ranks)}" for folder, ranks
                            in named.values()) + "): a node's ranks share one folder, which "
                "its leader commits into; pass the same memory_dir (or DCKPT_MEMORY_DIR) to "
                "every rank of a node"))
        refused += [e for e in everyone if isinstance(e, DckptError)]
        refused += [e[3] for e in everyone if isinstance(e, tuple) and e[3] is not None]  # last:
        # the second leader of two nodes that share a folder finds it locked, by the first
        if refused:
            if isinstance(made, MemoryTier):
                made.unlock(forget=True)
                with contextlib.suppress(OSError):
                    os.rmdir(made.folder)  # made here, and empty: nothing made on refusal
            raise refused[0]
        assert isinstance(made, MemoryTier)
        return made

    def check_room(self, state_dict: dict) -> None:
        """(all ranks) Refuse, the same on every rank, a tier without room for ``copies``
        checkpoints of this node's ranks (each rank's state taken as this one's)."""
        need = (self.copies * (1 + self.replicas) * state_bytes(state_dict)
                * len(self.nodes.ranks(self.nodes.of[dist.rank()])))
        problem = room_problem(self.tier.folder, self.tier.free_bytes(),
                               self.tier.held_bytes(), need)
        problems = [p for p in dist.gather(problem, self.group) if p]
        if problems:
            raise StorageError(str(problems[0]))
        self._room_checked = True

    def save(self, step: int, state_dict: dict, metrics: dict | None, *,
             may_skip: bool = True) -> None:
        """(all ranks) Stage ``state_dict`` and write it into memory in the background. A
        memory save still writing is waited for inside (the pause counts the wait) or, with
        ``SaveConfig.if_busy="skip"`` and ``may_skip``, this one is skipped (all ranks
        agreeing, logged)."""
        if not self._room_checked:
            self.check_room(state_dict)
        self._reap(wait=False)  # the one before, if it ended: pruned with nothing in flight
        if self.leader and (self.step is None or step <= self.step):  # no listing as the
            self._drop_from(step)  # steps go up: a run's first save, or one going back
        previous = self._pending
        handle = self.saver.async_save(state_dict, self.tier.url, step=step, metrics=metrics,
                                       config=self.skippable if may_skip else self.config)
        if handle.skipped:
            return
        if previous is not None:  # it ended inside async_save; this one may be writing
            self._reap(wait=True, writing=True)
        self._pending = self._latest = handle
        self._plan = self.saver.last_plan

    def poll(self, wait: bool = False) -> list[tuple[int, BaseException]]:
        """The memory saves that failed since the last call, as (step, error). After a
        commit the node's leader prunes the older checkpoint."""
        self._reap(wait)
        failed, self._failed = self._failed, []
        return failed

    def _reap(self, wait: bool, writing: bool = False) -> None:
        """Take the memory save in flight once it ended (``wait``: wait for it); after a
        commit the node's leader prunes (sparing the attempt of a save still ``writing``)."""
        h = self._pending
        if h is None or not (wait or h.done()):
            return
        h.settle()
        self._pending = None
        if h.error is not None:
            log.warning("rank %d: the memory checkpoint of step %d failed: %s", dist.rank(),
                        h.step, str(h.error))
            self._failed.append((h.step, h.error))
            return
        self.step, self.refused = h.step, None
        if self.leader:
            self.tier.prune(frozenset(self._draining), writing=writing)
            self.held_bytes = self.tier.held_bytes()

    def to_storage(self, step: int, state_dict: dict, metrics: dict | None,
                   writer: Writer) -> SaveHandle:
        """(all ranks) The storage save of ``step``: into memory first (unless this call
        already saved it there), then a copy (``drain``)."""
        if self._latest is None or self._latest.step != step:
            self.save(step, state_dict, metrics, may_skip=False)
        return self.drain(step, writer)

    def drain(self, step: int, writer: Writer) -> SaveHandle:
        """(all ranks, right after ``save(step, ...)``) Copy memory checkpoint ``step`` into
        storage with ``writer`` in the background, once it commits; the handle reports the
        storage commit. A storage copy still running is waited for first."""
        for h in list(self._draining.values()):
            h.settle()
        if self.drain_group is None:
            self.drain_group = dist.checkpoint_group(self._timeout_s, purpose="drain")
        memory_save, plan = self._latest, self._plan
        assert memory_save is not None and memory_save.step == step
        if plan is None:  # the memory save refused its state dict before any plan: the
            plan = SavePlan([])  # storage save fails with it, in _drain_one
        future = self._drainer.submit(self._drain_one, memory_save, plan, writer)
        handle = SaveHandle(step, future, pause_s=memory_save.pause_s)
        self._draining[step] = handle
        future.add_done_callback(lambda _: self._draining.pop(step, None))
        return handle

    def _drain_one(self, memory_save: SaveHandle, plan: Any, writer: Writer) -> CheckpointInfo:
        """(drain thread, all ranks) The storage save of a memory checkpoint."""
        lower_priority(writer.config.persist_nice)
        step = memory_save.step
        try:
            memory_save.wait()  # the same outcome on every rank
        except BaseException as e:
            raise CommitError(f"the storage save of step {step} copies its memory checkpoint, "
                              f"which failed: {str(e).splitlines()[0]}") from e
        problems: list[str] = []
        staged: dict[Any, object] = {}
        close: Callable[[], None] = lambda: None  # noqa: E731
        try:
            staged, close = self.tier.staged(step, plan)
        except Exception as e:  # refused in the collective: the same error on every rank
            problems = [f"rank {dist.rank()}: memory checkpoint of step {step}: {e}"]
        try:
            return run_save({}, writer, StagedPlanner(plan, staged, {}, problems),
                            self.drain_group, self._drain_plans)
        except DckptError:
            raise
        except Exception as e:
            raise CommitError(f"the storage save of step {step} failed on rank "
                              f"{dist.rank()}: {type(e).__name__}: {e}") from e
        finally:
            close()

    def _choose(self, storage_url: str, storage_options: dict | None, *,
                check_blocks: bool) -> Choice | None:
        """(all ranks) The memory checkpoint to restore, from every node's inventory and the
        newest storage step as rank 0 sees it (the same on every rank); its manifest is
        then in every node's folder. A failure to list the storage is the same StorageError
        everywhere; a node's folder that cannot be listed is emptied and holds nothing."""
        found: object = None
        if self.leader:
            node = self.nodes.of[dist.rank()]
            try:
                found = inventory(self.tier.store, node, check_blocks=check_blocks)
            except OSError as e:  # this node's memory is lost, not the storage: its peers'
                log.warning("memory tier %s cannot be read (%s: %s); what it held is not "
                            "used, and it starts afresh", self.tier.folder, type(e).__name__, str(e))
                self.tier.reset()
                found = Inventory(node, {}, {})
            except Exception as e:
                found = f"{type(e).__name__}: {e}"
        stored: object = None
        if dist.rank() == 0:
            try:
                steps = committed_steps(open_repository(storage_url, storage_options,
                                                        required=False))
                stored = steps[-1] if steps else None
            except Exception as e:
                stored = f"{type(e).__name__}: {e}"
        everyone = cast(list[tuple[object, object]], dist.gather((found, stored), self.group))
        problems = [p for pair in everyone for p in pair if isinstance(p, str)]
        if problems:
            raise StorageError(f"cannot list the checkpoints of {storage_url} and its memory "
                               f"tier {self.tier.folder}: {problems[0]}")
        inventories = [f for f, _ in everyone if isinstance(f, Inventory)]
        newest = everyone[0][1]
        choice = choose(inventories, newest if isinstance(newest, int) else None)
        if choice is not None and len(self.nodes.names) > 1:
            src = self.nodes.leader(choice.manifest_node)
            held: object = None
            if dist.rank() == src:  # read since the inventory: it may have gone meanwhile
                try:
                    held = read_manifest_raw(self.tier.store, choice.step)[1]
                except Exception as e:
                    held = f"{type(e).__name__}: {e}"
            raw = dist.broadcast_from(held, src, self.group)
            if isinstance(raw, str):  # every rank alike, none waiting on another
                raise StorageError(f"the memory tier's manifest of step {choice.step} on "
                                   f"node {choice.manifest_node} cannot be read: {raw}")
            mine = next(i for i in inventories if i.node == self.nodes.of[dist.rank()])
            if self.leader and choice.step not in mine.manifests:  # absent, or unreadable
                assert isinstance(raw, bytes)
                name = layout.manifest_name(choice.step)
                try:
                    self.tier.store.delete(name)
                    self.tier.store.create_exclusive(name, raw)
                except OSError as e:  # rank 0's node: its load then fails on every rank
                    log.warning("memory tier %s: cannot write the manifest of step %d: %s",
                                self.tier.folder, choice.step, str(e))
        return choice

    def restore(self, state_dict: dict, storage_url: str, storage_options: dict | None,
                partial: bool) -> CheckpointInfo | None:
        """(all ranks) Load the newest memory checkpoint when no storage checkpoint is newer,
        from this node's memory and what the other nodes send (``dckpt.replicas``); where a
        block fails its check, again after every node dropped its damaged segments. None
        when memory holds none, is older, or fails to load (every rank agreeing: the caller
        then restores from storage); the StateDictError of a state dict that does not fit
        the checkpoint is raised, as a load from storage raises it, and nothing is dropped."""
        failed: list[int] = []
        restored: CheckpointInfo | None = None
        for check_blocks in (False, True):
            choice = self._choose(storage_url, storage_options, check_blocks=check_blocks)
            if choice is None:
                break
            readers: list[MemoryReader] = []

            def reader(url: str, _choice: Choice = choice, **kwargs: Any) -> MemoryReader:
                readers.append(MemoryReader(url, nodes=self.nodes, choice=_choice, **kwargs))
                return readers[-1]

            try:
                info = api.load_with(reader, state_dict, self.tier.url, step=choice.step,
                                     partial=partial, config=self.load_config)
            except (StateDictError, ArgumentError):
                self.refused = choice.step
                raise  # the caller's state dict, not the checkpoint: as from storage
            except DckptError as e:
                log.warning("rank %d: memory checkpoint of step %d unusable%s: %s",
                            dist.rank(), choice.step,
                            "" if check_blocks else "; checking every block in memory",
                            headline(str(e)))
                failed.append(choice.step)
                continue
            self.step, self.refused = choice.step, None
            restored = dataclasses.replace(info, tier=readers[-1].tier)
            break
        if self.leader:  # what failed goes (pruning would keep it as the newest), and
            for step in failed:  # a crashed save's attempt
                if restored is None or restored.step != step:
                    self.tier.store.delete(layout.manifest_name(step))
            self.tier.prune()
        return restored

    def forget_after(self, step: int | None) -> None:
        """(all ranks) The job goes on from ``step`` (None: a fresh start): the memory
        checkpoints of later steps, which its restore passed over (a segment missing or
        short on every node that held it, or an explicit older step), go (``_drop_from``)."""
        self._reap(wait=True)
        if self.leader and self._drop_from(0 if step is None else step + 1):
            self.tier.prune()

    def _drop_from(self, step: int) -> list[int]:
        """(the node's leader) Delete the memory checkpoints of ``step`` and later (steps
        this run goes on to, or saves now): another run's (one this run did not restore,
        or passed over). Kept, the newest of them outlived this run's memory saves, pruned
        as older (the tier held none of its own), and refused the save of its own step as
        already committed. Their folders go at the next prune."""
        later = [s for s in committed_steps(self.tier.store) if s >= step]
        for s in later:
            self.tier.store.delete(layout.manifest_name(s))
        if later:
            log.warning("memory tier %s: dropped the checkpoints of steps %s, from another "
                        "run (this one is at step %d)", self.tier.folder, later, step)
        return later

    def close(self, remove: bool) -> None:
        """(all ranks) Wait for the memory save in flight; with ``remove`` (a clean end),
        the node's leader removes the folder once every rank is done with it."""
        self._reap(wait=True)
        for h in list(self._draining.values()):
            h.settle()
        self._drainer.shutdown(wait=True)
        self.saver.close()
        if remove and self.refused is not None:  # the same on every rank
            if self.leader:
                log.warning("keeping the memory tier's folder %s at close: its checkpoint of "
                            "step %d did not fit the state dict given to restore",
                            self.tier.folder, self.refused)
        elif remove:
            dist.gather(None, self.group)  # every rank is past its last read and write
            if self.leader:
                self.tier.remove()
        self.tier.unlock()  # kept or removed, this job is done with it
