"""The save pipeline, synchronous and asynchronous.

Synchronous: DCP plans and the Writer writes and commits, while the caller waits.

Asynchronous (``async_save``), per rank::

    caller's thread   wait for the save in flight (or skip, by policy)
                      plan locally (DCP's planner; no collective)
                      stage every tensor into reused host memory      <- training pauses here
                      write what does not fit the staging budget      <- only past the budget
                      return a SaveHandle
    persist thread    wait for the copies, then DCP's collectives on the checkpoint group:
                      global plan, write the staged bytes, commit (the Writer)

The persist thread never touches the live state: its planner answers from the staged copy.
Its collectives run on dckpt's own gloo group with a timeout, so they never interleave with
the training's collectives and a dead peer becomes an error, not a hang.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from dckpt import dist, layout
from dckpt.arguments import check_config, check_state_dict, public
from dckpt.config import SaveConfig
from dckpt.direct import DIRECT_ALIGN
from dckpt.errors import ArgumentError, CommitError, DckptError, StateDictError
from dckpt.gcpause import paused_gc
from dckpt.global_plan import PlanCache, run_save, stateful_to_state_dict
from dckpt.handle import SaveHandle
from dckpt.info import CheckpointInfo
from dckpt.manifest import StoredData
from dckpt.planner import SafeSavePlanner, StagedPlanner
from dckpt.segments import SegmentOut, item_nbytes
from dckpt.staging import CopyEngine, HostArea, fit, wait_device, wait_host
from dckpt.step_metrics import Metrics
from dckpt.storage import Store
from dckpt.watchdog import Heartbeat, call_bounded
from dckpt.writer import Writer

__all__ = ["SaveHandle", "AsyncSaver", "default_saver", "lower_priority", "wait_idle"]

log = logging.getLogger(__name__)

StateDict = dict[str, Any]


class _Staging:
    """What the caller's thread hands the persist thread."""

    def __init__(self) -> None:
        self.staged: dict[MetadataIndex, object] = {}
        self.prewritten: dict[MetadataIndex, StoredData] = {}
        self.events: list[torch.cuda.Event] = []
        self.copies: Future[None] | None = None
        self.plan = SavePlan([])
        self.overflow_bytes = 0
        self.staged_bytes = 0
        self.problems: list[str] = []  # the state dict cannot be saved: nothing staged
        self.failure: Exception | None = None  # the pause's write of the overflow failed
        self._lock = threading.Lock()
        self._waited_on_device = False

    def wait_caller(self) -> None:
        """(caller's thread) The state may change after this: CPU copies are done, and the
        training's CUDA stream waits for the device copies."""
        if self.copies is not None:
            self.copies.result()
        with self._lock:
            if self.events and not self._waited_on_device:
                wait_device(self.events)
                self._waited_on_device = True

    def wait_persist(self) -> None:
        """(persist thread) The staged bytes are all there."""
        if self.copies is not None:
            self.copies.result()
        wait_host(self.events)


class _Planned:
    """A local plan, split into values (already serialized) and tensors that fit the
    staging budget or overflow it, with the staging layout's key and slot sizes."""

    def __init__(self, plan: SavePlan) -> None:
        self.plan = plan
        self.values: dict[MetadataIndex, object] = {}
        self.fit: list[tuple[WriteItem, torch.Tensor]] = []
        self.overflow: list[tuple[WriteItem, torch.Tensor]] = []
        self.window = 0
        self.key: object = None
        self.sizes: list[int] = []
        self.pinned = False
        self.problems: list[str] = []


class AsyncSaver:
    """Saves with reused staging memory and at most one save in flight per process (threads
    that save at once take turns).

    ``dckpt.save`` and ``dckpt.async_save`` use one AsyncSaver per process; make your own
    only to keep several independent staging areas.
    """

    @public
    def __init__(self, purpose: str = "commit", writer: Callable[..., Writer] = Writer) -> None:
        if not isinstance(purpose, str) or not purpose or not callable(writer):
            raise ArgumentError("AsyncSaver(purpose, writer): a name for its gloo group and a "
                                f"Writer class, got {purpose!r}, {writer!r}")
        self.purpose = purpose
        self.writer = writer
        """Makes its saves' Writers (the memory tier's replicates)."""
        """The gloo group its saves run on (``dist.checkpoint_group``): savers that may have
        saves in flight at once (the memory tier's and the storage tier's) need their own."""
        self._area = HostArea()
        self._engine = CopyEngine()
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="dckpt-persist")
        self._copier = ThreadPoolExecutor(1, thread_name_prefix="dckpt-stage")
        self._in_flight: SaveHandle | None = None
        self._last_plan: SavePlan | None = None
        self._last_plan_key: object = None
        self._failures: list[tuple[int, BaseException]] = []
        self._plans = PlanCache()
        """Its saves' last global plan (sync and async saves take turns)."""
        self._lock = threading.Lock()
        self._calls = threading.RLock()
        """One call at a time (threads of one process saving at once): a second async_save
        staged into the memory the first one's write was still reading."""

    # ------------------------------------------------------------------ public

    @public
    def save(self, state_dict: StateDict, url: str, *, step: int, metrics: Metrics | None = None,
             storage_options: dict | None = None, config: SaveConfig | None = None
             ) -> CheckpointInfo:
        """(collective) Synchronous save; first waits for a save in flight."""
        writer = self._checked(state_dict, url, step, metrics, storage_options, config,
                               "save")
        config = writer.config
        with self._calls:
            self.wait_idle()
            group = dist.checkpoint_group(config.collective_timeout_s, purpose=self.purpose)
            with paused_gc():  # the caller waits anyway; a block reference is a few objects
                return run_save(state_dict, writer, None, group, self._plans)

    @public
    def async_save(self, state_dict: StateDict, url: str, *, step: int,
                   metrics: Metrics | None = None, storage_options: dict | None = None,
                   config: SaveConfig | None = None) -> SaveHandle:
        """(collective) Stage ``state_dict`` and return; write and commit in the background."""
        t0 = time.perf_counter()
        writer = self._checked(state_dict, url, step, metrics, storage_options, config,
                               "async_save")
        with self._calls:
            return self._async_save(state_dict, writer, writer.config, t0)

    def _checked(self, state_dict: StateDict, url: str, step: int, metrics: Metrics | None,
                 storage_options: dict | None, config: SaveConfig | None, call: str) -> Writer:
        """(all ranks) The save's Writer, its arguments checked on every rank: one rank's
        refusal is every rank's (``dist.agreed``)."""
        def check() -> Writer:
            check_state_dict(state_dict)
            return self.writer(url, step=step, metrics=metrics, storage_options=storage_options,
                               config=check_config(config, SaveConfig) or SaveConfig())
        given = config if isinstance(config, SaveConfig) else SaveConfig()
        # if_busy alike: ranks apart (one skips, another waits) met the wrong collectives
        alike = f"if_busy={given.if_busy!r}" if call == "async_save" else ""
        return dist.agreed(check, f"dckpt.{call}", timeout_s=given.collective_timeout_s,
                           saving=True, alike=alike)

    def _async_save(self, state_dict: StateDict, writer: Writer, config: SaveConfig,
                    t0: float) -> SaveHandle:
        step = writer.step
        group = dist.checkpoint_group(config.collective_timeout_s, purpose=self.purpose)
        control = dist.checkpoint_group(config.collective_timeout_s,
                                        purpose=f"{self.purpose}-control")
        previous = self._in_flight
        if (previous is not None and config.if_busy == "skip"
                and dist.any_true(not previous.done(), control)):
            log.warning("rank %d: skipping the save of step %d: the save of step %d is "
                        "still in flight (if_busy='skip')", dist.rank(), step, previous.step)
            return SaveHandle(step, None, skipped_for=previous.step)
        if previous is not None and not previous.done():
            log.info("rank %d: the save of step %d waits for the save of step %d still in "
                     "flight (if_busy='wait')", dist.rank(), step, previous.step)
        t_wait = time.perf_counter()
        self.wait_idle()
        failures = self._take_failures()
        t_stage = time.perf_counter()
        with paused_gc():  # the pause makes a few objects per tensor, no cycles
            staging = self._stage(state_dict, writer, config)
        if not config.overlap:  # staged means staged: the host waits for the device copies
            wait_host(staging.events)
            staging.wait_caller()
        t_end = time.perf_counter()
        local = {"wait_previous": t_stage - t_wait, "stage": t_end - t_stage,
                 "pause": t_end - t0}
        planner = StagedPlanner(staging.plan, staging.staged, staging.prewritten, staging.problems,
                                staging.failure)
        writer.from_staging = True  # memory that lies well: written from where it is
        future = self._persist.submit(self._persist_one, writer, planner, group, staging, local,
                                      failures)
        handle = SaveHandle(step, future, staged=staging.wait_caller, pause_s=local["pause"])
        self._in_flight = handle
        log.info("rank %d: step %d staged in %.3f s (%d bytes staged, %d written in the pause)",
                 dist.rank(), step, local["stage"], staging.staged_bytes, staging.overflow_bytes)
        return handle

    @property
    def last_plan(self) -> SavePlan | None:
        """The local plan of the latest staged save (the memory tier copies by it)."""
        return self._last_plan

    def wait_idle(self) -> None:
        """Wait for the save in flight, if any; its failure stays on its handle."""
        if self._in_flight is not None:
            self._in_flight.settle()

    @public
    def install_hook(self, optimizer: torch.optim.Optimizer) -> Any:
        """Overlap mode: the optimizer waits for the staged copy before it changes anything.

        Returns the hook's handle (``.remove()`` uninstalls it).
        """
        if not callable(getattr(optimizer, "register_step_pre_hook", None)):
            raise ArgumentError(f"install_hook(optimizer) takes a torch.optim.Optimizer, got "
                                f"{type(optimizer).__name__}")
        def before_step(*_: object) -> None:
            handle = self._in_flight
            if handle is not None:
                handle.wait_staged()
        return optimizer.register_step_pre_hook(before_step)

    def close(self) -> None:
        """Wait for the save in flight and free the staging memory."""
        with self._calls:
            self.wait_idle()
            self._area.release()

    # ------------------------------------------------------------------ internals

    def _take_failures(self) -> list[tuple[int, BaseException]]:
        with self._lock:
            failures, self._failures = self._failures, []
        for step, error in failures:
            log.error("rank %d: the background save of step %d failed: %s; nothing was "
                      "committed for it", dist.rank(), step, str(error))
        return failures

    def _record_failure(self, step: int, error: BaseException) -> None:
        # IMPORTANT: recorded before the future completes, so that the save after a wait()
        # that raised always reports it (done-callbacks run after waiters wake up)
        with self._lock:
            self._failures.append((step, error))

    @public
    def reserve(self, state_dict: StateDict, config: SaveConfig | None = None) -> float:
        """Allocate the staging memory for ``state_dict``'s layout now, so that the first
        save's pause is as short as the next ones (a manager calls this after restoring).
        Returns the seconds it took; nothing is copied or written."""
        t0 = time.perf_counter()
        check_state_dict(state_dict)
        with self._calls:
            self.wait_idle()  # the slots may move: not under a write in flight
            planned = self._plan(state_dict, check_config(config, SaveConfig) or SaveConfig())
            if not planned.problems:
                self._area.slots(planned.key, planned.sizes, pinned=planned.pinned)
        return time.perf_counter() - t0

    def _plan(self, state_dict: StateDict, config: SaveConfig) -> _Planned:
        """(caller's thread) DCP's local plan, its data, and where each tensor is staged."""
        planner = SafeSavePlanner()
        shape = None
        try:
            planner.set_up_planner(stateful_to_state_dict(state_dict), None, dist.rank() == 0)
            shape = planner.shape()
            problems = planner.check(tensors=shape is None or shape != self._last_plan_key)
        except StateDictError as e:  # keys that collide once flattened
            problems = [e.message]
        if problems:  # refused in the persist thread's collective: the same on every rank
            planned = _Planned(SavePlan([]))
            planned.problems = problems
            planned.key, planned.sizes = ((), 0), [0]
            return planned
        if shape is None or shape != self._last_plan_key:
            self._last_plan, self._last_plan_key = planner.create_local_plan(), shape
        assert self._last_plan is not None
        planned = _Planned(self._last_plan)
        tensors: list[tuple[WriteItem, torch.Tensor]] = []
        with torch.no_grad():
            for item in planned.plan.items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    assert isinstance(data, io.BytesIO)
                    planned.values[item.index] = data  # serialized just now: already a copy
                else:
                    assert isinstance(data, torch.Tensor)
                    tensors.append((item, data))
        nbytes = [item_nbytes(i) for i, _ in tensors]
        fits, window = fit(nbytes, config.staging_bytes, config.block_size_bytes)
        chosen = set(fits)
        planned.fit = [tensors[k] for k in fits]
        planned.overflow = [t for k, t in enumerate(tensors) if k not in chosen]
        planned.window = window
        # the staging layout's key: the plan's own key (every tensor's shape, dtype and
        # device) says the same as a key built item by item (12 us each)
        planned.key = ((shape, tuple(fits)) if shape is not None else
                       tuple((i.index, t.dtype, tuple(t.shape), t.device)
                             for i, t in planned.fit), planned.window)
        planned.sizes = [nbytes[k] for k in fits] + [planned.window]
        planned.pinned = any(t.device.type == "cuda" for _, t in tensors)
        return planned

    def _stage(self, state_dict: StateDict, writer: Writer, config: SaveConfig) -> _Staging:
        """(caller's thread) Plan locally and copy the state aside; see the module docstring."""
        planned = self._plan(state_dict, config)
        staging = _Staging()
        staging.plan = planned.plan
        staging.problems = planned.problems
        if planned.problems:
            return staging
        slots = self._area.slots(planned.key, planned.sizes, pinned=planned.pinned)
        staging.staged.update(planned.values)
        staging.staged_bytes = sum(planned.sizes[:-1])  # the window aside

        typed = self._area.typed  # the slots as these tensors, from the last save
        if typed is not None and len(typed) != len(planned.fit):
            typed = None

        def copy_all() -> None:
            sources = [t for _, t in planned.fit]
            if typed is not None:  # the same layout: the same shapes, checked all the same
                targets = [typed[k] if typed[k].shape == t.shape and typed[k].dtype == t.dtype
                           else slots[k] for k, t in enumerate(sources)]
            else:
                targets = slots[:len(sources)]
            done = self._engine.copy_all(targets, sources)
            staging.staged.update(zip((item.index for item, _ in planned.fit), done))
            self._area.typed = done
            staging.events = self._engine.record()

        if config.overlap and not planned.overflow and not planned.pinned:
            staging.copies = self._copier.submit(copy_all)
        else:
            copy_all()
        if planned.overflow:
            beat = Heartbeat()
            # device tensors are copied out on the caller's stream, as they would be here
            stream = torch.cuda.current_stream() if planned.pinned else None

            def write() -> None:
                with torch.cuda.stream(stream) if stream is not None else nullcontext():
                    self._write_overflow(planned.overflow, slots[-1], writer, staging, beat)

            try:
                call_bounded(write, config.io_stall_timeout_s, f"the pause's write of step "
                             f"{writer.step} to {writer.store.url}", beat)
            except Exception as e:  # refused in the persist thread's collective, so that
                staging.failure = e  # every rank fails the save the same way, and in step
        return staging

    def _write_overflow(self, overflow: list[tuple[WriteItem, torch.Tensor]],
                        window: torch.Tensor, writer: Writer, staging: _Staging,
                        beat: Heartbeat) -> None:
        """(a worker for the caller's thread) Write what the budget does not hold, now, in a
        segment of its own."""
        store: Store = writer.store
        name = layout.segment_name(layout.new_attempt(writer.step), dist.rank(), 0)
        direct = writer.config.direct_io and store.direct_capable
        writer.created.append(name)
        with store.open_write(name, direct=direct) as f:
            # no dedup: which checkpoint to dedup against is decided later, at the plan
            out = SegmentOut(f, name, writer.config.block_size_bytes,
                             align=DIRECT_ALIGN if direct else 0, compress=writer.compresses)
            out.beat = beat.beat
            for item, t in overflow:
                n = item_nbytes(item)
                blocks = out.append_tensor(t, window)
                staging.prewritten[item.index] = StoredData(n, tuple(blocks))
                staging.staged[item.index] = None
                staging.overflow_bytes += n

    def _persist_one(self, writer: Writer, planner: StagedPlanner, group: object,
                     staging: _Staging, local: dict[str, float],
                     failures: list[tuple[int, BaseException]]) -> CheckpointInfo:
        """(persist thread) Write the staged bytes and commit."""
        lower_priority(writer.config.persist_nice)
        try:
            staging.wait_persist()
            info = run_save({}, writer, planner, group, self._plans)
        except DckptError as e:
            self._record_failure(writer.step, e)
            raise
        except Exception as e:
            error = CommitError(f"save of step {writer.step} failed on rank {dist.rank()}: "
                                f"{type(e).__name__}: {e}")
            self._record_failure(writer.step, error)
            raise error from e
        return dataclasses.replace(
            info, phase_s={**info.phase_s, **local}, pause_s=local["pause"],
            overflow_bytes=staging.overflow_bytes,
            previous_failures=tuple((s, str(e)) for s, e in failures))


def lower_priority(nice: int) -> None:
    """Give this thread (and the writer threads it starts, which inherit it) a lower CPU
    priority than the training's threads: Linux schedules threads as tasks of their own."""
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, min(19, max(current, nice)))
    except OSError as e:  # not permitted on some systems: run at the training's priority
        log.debug("could not lower the persist thread's priority: %s", str(e))


_default: AsyncSaver | None = None
_default_lock = threading.Lock()


def default_saver() -> AsyncSaver:
    """The process's saver, made on first use (once, whichever thread comes first)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = AsyncSaver()
        return _default


def wait_idle() -> None:
    """Wait for the process's save in flight, if there is one (loads call this first)."""
    if _default is not None:
        _default.wait_idle()
