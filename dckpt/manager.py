"""CheckpointManager: when to save, what to keep, preemption saves and automatic resume.

The manager orchestrates (docs/manager.md): triggers decide (dckpt.triggers, pure), the
ranks agree on rank-local facts through ``dist.Agreement``, the signal handlers only note a
signal (dckpt.preemption), and rank 0 applies retention and gc after each commit in the
background (dckpt.upkeep). Saves are asynchronous by default: training pauses only for the
staging copy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from typing import Literal, cast

from dckpt import api, dist
from dckpt.arguments import check_bool, check_state_dict, check_step, check_url, public
from dckpt.config import LoadConfig, ManagerConfig, SaveConfig
from dckpt.errors import (
    ArgumentError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    DckptError,
    headline,
)
from dckpt.info import CheckpointInfo
from dckpt.logs import event
from dckpt.metrics import Metrics
from dckpt.preemption import SignalWatch
from dckpt.retention import Policy, best
from dckpt.saver import SaveHandle
from dckpt.step_metrics import check_metrics, plain_metric
from dckpt.tiers import MemorySaves
from dckpt.triggers import Moment, Trigger
from dckpt.upkeep import RetentionReport, Upkeep
from dckpt.writer import Writer

__all__ = ["CheckpointManager", "RetentionReport"]

log = logging.getLogger(__name__)

AGREE_INTERVAL_S = 0.5
"""Seconds of training between two exchanges of the trigger agreement: how late a time
trigger or a preemption signal is acted on, at most about twice this (plus one step)."""

Result = SaveHandle | CheckpointInfo | None


class CheckpointManager:
    """Decides when to save, keeps what the retention policy says, saves on preemption and
    resumes. Constructed, called and closed on every rank (collective).

    ``config`` (a ManagerConfig), or its keyword spelling: ``save_every_steps``,
    ``save_every_seconds``, ``save_at_epoch_end``, ``save_on_improve=(metric, mode)`` (the
    triggers), ``retention``, ``gc``, ``async_save``, ``handle_signals``,
    ``exit_on_preemption``, ``storage_options``, ``save_config``, ``load_config``.
    Callbacks ``on_save(info)``, ``on_restore(info)`` and ``on_failure(step, error)`` run on
    the training thread (an async save's at the next call after it ended); ``metrics``, a
    dckpt.Metrics, records every save, failure, restore and retention run.
    """

    @public
    def __init__(self, url: str, config: ManagerConfig | None = None, *,
                 save_every_steps: int | None = None, save_every_seconds: float | None = None,
                 save_at_epoch_end: bool = False,
                 save_on_improve: tuple[str, Literal["min", "max"]] | None = None,
                 retention: Policy | None = None, gc: bool = True,
                 async_save: bool = True, handle_signals: bool = True,
                 exit_on_preemption: bool = True, storage_options: dict | None = None,
                 save_config: SaveConfig | None = None, load_config: LoadConfig | None = None,
                 memory_every_steps: int | None = None, memory_dir: str | os.PathLike | None = None,
                 memory_replicas: int = 0, on_save: Callable[[CheckpointInfo], None] | None = None,
                 on_restore: Callable[[CheckpointInfo], None] | None = None,
                 on_failure: Callable[[int, BaseException], None] | None = None,
                 metrics: Metrics | None = None) -> None:
        def checked() -> tuple[str, ManagerConfig]:
            spelled = ManagerConfig.of(
                save_every_steps=save_every_steps, save_every_seconds=save_every_seconds,
                save_at_epoch_end=save_at_epoch_end, save_on_improve=save_on_improve,
                retention=retention, gc=gc, async_save=async_save,
                handle_signals=handle_signals, exit_on_preemption=exit_on_preemption,
                storage_options=storage_options, save_config=save_config,
                load_config=load_config, memory_every_steps=memory_every_steps,
                memory_dir=memory_dir, memory_replicas=memory_replicas)
            if config is not None and (spelled != ManagerConfig()
                                       or not isinstance(config, ManagerConfig)):
                raise ArgumentError("CheckpointManager: pass a ManagerConfig or its keyword "
                                    f"arguments, not both; got config={config!r}")
            for name, fn in (("on_save", on_save), ("on_restore", on_restore),
                             ("on_failure", on_failure)):
                if fn is not None and not callable(fn):
                    raise ArgumentError(f"{name} must be a callable or None, got {fn!r}")
            if metrics is not None and not isinstance(metrics, Metrics):
                raise ArgumentError(f"metrics must be a dckpt.Metrics or None, got {metrics!r}")
            return check_url(url), config or spelled

        # one rank's refusal is every rank's, at once
        timeout_s = (save_config if isinstance(save_config, SaveConfig) else
                     config.save if isinstance(config, ManagerConfig) else
                     SaveConfig()).collective_timeout_s
        self.url, self.config = dist.agreed(checked, "CheckpointManager", timeout_s=timeout_s,
                                            saving=False)
        self.storage_options = self.config.storage_options
        self.on_save, self.on_restore, self.on_failure = on_save, on_restore, on_failure
        self.metrics = metrics
        trigger = self.config.saves_on
        self.trigger: Trigger | None = trigger
        """What decides at each ``maybe_save``: the config's trigger, preemption first."""
        self.preempted = False
        """True once the emergency checkpoint of a preemption signal committed."""
        self.restored: CheckpointInfo | None = None
        """What ``restore`` loaded, with its recovery report."""
        self._restore_called = False
        self.saves = 0
        self.failures: list[tuple[int, str]] = []
        """Saves that failed, as (step, reason); training went on."""
        self.recoveries = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        """Restarts of this job's workers so far (torchrun's count; +1 per restore that
        found a checkpoint after a start that was not a restart)."""
        self._closed = False
        self._last_save_t = time.monotonic()
        self._committed: set[int] = set()
        self._passed_over: dict[int, str] = {}  # step -> why the restore passed it over
        self._saved_metrics: list[Mapping[str, object]] = []  # the triggers' ``previous``
        self._pending: list[SaveHandle] = []
        # step -> wall time its save began, while it may still be writing (gc after
        # retention spares what started since the oldest: docs/manager.md)
        self._started: dict[int, float] = {}
        timeout_s = self.config.save.collective_timeout_s
        if dist.active():  # at once, the same on every rank: ranks apart would fail
            # every save, some after the collective timeout
            with dist.collectives("CheckpointManager", saving=False):
                dist.refuse_differences(
                    self.config.alike(), dist.checkpoint_group(timeout_s, purpose="arguments"),
                    "CheckpointManager: the ranks made their managers with different "
                    "arguments", "Every rank must pass the same triggers (and handle_signals, "
                    "which adds OnPreemption), async_save, exit_on_preemption, if_busy, "
                    "and memory tier arguments; memory_dir (between nodes), storage_options, "
                    "retention, gc and timeouts may differ")
        self._upkeep = Upkeep(self.url, self.storage_options, self.config.retention,
                              self.config.gc, self._in_flight, metrics)
        self._agreement = (dist.Agreement(timeout_s, AGREE_INTERVAL_S)
                           if trigger is not None and trigger.agreed else None)
        self._broadcasts = (dist.checkpoint_group(timeout_s, purpose="trigger")
                            if trigger is not None and trigger.watches else None)
        memory_dir = cast(str | None, self.config.memory_dir)  # a str by now (ManagerConfig)
        self.memory = (MemorySaves(self.url, memory_dir,
                                   self.config.memory_trigger, self.config.save,
                                   self.config.load, drains=self.config.trigger is not None,
                                   replicas=self.config.memory_replicas)
                       if self.config.memory_trigger is not None else None)
        """The memory tier (dckpt.tiers), or None."""
        self._signals = SignalWatch(dist.rank())
        if self.config.handle_signals:
            self._signals.install()

    # ----------------------------------------------------------------- restore

    @public
    def restore(self, state_dict: dict, *, step: int | None = None,
                best_metric: tuple[str, Literal["min", "max"]] | None = None,
                partial: bool = False) -> CheckpointInfo | None:
        """(collective) Load the newest checkpoint that loads cleanly (damaged ones skipped,
        all ranks agreeing), the chosen ``step``, or the best by ``best_metric=(name,
        mode)``. None when the repository holds no checkpoint: a fresh start."""
        def checked() -> int | None:
            check_state_dict(state_dict)
            check_bool(partial, "partial")
            if best_metric is not None and not (isinstance(best_metric, tuple | list)
                                                and len(best_metric) == 2):
                raise ArgumentError("restore: best_metric must be a (name, 'min' or 'max') "
                                    f"pair, got {best_metric!r}")
            if step is not None and best_metric is not None:
                raise ArgumentError("restore: pass step or best_metric, not both")
            return check_step(step, optional=True)

        step = dist.agreed(checked, "CheckpointManager.restore",
                           timeout_s=self.config.load.collective_timeout_s, saving=False)
        if best_metric is not None:
            chosen = self.best(*best_metric)
            if chosen is None:
                raise CheckpointNotFoundError(f"{self.url}: no checkpoint carries the metric "
                                              f"{best_metric[0]!r}")
            step = chosen.step
        t0 = time.perf_counter()
        self._restore_called = True
        try:
            info = None
            if self.memory is not None and step is None:
                info = self.memory.restore(state_dict, self.url, self.storage_options, partial)
            if info is None:
                info = dataclasses.replace(api.load(
                    state_dict, self.url, step=step, partial=partial,
                    storage_options=self.storage_options, config=self.config.load),
                    tier="storage")
        except CheckpointNotFoundError:
            if step is not None:
                raise
            log.info("rank %d: no checkpoint in %s: starting fresh", dist.rank(), self.url)
            if self.memory is not None:
                self.memory.forget_after(None)
            return None
        if self.memory is not None:
            self.memory.forget_after(info.step)
            # IMPORTANT: only now: on a state never stepped, state_dict() (DCP's
            # get_state_dict) steps the optimizer once with lr 0 to create its state, and its
            # step count would change the run; a fresh start checks the room at its first
            # memory save
            self.memory.check_room(state_dict)
        again = self.restored is not None  # a second restore of this run (a pipeline's stage)
        self.recoveries = max(self.recoveries, 1)
        self.restored = info
        self._committed.add(info.step)
        # the newer checkpoints it passed over (damaged, quarantined): the run saves those
        # steps again, and deletes each first (Upkeep.clear)
        self._passed_over = dict(info.skipped) if info.tier == "storage" else {}
        self._last_save_t = time.monotonic()
        if dist.rank() == 0:
            skipped = "; ".join(f"step {s}: {headline(r)}" for s, r in info.skipped)
            log.log(logging.INFO if again else logging.WARNING,
                    "recovery %d: restored step %d from %s (%s) in %.2f s (%d bytes read; tried %s); "
                    "training since that checkpoint is redone: %d newer step(s) skipped, "
                    "checkpoint taken %.0f s ago", self.recoveries, info.step, self.url, info.tier,
                    time.perf_counter() - t0, info.bytes_read, list(info.tried),
                    info.data_lost_steps or 0, time.time() - info.created_at,
                    extra=event("restore", step=info.step, seconds=info.phase_s.get("total"),
                                bytes=info.bytes_read, reason=skipped or None))
        if self.metrics is not None:
            self.metrics.observe_restore(info, self.recoveries)
        if self.on_restore is not None:
            self.on_restore(info)
        return info

    @public
    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (not collective)."""
        return self._upkeep.checkpoints()

    @public
    def best(self, metric: str, mode: Literal["min", "max"] = "min") -> CheckpointInfo | None:
        """The committed checkpoint with the best ``metric`` (not collective)."""
        if not isinstance(metric, str) or mode not in ("min", "max"):
            raise ArgumentError(f"best(metric, mode): a metric name and 'min' or 'max', got "
                                f"{metric!r}, {mode!r}")
        ranked = best(self.checkpoints(), metric, mode)
        return ranked[0] if ranked else None

    # ----------------------------------------------------------------- saving

    @public
    def maybe_save(self, step: int, state_dict: dict, metrics: dict | None = None, *,
                   epoch_end: bool = False) -> Result:
        """(collective, every step) Save if a trigger fires at ``step``: the handle of the
        async save (or the info of a sync one), else None. After a preemption signal: the
        emergency checkpoint, then the job exits (see the class)."""
        step = _check_save_call(step, state_dict, metrics)
        check_bool(epoch_end, "epoch_end")
        self._check_open("maybe_save", step)
        self._poll()
        moment = self._moment(step, metrics, epoch_end)
        if self.memory is not None and self.memory.trigger(moment) and step != self.memory.step:
            self.memory.save(step, state_dict, metrics)
        if self.trigger is None:
            return None
        reason = self.trigger(moment)
        if reason == "preemption":
            return self._emergency(step, state_dict, metrics, moment.metrics)
        if reason is None or step in self._committed:
            return None
        return self._save(step, state_dict, metrics, reason, moment.metrics)

    def _check_open(self, method: str, step: int) -> None:
        if self._closed:
            raise DckptError(f"CheckpointManager({self.url!r}).{method} at step {step} after "
                             "close() (or after a preemption checkpoint): this manager saves "
                             "no more; make a new one to save again")

    def _moment(self, step: int, metrics: dict | None, epoch_end: bool) -> Moment:
        """(all ranks) This call as every rank sees it (see dckpt.triggers)."""
        agreed = None
        if self._agreement is not None:
            with dist.collectives(f"the managers' agreement at step {step}", saving=False):
                agreed = self._agreement.exchange(self._signals.signum is not None,
                                                  time.monotonic() - self._last_save_t,
                                                  self.saves)
        fresh = agreed is not None and agreed.saves == self.saves
        return Moment(step, epoch_end, self._watched(metrics),
                      elapsed_s=agreed.elapsed_s if fresh and agreed else None,
                      signalled=agreed is not None and agreed.signalled,
                      previous=self._saved_metrics)

    def _watched(self, metrics: dict | None) -> dict[str, object]:
        """(all ranks) Rank 0's values of the metrics the triggers watch, where the call
        carries them (every rank's calls carry the same keys)."""
        watches = self.trigger.watches if self.trigger is not None else frozenset()
        watched = {k: plain_metric(v) for k, v in (metrics or {}).items() if k in watches}
        if watched:
            with dist.collectives("the broadcast of rank 0's metrics", saving=False):
                watched = dist.broadcast(watched, self._broadcasts)  # type: ignore[assignment]
        return watched

    @public
    def save(self, step: int, state_dict: dict, metrics: dict | None = None) -> Result:
        """(collective) Save now, whatever the triggers say."""
        def checked() -> int:
            checked_step = _check_save_call(step, state_dict, metrics)
            self._check_open("save", checked_step)  # a save in flight after close() is
            return checked_step  # waited for by none

        step = dist.agreed(checked, "CheckpointManager.save",
                           timeout_s=self.config.save.collective_timeout_s, saving=True)
        self._poll()
        return self._save(step, state_dict, metrics, "asked", self._watched(metrics))

    def _save(self, step: int, state_dict: dict, metrics: dict | None, reason: str,
              watched: Mapping[str, object]) -> Result:
        log.info("rank %d: saving step %d (%s)", dist.rank(), step, reason,
                 extra=event("save_start", step=step, reason=reason))
        if step in self._passed_over:  # every rank's restore passed over the same steps
            try:
                self._upkeep.clear(step, self._passed_over.pop(step), dist.checkpoint_group(
                    self.config.save.collective_timeout_s, purpose="trigger"))
            except DckptError as e:
                self._failed(step, e)
                return None
        self._last_save_t = time.monotonic()
        self._started[step] = time.time()
        self._saved_metrics.append(watched)  # agreed values only: triggers compare them
        self.saves += 1
        kwargs = dict(step=step, metrics=metrics, storage_options=self.storage_options,
                      config=self.config.save)
        try:
            if self.memory is not None:  # a copy of the memory checkpoint: one device copy
                handle = self.memory.to_storage(step, state_dict, metrics,
                                                Writer(self.url, **kwargs))  # type: ignore[arg-type]
                info = handle.wait() if not self.config.async_save else None
            elif not self.config.async_save:  # only DckptError leaves api.save
                info = api.save(state_dict, self.url, **kwargs)  # type: ignore[arg-type]
            else:
                handle = api.async_save(state_dict, self.url, **kwargs)  # type: ignore[arg-type]
            if not self.config.async_save:
                assert info is not None
                self._started.pop(step, None)
                self._committed.add(step)
                self._saved(info)
                return info
        except DckptError as e:
            self._started.pop(step, None)
            self._failed(step, e)
            return None
        if handle.skipped:
            self._started.pop(step, None)
        else:
            self._committed.add(step)
            self._pending.append(handle)
        if self.metrics is not None:
            self.metrics.observe_pause(handle.pause_s)
        return handle

    def _poll(self, wait: bool = False) -> None:
        """Report the async saves that ended (all of them with ``wait``)."""
        still = []
        for h in self._pending:
            if wait:
                h.settle()
            if not h.done():
                still.append(h)
                continue
            self._started.pop(h.step, None)
            if h.error is not None:
                self._committed.discard(h.step)
                self._failed(h.step, h.error)
            elif h.info is not None:
                self._saved(h.info)
        self._pending = still
        for failed in self.memory.poll(wait) if self.memory is not None else []:
            self._failed(*failed)
        if self.memory is not None and self.memory.leader and self.metrics is not None:
            self.metrics.observe_memory(self.memory.held_bytes)

    def _saved(self, info: CheckpointInfo) -> None:
        if self.metrics is not None:
            self.metrics.observe_save(info)
        if dist.rank() == 0:
            log.info("checkpoint of step %d committed: %d bytes written of %d, %.2f s",
                     info.step, info.bytes_written, info.bytes_logical,
                     info.phase_s.get("total", 0.0),
                     extra=event("save_commit", step=info.step,
                                 seconds=info.phase_s.get("total"), bytes=info.bytes_written))
            if self._upkeep.active:
                self._upkeep.submit()
        if self.on_save is not None:
            self.on_save(info)

    def _failed(self, step: int, error: BaseException) -> None:
        reason = headline(str(error)) or type(error).__name__
        if isinstance(error, CheckpointExistsError) and not self._restore_called:
            # the usual cause: a relaunch that trains from step 0 again over its checkpoints
            reason += ("; this manager never restored: a run that resumes calls "
                       "mgr.restore(state) before its first maybe_save")
        self.failures.append((step, reason))
        log.error("rank %d: the checkpoint of step %d failed, training goes on: %s",
                  dist.rank(), step, reason,
                  extra=event("save_failed", step=step, reason=reason))
        if self.metrics is not None:
            self.metrics.observe_failure(type(error).__name__)
        if self.on_failure is not None:
            self.on_failure(step, error)

    def _emergency(self, step: int, state_dict: dict, metrics: dict | None,
                   watched: Mapping[str, object]) -> Result:
        signum = self._signals.signum or signal.SIGTERM  # a peer's signal: act as for SIGTERM
        log.warning("rank %d: preemption: emergency checkpoint of step %d", dist.rank(), step,
                    extra=event("preemption", step=step, reason=signal.Signals(signum).name))
        self._poll(wait=True)
        result: Result = None
        if step not in self._committed:
            result = self._save(step, state_dict, metrics, "preemption", watched)
            self._poll(wait=True)
        self.preempted = step in self._committed
        if dist.rank() == 0:
            log.warning("preemption checkpoint of step %d %s", step,
                        "committed" if self.preempted else "FAILED")
        if self.config.exit_on_preemption:  # memory is kept unless storage has this step
            self._close(remove_memory=self.preempted, finish_upkeep=False)
            self._signals.exit(signum)
        self._signals.signum = None
        return result

    # ----------------------------------------------------------------- retention

    @public
    def apply_retention(self, *, dry_run: bool = False) -> RetentionReport:
        """Delete the checkpoints the policy does not keep (never the newest, nor one being
        written), then collect garbage. Not collective; rank 0 runs it after each commit."""
        check_bool(dry_run, "dry_run")
        return self._upkeep.apply(dry_run=dry_run)

    def _in_flight(self) -> tuple[set[int], list[float]]:
        """The steps of the saves that may still be writing, and when each began."""
        return {h.step for h in self._pending}, list(self._started.values())

    # ----------------------------------------------------------------- closing

    @public
    def wait(self) -> None:
        """Wait for the save in flight and the retention after it."""
        self._poll(wait=True)
        self._upkeep.wait()

    @public
    def close(self) -> None:
        """(collective) Wait for the saves in flight and their retention; saves nothing
        else. A clean end: the memory tier's folder is removed."""
        self._close(remove_memory=True)

    def _close(self, remove_memory: bool, finish_upkeep: bool = True) -> None:
        """``finish_upkeep=False`` (a preemption's exit): retention and gc stop where they
        are, for the restart's first save to resume; the grace period is for the checkpoint."""
        if self._closed:
            return
        self._poll(wait=True)
        self._upkeep.close(finish=finish_upkeep)
        try:
            with dist.collectives("closing the CheckpointManager", saving=False):
                if self.memory is not None:
                    self.memory.close(remove=remove_memory)
                if self._agreement is not None:
                    self._agreement.close()
        finally:
            self._signals.restore()
            self._closed = True

    def __enter__(self) -> CheckpointManager:
        return self

    @public
    def __exit__(self, *exc: object) -> None:
        self._close(remove_memory=exc[0] is None)  # after a crash the restart may need it


def _check_save_call(step: object, state_dict: object, metrics: object) -> int:
    """A save's arguments, refused at once (a failed save lets training go on; a wrong
    argument would fail every save); the step as a Python int."""
    step = check_step(step)
    check_state_dict(state_dict)
    check_metrics(metrics, convert=False)  # a device tensor's value is read where it is used
    return step
