"""Frozen, keyword-only, validated configuration of saves and loads."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Literal

from dckpt.arguments import check_bool, check_config, check_options, check_path
from dckpt.errors import ArgumentError
from dckpt.manifest import MAX_BLOCK_BYTES
from dckpt.retention import Policy
from dckpt.triggers import (
    AtEpochEnd,
    EverySeconds,
    EverySteps,
    OnImprove,
    OnPreemption,
    Trigger,
    describe,
)
from dckpt.watchdog import STALL_S

__all__ = ["SaveConfig", "LoadConfig", "ManagerConfig"]

MiB = 1 << 20
GiB = 1 << 30


MAX_THREADS = 1024
"""Reader or writer threads per rank: more than any storage gains from, and each a thread."""
MAX_WINDOW_BYTES = GiB
"""``SaveConfig.write_window_bytes``: each writer thread holds one."""


def _positive(owner: object, **fields: float) -> None:
    for name, value in fields.items():
        if type(value) not in (int, float) or not value > 0:
            raise ArgumentError(f"{type(owner).__name__}.{name} must be > 0, got {value!r}")


MAX_COLLECTIVE_TIMEOUT_S = 1e9
"""A gloo group's timeout is a timedelta: infinity (or 2**70) failed to make it, on the
first save or load of a job of more than one rank."""


def _collective_timeout(owner: object, value: float) -> None:
    _positive(owner, collective_timeout_s=value)
    if not value <= MAX_COLLECTIVE_TIMEOUT_S:
        raise ArgumentError(f"{type(owner).__name__}.collective_timeout_s must be at most "
                            f"{MAX_COLLECTIVE_TIMEOUT_S:.0e} s (31 years), got {value!r}")


def _ints(owner: object, low: int, high: int | None, **fields: object) -> None:
    """Fields that must be ints (not bools, not floats) in [low, high]."""
    for name, value in fields.items():
        if type(value) is not int or value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise ArgumentError(f"{type(owner).__name__}.{name} must be an int {bounds}, got "
                                f"{type(value).__name__} {value!r}")


def _bools(owner: object, **fields: object) -> None:
    for name, value in fields.items():
        check_bool(value, f"{type(owner).__name__}.{name}")


@dataclass(frozen=True, kw_only=True)
class SaveConfig:
    """How a save cuts, writes and commits the state."""

    block_size_bytes: int = 256 * 1024
    """Tensor bytes are cut into blocks of this size; each block is hashed on its own and
    is the unit a differential save skips. Measured (benchmarks/bench_dedup.py): 256 KiB
    finds 1/3 of a sparsely updated embedding table unchanged where 1-4 MiB find almost
    nothing, for about 0.07 s more per GiB of unchanged state than 4 MiB; 64 KiB finds 2/3
    and costs 0.18 s per GiB more (docs/design.md, Block size)."""
    writer_threads: int = 4
    """Writer threads per rank; each writes one segment object, so also segments per rank."""
    collective_timeout_s: float = 300.0
    """A peer that does not answer a collective within this time fails the save (finite,
    at most ``MAX_COLLECTIVE_TIMEOUT_S``)."""
    io_stall_timeout_s: float = STALL_S
    """Writes that make no progress for this long (a hung network or FUSE mount blocks
    them in the kernel; an object store's server stopped answering), and listings or
    manifests that get no answer, fail this rank's save with a StorageError, and so the
    save on every rank; their threads are left behind (dckpt.watchdog)."""
    staging_bytes: int | None = None
    """Async saves: cap on the host memory that holds the staged copy (None: the whole
    state). Past it, the rest is written during the pause through a window of the buffer;
    the pause grows and ``CheckpointInfo.overflow_bytes`` says by how much."""
    if_busy: Literal["wait", "skip"] = "wait"
    """Async saves: when a save is still in flight, ``"wait"`` for it, or ``"skip"`` this
    one (all ranks agree; the handle says ``skipped``). Both are logged."""
    persist_nice: int = 10
    """Async saves: the nice value (0-19) of the background write's threads, so that they
    take the CPU only when the training leaves it; 0 keeps the training's priority."""
    sparse_block_size_bytes: int | None = 32 * 1024
    """Differential saves: the block size for a tensor (of 16 blocks or more) whose last save
    wrote some of its blocks but under 90% of them: sparse updates, such as an embedding
    table's rows, where small blocks find the unchanged bytes (used only when smaller than
    ``block_size_bytes``). It returns to ``block_size_bytes`` when the tensor changes
    densely. None: one block size for all."""
    dedup: bool = True
    """Write only blocks the newest committed checkpoint does not already hold; reference
    the others (differential saves). Blocks are compared by xxh3-128 digest and length."""
    min_read_run_bytes: int | None = 256 * 1024
    """Differential saves: a tensor whose blocks, reusing the unchanged ones where earlier
    saves left them, a restore would read in runs shorter than this on average is written
    whole instead, contiguous again (``segments.too_fragmented``). A restore of any tensor
    then takes at most one read per this many bytes: at most 1.25x a contiguous one's
    time on the 2-core machine's disk (6-48 us per extra read), against bytes written
    (a sparsely updated embedding table: 0.6 of a full save on average, 0.21 without a
    bound): docs/design.md, Fragmentation. Dense and frozen tensors are one run either way.
    None: always reuse."""
    compression: Literal["auto", "on", "off"] = "auto"
    """Per-block zstd (floats split into byte planes first); a block that does not shrink
    is stored raw. ``"auto"``: on for object stores, off for local disks, where compressing
    costs more time than the bytes it saves (docs/design.md, Compression)."""
    direct_io: bool = True
    """Local storage: write segments with ``O_DIRECT`` (falls back to buffered writes where
    the filesystem refuses it). Staged memory is page-aligned and goes to the disk without a
    copy into the page cache, which keeps the background write off the training's CPU."""
    write_window_bytes: int = 16 << 20
    """Sync saves to local disks with ``direct_io``: each writer thread copies the bytes
    into a window of this size on huge pages (one per writer thread: 64 MiB by default),
    made once per process and reused, and writes from it, where the kernel gives such
    windows, the tensors do not lie on huge pages already, and the disk takes scattered
    pages slowly (a virtio disk without indirect descriptors; dckpt.direct.Windows); 0, or
    elsewhere: every whole page goes straight from the tensors' own memory. A state's
    memory is often scattered over single pages (a process's first allocations), which
    such disks take in small requests; on the 2-core machine's disk the windows made sync
    saves 1.04-1.20x faster (docs/benchmarks.md, Writes through reused windows). Async
    saves write from their staging memory."""
    overlap: bool = False
    """Async saves: return before the copy is done; it runs while the next forward and
    backward run, and ``SaveHandle.wait_staged()`` (or the optimizer hook of
    ``AsyncSaver.install_hook``) must come before the state changes. On CUDA the wait is
    on the device: the host does not stop."""

    def __post_init__(self) -> None:
        _ints(self, 1, None, block_size_bytes=self.block_size_bytes)
        _ints(self, 1, MAX_THREADS, writer_threads=self.writer_threads)
        _ints(self, 0, 19, persist_nice=self.persist_nice)
        _bools(self, dedup=self.dedup, direct_io=self.direct_io, overlap=self.overlap)
        _positive(self, io_stall_timeout_s=self.io_stall_timeout_s)  # inf: no bound
        _collective_timeout(self, self.collective_timeout_s)
        if self.staging_bytes is not None:
            _ints(self, 1, None, staging_bytes=self.staging_bytes)
        if (type(self.write_window_bytes) is not int or self.write_window_bytes % 4096
                or not 0 <= self.write_window_bytes <= MAX_WINDOW_BYTES):
            raise ArgumentError(
                "SaveConfig.write_window_bytes must be 0 or a multiple of 4096 up to "
                f"{MAX_WINDOW_BYTES}, got {self.write_window_bytes!r}")
        if self.compression not in ("auto", "on", "off"):
            raise ArgumentError("SaveConfig.compression must be 'auto', 'on' or 'off', got "
                             f"{self.compression!r}")
        if self.if_busy not in ("wait", "skip"):
            raise ArgumentError(f"SaveConfig.if_busy must be 'wait' or 'skip', got {self.if_busy!r}")
        if self.staging_bytes is not None and self.staging_bytes < 2 * self.block_size_bytes:
            raise ArgumentError(
                f"SaveConfig.staging_bytes must be None or at least two blocks "
                f"({2 * self.block_size_bytes} bytes), got {self.staging_bytes!r}")
        if self.sparse_block_size_bytes is not None and (
                type(self.sparse_block_size_bytes) is not int
                or self.sparse_block_size_bytes % 4096 or self.sparse_block_size_bytes <= 0):
            raise ArgumentError(
                "SaveConfig.sparse_block_size_bytes must be None or a positive multiple of "
                f"4096, got {self.sparse_block_size_bytes!r}")
        if self.min_read_run_bytes is not None and (
                type(self.min_read_run_bytes) is not int or self.min_read_run_bytes <= 0):
            raise ArgumentError("SaveConfig.min_read_run_bytes must be None or a positive int, "
                                f"got {self.min_read_run_bytes!r}")
        if self.block_size_bytes > MAX_BLOCK_BYTES:
            raise ArgumentError(f"SaveConfig.block_size_bytes must be at most {MAX_BLOCK_BYTES}, "
                                f"got {self.block_size_bytes}")
        if self.block_size_bytes % 4096:
            raise ArgumentError(
                f"SaveConfig.block_size_bytes must be a multiple of 4096, got {self.block_size_bytes}")


@dataclass(frozen=True, kw_only=True)
class LoadConfig:
    """How a load reads, verifies and copies the state."""

    reader_threads: int = 8
    """Reader threads per rank, each running one ranged read at a time."""
    read_request_bytes: int | None = None
    """Adjacent blocks are coalesced into ranged reads of up to this size. None: 16 MiB,
    from a local disk and an object store alike (cold restores of 1-2 GiB per process from
    the local disk 1.2-1.7x faster than with 64 MiB; docs/benchmarks.md, Read settings)."""
    read_buffer_bytes: int = 1 * GiB
    """Bound on the host memory a rank holds for bytes that cannot be read in place."""
    collective_timeout_s: float = 300.0
    """A peer that does not answer a collective within this time fails the load (finite,
    at most ``MAX_COLLECTIVE_TIMEOUT_S``)."""
    io_stall_timeout_s: float = STALL_S
    """Reads that make no progress for this long (a hung network or FUSE mount, an object
    store's server that stopped answering), and listings or manifests that get no answer,
    fail the load with a StorageError; their threads are left behind (dckpt.watchdog)."""
    replicated: Literal["read", "broadcast", "auto"] = "auto"
    """Tensors every rank loads whole (DDP parameters, a replicated optimizer): ``"read"``,
    every rank reads them; ``"broadcast"``, one rank reads each (spread over the ranks) and
    broadcasts it over the checkpoint group; ``"auto"``: broadcast from object stores, read
    from local disks (docs/design.md, Replicated state)."""

    def __post_init__(self) -> None:
        if self.replicated not in ("read", "broadcast", "auto"):
            raise ArgumentError("LoadConfig.replicated must be 'read', 'broadcast' or 'auto', got "
                             f"{self.replicated!r}")
        _ints(self, 1, MAX_THREADS, reader_threads=self.reader_threads)
        _ints(self, 1, None, read_buffer_bytes=self.read_buffer_bytes)
        if self.read_request_bytes is not None:
            _ints(self, 1, None, read_request_bytes=self.read_request_bytes)
        _positive(self, io_stall_timeout_s=self.io_stall_timeout_s)  # inf: no bound
        _collective_timeout(self, self.collective_timeout_s)


@dataclass(frozen=True, kw_only=True)
class ManagerConfig:
    """What a CheckpointManager does: when to save, what to keep, how to save and load.
    ``ManagerConfig.of(...)`` builds one from the manager's keyword arguments."""

    trigger: Trigger | None = None
    """When to save (dckpt.triggers; compose with ``|``); None: only on ``save()`` and
    preemption."""
    retention: Policy | None = None
    """Which checkpoints to keep (dckpt.retention); None keeps everything."""
    gc: bool = True
    """After each commit, sweep what no checkpoint references (after retention)."""
    async_save: bool = True
    """Saves return once staged; write and commit run in the background."""
    handle_signals: bool = True
    """SIGTERM and SIGUSR1 trigger an emergency checkpoint (main thread only)."""
    exit_on_preemption: bool = True
    """After the emergency checkpoint, end the job (False: return, ``preempted`` set)."""
    storage_options: dict | None = None
    """fsspec options of the repository (credentials, endpoint)."""
    save: SaveConfig = field(default_factory=SaveConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    memory_trigger: Trigger | None = None
    """When to checkpoint into node memory (the memory tier: dckpt.tiers); None: no memory
    tier. Its saves are independent of the storage tier's."""
    memory_dir: str | os.PathLike | None = None
    """The memory tier's parent folder (a str once made); None: ``DCKPT_MEMORY_DIR``, else
    ``/dev/shm``."""
    memory_replicas: int = 0
    """Copies of each rank's memory checkpoint in the memory of other nodes (the next ones
    on a ring over torchrun's nodes), so that the loss of a node still restores from
    memory; fewer than the job's nodes. 0: a node's loss restores from storage."""

    def __post_init__(self) -> None:
        if self.trigger is not None and not isinstance(self.trigger, Trigger):
            raise ArgumentError(f"ManagerConfig.trigger must be a dckpt trigger (EverySteps, "
                                f"..., composed with |) or None, got {self.trigger!r}")
        if self.retention is not None and not callable(self.retention):
            raise ArgumentError(f"retention must be a policy (callable), got "
                                f"{type(self.retention).__name__}")
        for name in ("gc", "async_save", "handle_signals", "exit_on_preemption"):
            check_bool(getattr(self, name), f"ManagerConfig.{name}")
        check_options(self.storage_options)
        if self.memory_trigger is not None and not isinstance(self.memory_trigger, Trigger):
            raise ArgumentError(f"ManagerConfig.memory_trigger must be a dckpt trigger or "
                                f"None, got {self.memory_trigger!r}")
        if self.memory_trigger is not None and (self.memory_trigger.watches
                                                or self.memory_trigger.agreed):
            raise ArgumentError("ManagerConfig.memory_trigger must decide from steps and "
                                "epoch ends alone (EverySteps, AtEpochEnd)")
        if self.memory_dir is not None:  # a str where a path object was given
            object.__setattr__(self, "memory_dir", check_path(
                self.memory_dir, "memory_dir", "a folder path or None"))
        if type(self.memory_replicas) is not int or self.memory_replicas < 0:
            raise ArgumentError(f"memory_replicas must be an int >= 0, got "
                                f"{self.memory_replicas!r}")
        if self.memory_replicas and self.memory_trigger is None:
            raise ArgumentError(f"memory_replicas={self.memory_replicas} replicates the memory "
                                "tier, which is off: set memory_every_steps (or "
                                "ManagerConfig.memory_trigger) too")
        if not isinstance(self.save, SaveConfig) or not isinstance(self.load, LoadConfig):
            raise ArgumentError("ManagerConfig.save and .load must be a SaveConfig and a "
                                f"LoadConfig, got {self.save!r}, {self.load!r}")

    @property
    def saves_on(self) -> Trigger | None:
        """What decides at each ``maybe_save``: the trigger, preemption first where the
        signals are handled (an emergency save wins over any reason)."""
        if not self.handle_signals:
            return self.trigger
        return OnPreemption() if self.trigger is None else OnPreemption() | self.trigger

    def alike(self) -> dict[str, str]:
        """What every rank's manager must be given alike, as text to compare across the
        ranks: what decides when the ranks save and how (a save's collectives pair up only
        where every rank makes the same calls)."""
        return {"triggers": describe(self.saves_on), "async_save": repr(self.async_save),
                "exit_on_preemption": repr(self.exit_on_preemption),
                "save_config.if_busy": repr(self.save.if_busy),
                "memory_every_steps": describe(self.memory_trigger),
                "memory_replicas": repr(self.memory_replicas)}

    @classmethod
    def of(cls, *, save_every_steps: int | None = None, save_every_seconds: float | None = None,
           save_at_epoch_end: bool = False,
           save_on_improve: tuple[str, Literal["min", "max"]] | None = None,
           save_config: SaveConfig | None = None, load_config: LoadConfig | None = None,
           memory_every_steps: int | None = None, **fields: object) -> ManagerConfig:
        """The config the manager's keyword arguments spell: each trigger argument becomes
        its policy, in this order (the first reason wins)."""
        triggers: list[Trigger] = []
        if save_every_steps is not None:
            triggers.append(EverySteps(save_every_steps))
        if check_bool(save_at_epoch_end, "save_at_epoch_end"):  # "no" turned it on
            triggers.append(AtEpochEnd())
        if save_every_seconds is not None:
            triggers.append(EverySeconds(save_every_seconds))
        if save_on_improve is not None:
            if not isinstance(save_on_improve, tuple) or len(save_on_improve) != 2:
                raise ArgumentError("save_on_improve must be (metric, 'min' | 'max'), got "
                                    f"{save_on_improve!r}")
            triggers.append(OnImprove(*save_on_improve))
        trigger = None
        for t in triggers:
            trigger = t if trigger is None else trigger | t
        memory = None
        if memory_every_steps is not None:
            if (type(memory_every_steps) is not int or memory_every_steps < 1):
                raise ArgumentError(f"memory_every_steps must be an int >= 1 or None, got "
                                    f"{memory_every_steps!r}")
            memory = EverySteps(memory_every_steps)
        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ArgumentError(f"unknown manager options {sorted(unknown)}; see "
                                "dckpt.ManagerConfig for the fields")
        # a falsy wrong type (0, {}) was taken as None
        return cls(trigger=trigger, memory_trigger=memory,
                   save=check_config(save_config, SaveConfig, "save_config") or SaveConfig(),
                   load=check_config(load_config, LoadConfig, "load_config") or LoadConfig(),
                   **fields)  # type: ignore[arg-type]
