"""CheckpointManager: when to save, what to keep, preemption saves and automatic resume.

    mgr = dckpt.CheckpointManager(url, save_every_steps=500,
                                  retention=dckpt.KeepLast(3) | dckpt.KeepBest(2, "val_loss"))
    info = mgr.restore(state)              # newest checkpoint that loads cleanly, or None
    for step in range(info.step + 1 if info else 0, total_steps):
        ...
        mgr.maybe_save(step, state, metrics={"val_loss": v})
    mgr.close()

Every rank takes the same decision at the same step. Step and epoch triggers are the same
on every rank by construction. The time trigger and preemption signals are not (clocks and
signal arrival differ), so the ranks agree on them through one small all-reduce per call
(two numbers, on a gloo group of its own) that is started at one call and read at the next:
it runs while the step runs, the decision lands one step late, and no rank waits on it
unless its peers are a whole step behind (benchmarks/bench_manager.py measures the cost).
The metric trigger is decided by rank 0 and broadcast, only at the steps that pass the
metric.

Saves are asynchronous by default (training pauses only for the staging copy). After a
commit, rank 0 applies the retention policy and collects garbage in a background thread.
On SIGTERM or SIGUSR1 the next ``maybe_save`` (all ranks agreeing on the step) takes an
emergency checkpoint, waits for its commit, then lets the job exit: the handler that was
installed before runs, or, where there was none, the process exits with 128 + the signal's
number.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as tdist

from dckpt import api, dist, layout
from dckpt.config import LoadConfig, SaveConfig
from dckpt.errors import ArgumentError, CheckpointNotFoundError, DckptError
from dckpt.info import CheckpointInfo
from dckpt.logs import event
from dckpt.manifest import stored_datas
from dckpt.metrics import Metrics
from dckpt.retention import Policy, best, plan
from dckpt.saver import SaveHandle
from dckpt.storage import Store
from dckpt.sweep import GcReport, collect

__all__ = ["CheckpointManager", "RetentionReport"]

log = logging.getLogger(__name__)

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

AGREE_INTERVAL_S = 0.5
"""Seconds of training between two exchanges of the trigger agreement: how late a time
trigger or a preemption signal is acted on, at most about twice this (plus one step)."""
MAX_CALLS_BETWEEN = 10_000

GC_MARGIN_S = 60.0
"""Garbage collection after retention spares what started this long before the oldest save
this manager may still have in flight (clock skew between hosts)."""


@dataclass(frozen=True)
class RetentionReport:
    kept: tuple[int, ...]
    deleted: tuple[int, ...]
    dry_run: bool
    gc: GcReport | None = None


@dataclass(frozen=True)
class _Agreed:
    signalled: bool
    """A preemption signal reached some rank."""
    elapsed_s: float
    """The most seconds since the last save over the ranks, when the exchange started."""
    saves: int
    """Saves started before the exchange (all ranks save at the same calls): a time figure
    from before the latest save is stale."""


class _Agreement:
    """The ranks' shared view of rank-local triggers (signals, clocks), without a collective
    that blocks: an all-reduce (MAX) is started at one call and read at a later one, when it
    has long finished. The calls between exchanges are chosen from the agreed step time, so
    that an exchange happens about every ``interval_s`` whatever the step time (every call
    when steps are slow), and every rank computes the same schedule."""

    def __init__(self, timeout_s: float, interval_s: float) -> None:
        self.group = dist.checkpoint_group(timeout_s, purpose="trigger")
        self.interval_s = interval_s
        self.exchanges = 0
        self._work: Any = None
        self._buf = torch.zeros(4, dtype=torch.float64)
        self._calls = 0
        self._next = 0  # the call of the next exchange
        self._launched_at = (0, time.monotonic())  # (call, time) of the last exchange

    def exchange(self, signalled: bool, elapsed_s: float, saves: int) -> _Agreed | None:
        """(all ranks, every call) What the ranks agreed at the previous exchange, when this
        call is an exchange point and one came before; None otherwise."""
        if self.group is None:
            return _Agreed(signalled, elapsed_s, saves)
        self._calls += 1
        if self._calls < self._next:
            return None
        now = time.monotonic()
        calls, then = self._launched_at
        per_call = (now - then) / max(1, self._calls - calls) if self._work is not None else 0.0
        agreed = None
        if self._work is not None:
            self._work.wait()
            b = self._buf.tolist()
            agreed = _Agreed(b[0] > 0, b[1], int(b[2]))
            # every rank derives the same gap from the same agreed step time
            gap = self.interval_s / b[3] if b[3] > 0 else 1.0
            self._next = self._calls + max(1, min(MAX_CALLS_BETWEEN, int(gap)))
        else:
            self._next = self._calls + 1
        self._buf = torch.tensor([1.0 if signalled else 0.0, elapsed_s, float(saves), per_call],
                                 dtype=torch.float64)
        self._work = tdist.all_reduce(self._buf, op=tdist.ReduceOp.MAX, group=self.group,
                                      async_op=True)
        self._launched_at = (self._calls, now)
        self.exchanges += 1
        return agreed

    def close(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None


class CheckpointManager:
    """Decides when to save, keeps what the retention policy says, saves on preemption and
    resumes. Constructed, called and closed on every rank (collective).

    Triggers (any that fires saves): ``save_every_steps`` (at ``step % N == 0``),
    ``save_every_seconds`` (agreed across ranks), ``save_at_epoch_end`` (calls with
    ``epoch_end=True``), ``save_on_improve=(metric, mode)`` (calls whose metrics carry it,
    every rank at the same steps; rank 0's value decides). ``retention``: a policy of
    dckpt.retention, or None to keep everything; ``gc`` then sweeps what no checkpoint
    references. ``async_save``: saves return once staged. ``handle_signals``: SIGTERM and
    SIGUSR1 trigger an emergency save (main thread only); ``exit_on_preemption=False``
    returns instead, with ``preempted`` set, for the loop to stop itself.
    Callbacks: ``on_save(info)``, ``on_restore(info)``, ``on_failure(step, error)``, called
    on the training thread (an async save's, at the next call after it ended). ``metrics``: a
    dckpt.Metrics that records every save, failure, restore and retention run.
    """

    def __init__(self, url: str, *, save_every_steps: int | None = None,
                 save_every_seconds: float | None = None, save_at_epoch_end: bool = False,
                 save_on_improve: tuple[str, Literal["min", "max"]] | None = None,
                 retention: Policy | None = None, gc: bool = True,
                 async_save: bool = True, handle_signals: bool = True,
                 exit_on_preemption: bool = True, storage_options: dict | None = None,
                 save_config: SaveConfig | None = None, load_config: LoadConfig | None = None,
                 on_save: Callable[[CheckpointInfo], None] | None = None,
                 on_restore: Callable[[CheckpointInfo], None] | None = None,
                 on_failure: Callable[[int, BaseException], None] | None = None,
                 metrics: Metrics | None = None) -> None:
        if save_every_steps is not None and (not isinstance(save_every_steps, int)
                                             or save_every_steps < 1):
            raise ArgumentError(f"save_every_steps must be an int >= 1 or None, got "
                             f"{save_every_steps!r}")
        if save_every_seconds is not None and not (save_every_seconds > 0
                                                   and math.isfinite(save_every_seconds)):
            raise ArgumentError(f"save_every_seconds must be > 0 or None, got "
                             f"{save_every_seconds!r}")
        if save_on_improve is not None and (
                not isinstance(save_on_improve, tuple) or len(save_on_improve) != 2
                or save_on_improve[1] not in ("min", "max")):
            raise ArgumentError("save_on_improve must be (metric, 'min' | 'max'), got "
                                f"{save_on_improve!r}")
        if retention is not None and not callable(retention):
            raise TypeError(f"retention must be a policy (callable), got {type(retention)}")
        self.url = url
        self.save_every_steps = save_every_steps
        self.save_every_seconds = save_every_seconds
        self.save_at_epoch_end = save_at_epoch_end
        self.save_on_improve = save_on_improve
        self.retention = retention
        self.gc = gc
        self.async_save = async_save
        self.exit_on_preemption = exit_on_preemption
        self.storage_options = storage_options
        self.save_config = save_config or SaveConfig()
        self.load_config = load_config or LoadConfig()
        self.on_save, self.on_restore, self.on_failure = on_save, on_restore, on_failure
        self.metrics = metrics

        self.preempted = False
        """True once the emergency checkpoint of a preemption signal committed."""
        self.restored: CheckpointInfo | None = None
        """What ``restore`` loaded, with its recovery report."""
        self.saves = 0
        self.failures: list[tuple[int, str]] = []
        """Saves that failed, as (step, reason); training went on."""
        self.recoveries = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        """Restarts of this job's workers so far (torchrun's count; +1 per restore that
        found a checkpoint after a start that was not a restart)."""
        self._closed = False
        self._signal: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._last_save_t = time.monotonic()
        self._committed: set[int] = set()
        self._best_value: float | None = None
        self._pending: list[SaveHandle] = []
        # step -> wall time its save began, while it may still be writing (gc after
        # retention spares what started since the oldest: docs/manager.md)
        self._started: dict[int, float] = {}
        self._retention = ThreadPoolExecutor(1, thread_name_prefix="dckpt-retention")
        self._retention_jobs: list[Future[RetentionReport]] = []
        self._lock = threading.Lock()
        self._agreement = (_Agreement(self.save_config.collective_timeout_s, AGREE_INTERVAL_S)
                           if save_every_seconds is not None or handle_signals else None)
        if handle_signals:
            self._install_handlers()

    # ----------------------------------------------------------------- signals

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning("CheckpointManager made off the main thread: no preemption handlers "
                        "(signals are delivered to the main thread only)")
            return
        for sig in PREEMPTION_SIGNALS:
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self._signal is None:
            self._signal = signum
            # no logging here: a handler may interrupt a logging call holding its lock
            os.write(2, f"dckpt: rank {dist.rank()} got {signal.Signals(signum).name}: "
                        "emergency checkpoint at the next step boundary\n".encode())

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers = {}

    # ----------------------------------------------------------------- restore

    def restore(self, state_dict: dict, *, step: int | None = None,
                best_metric: tuple[str, Literal["min", "max"]] | None = None,
                partial: bool = False) -> CheckpointInfo | None:
        """(collective) Load the newest checkpoint that loads cleanly (damaged ones skipped,
        all ranks agreeing), the chosen ``step``, or the best by ``best_metric=(name,
        mode)``. None when the repository holds no checkpoint: a fresh start."""
        if step is not None and best_metric is not None:
            raise ArgumentError("restore: pass step or best_metric, not both")
        if best_metric is not None:
            chosen = self.best(*best_metric)
            if chosen is None:
                raise CheckpointNotFoundError(f"{self.url}: no checkpoint carries the metric "
                                              f"{best_metric[0]!r}")
            step = chosen.step
        t0 = time.perf_counter()
        try:
            info = api.load(state_dict, self.url, step=step, partial=partial,
                            storage_options=self.storage_options, config=self.load_config)
        except CheckpointNotFoundError:
            if step is not None:
                raise
            log.info("rank %d: no checkpoint in %s: starting fresh", dist.rank(), self.url)
            return None
        again = self.restored is not None  # a second restore of this run (a pipeline's stage)
        if self.recoveries == 0:
            self.recoveries = 1
        self.restored = info
        self._committed.add(info.step)
        self._last_save_t = time.monotonic()
        since = time.time() - info.created_at
        if dist.rank() == 0:
            log.log(
                logging.INFO if again else logging.WARNING,
                "recovery %d: restored step %d from %s in %.2f s (%d bytes read; tried %s); "
                "training since that checkpoint is redone: %d newer step(s) skipped, "
                "checkpoint taken %.0f s ago", self.recoveries, info.step, self.url,
                time.perf_counter() - t0, info.bytes_read, list(info.tried),
                info.data_lost_steps or 0, since,
                extra=event("restore", step=info.step, seconds=info.phase_s.get("total"),
                            bytes=info.bytes_read,
                            reason="; ".join(f"step {s}: {r.splitlines()[0]}"
                                             for s, r in info.skipped) or None))
        if self.metrics is not None:
            self.metrics.observe_restore(info, self.recoveries)
        if self.on_restore is not None:
            self.on_restore(info)
        return info

    def checkpoints(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (not collective)."""
        try:
            return [c for c in api.list_checkpoints(self.url,
                                                    storage_options=self.storage_options)
                    if c.problem is None]
        except CheckpointNotFoundError:
            return []

    def best(self, metric: str, mode: Literal["min", "max"] = "min") -> CheckpointInfo | None:
        """The committed checkpoint with the best ``metric`` (not collective)."""
        ranked = best(self.checkpoints(), metric, mode)
        return ranked[0] if ranked else None

    # ----------------------------------------------------------------- saving

    def maybe_save(self, step: int, state_dict: dict, metrics: dict | None = None, *,
                   epoch_end: bool = False) -> SaveHandle | CheckpointInfo | None:
        """(collective, every step) Save if a trigger fires at ``step``: the handle of the
        async save (or the info of a sync one), else None. After a preemption signal: the
        emergency checkpoint, then the job exits (see the class)."""
        if self._closed:
            raise DckptError(f"CheckpointManager({self.url!r}).maybe_save at step {step} after "
                             "close() (or after a preemption checkpoint): this manager saves "
                             "no more; make a new one to save again")
        self._poll()
        agreed = None
        if self._agreement is not None:
            agreed = self._agreement.exchange(self._signal is not None,
                                              time.monotonic() - self._last_save_t, self.saves)
        reason = None
        if agreed is not None and agreed.signalled:
            return self._emergency(step, state_dict, metrics)
        if self.save_every_steps is not None and step % self.save_every_steps == 0:
            reason = "steps"
        elif epoch_end and self.save_at_epoch_end:
            reason = "epoch end"
        elif (self.save_every_seconds is not None and agreed is not None
              and agreed.saves == self.saves and agreed.elapsed_s >= self.save_every_seconds):
            reason = "time"
        if self.save_on_improve is not None and metrics and self.save_on_improve[0] in metrics:
            improved = self._improved(float(metrics[self.save_on_improve[0]]))
            reason = reason or ("improved" if improved else None)
        if reason is None or step in self._committed:
            return None
        return self._save(step, state_dict, metrics, reason)

    def save(self, step: int, state_dict: dict, metrics: dict | None = None
             ) -> SaveHandle | CheckpointInfo | None:
        """(collective) Save now, whatever the triggers say."""
        self._poll()
        return self._save(step, state_dict, metrics, "asked")

    def _improved(self, value: float) -> bool:
        _, mode = self.save_on_improve  # type: ignore[misc]
        group = self._agreement.group if self._agreement is not None else \
            dist.checkpoint_group(self.save_config.collective_timeout_s, purpose="trigger")
        value = float(dist.broadcast(value, group))  # type: ignore[arg-type]
        better = (self._best_value is None or (value < self._best_value if mode == "min"
                                               else value > self._best_value))
        if better and math.isfinite(value):
            self._best_value = value
            return True
        return False

    def _save(self, step: int, state_dict: dict, metrics: dict | None, reason: str
              ) -> SaveHandle | CheckpointInfo | None:
        log.info("rank %d: saving step %d (%s)", dist.rank(), step, reason,
                 extra=event("save_start", step=step, reason=reason))
        self._last_save_t = time.monotonic()
        self._started[step] = time.time()
        self.saves += 1
        try:
            if not self.async_save:
                try:
                    info = api.save(state_dict, self.url, step=step, metrics=metrics,
                                    storage_options=self.storage_options,
                                    config=self.save_config)
                finally:
                    self._started.pop(step, None)
                self._committed.add(step)
                self._saved(info)
                return info
            handle = api.async_save(state_dict, self.url, step=step, metrics=metrics,
                                    storage_options=self.storage_options,
                                    config=self.save_config)
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
                try:
                    h.wait()
                except BaseException:
                    pass
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

    def _saved(self, info: CheckpointInfo) -> None:
        if self.metrics is not None:
            self.metrics.observe_save(info)
        if dist.rank() == 0:
            log.info("checkpoint of step %d committed: %d bytes written of %d, %.2f s",
                     info.step, info.bytes_written, info.bytes_logical,
                     info.phase_s.get("total", 0.0),
                     extra=event("save_commit", step=info.step,
                                 seconds=info.phase_s.get("total"), bytes=info.bytes_written))
            if self.retention is not None or self.gc:
                self._retention_jobs.append(self._retention.submit(self._apply_retention))
        if self.on_save is not None:
            self.on_save(info)

    def _failed(self, step: int, error: BaseException) -> None:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        self.failures.append((step, reason))
        log.error("rank %d: the checkpoint of step %d failed, training goes on: %s",
                  dist.rank(), step, reason,
                  extra=event("save_failed", step=step, reason=reason))
        if self.metrics is not None:
            self.metrics.observe_failure(type(error).__name__)
        if self.on_failure is not None:
            self.on_failure(step, error)

    # ----------------------------------------------------------------- preemption

    def _emergency(self, step: int, state_dict: dict, metrics: dict | None
                   ) -> SaveHandle | CheckpointInfo | None:
        signum = self._signal or signal.SIGTERM  # a peer's signal: act as for SIGTERM
        log.warning("rank %d: preemption: emergency checkpoint of step %d", dist.rank(), step,
                    extra=event("preemption", step=step,
                                reason=signal.Signals(signum).name))
        self._poll(wait=True)
        result: SaveHandle | CheckpointInfo | None = None
        if step not in self._committed:
            result = self._save(step, state_dict, metrics, "preemption")
            self._poll(wait=True)
        self.preempted = step in self._committed
        if dist.rank() == 0:
            log.warning("preemption checkpoint of step %d %s", step,
                        "committed" if self.preempted else "FAILED")
        if self.exit_on_preemption:
            previous = self._previous_handlers.get(signum, signal.SIG_DFL)
            self.close()
            if callable(previous):
                previous(signum, None)
            raise SystemExit(128 + int(signum))
        self._signal = None
        return result

    # ----------------------------------------------------------------- retention

    def apply_retention(self, *, dry_run: bool = False) -> RetentionReport:
        """Delete the checkpoints the policy does not keep (never the newest, nor one being
        written), then collect garbage. Not collective; rank 0 runs it after each commit."""
        return self._apply_retention(dry_run=dry_run)

    def _apply_retention(self, dry_run: bool = False) -> RetentionReport:
        with self._lock:
            infos = self.checkpoints()
            deleted: list[int] = []
            kept = [c.step for c in infos]
            if self.retention is not None:
                protect = {h.step for h in self._pending}
                kept, deleted = plan(self.retention, infos, protect=protect)
                if not dry_run:
                    for s in deleted:
                        try:
                            api.delete(self.url, step=s, storage_options=self.storage_options)
                        except CheckpointNotFoundError:
                            pass  # deleted meanwhile
            report = None
            if self.gc:
                # IMPORTANT: spare what started after the oldest save of this manager that
                # may still be writing began (a save waiting in async_save for the one
                # before, or writing before async_save returned its handle, included); one
                # clock reading for the age and the sweep
                now = time.time()
                starts = list(self._started.values())
                since = None
                if starts:  # attempt names carry whole milliseconds, rounded down
                    since = math.floor(min(starts) * 1000) / 1000 - 0.002
                min_age = GC_MARGIN_S + (now - since if since is not None else 0.0)
                # deleted checkpoints need only the margin: this job's saves take the newest
                # committed checkpoint as their base, and retention never deletes it
                report = collect(Store(self.url, self.storage_options), dry_run=dry_run,
                                 min_age_s=min_age, deleted_min_age_s=GC_MARGIN_S, now_s=now)
            if deleted or (report is not None and report.deleted):
                log.info("retention%s: kept steps %s, deleted %s; gc freed %d bytes",
                         " (dry run)" if dry_run else "", kept, deleted,
                         report.bytes_freed if report is not None else 0,
                         extra=event("retention", bytes=report.bytes_freed if report else 0,
                                     reason=f"deleted steps {deleted}"))
            if self.metrics is not None and not dry_run:
                self.metrics.observe_repository(self.url, len(kept))
                self._observe_compression(infos[-1].step if infos else None)
            return RetentionReport(tuple(kept), tuple(deleted), dry_run, report)

    def _observe_compression(self, step: int | None) -> None:
        """The newest save's compression: raw over stored bytes of the blocks it wrote."""
        if step is None or self.metrics is None:
            return
        try:
            m = api.inspect(self.url, step=step, storage_options=self.storage_options)
        except DckptError:
            return
        mine = f"{layout.DATA_DIR}/{m.attempt}/"
        raw = stored = 0
        for e in m.items.values():
            for d in stored_datas(e):
                for b in d.blocks:
                    if b.segment.startswith(mine):
                        raw += b.raw_length
                        stored += b.length
        self.metrics.observe_compression(raw, stored)

    # ----------------------------------------------------------------- closing

    def wait(self) -> None:
        """Wait for the save in flight and the retention after it."""
        self._poll(wait=True)
        for job in self._retention_jobs:
            try:
                job.result()
            except Exception as e:
                log.error("retention failed: %s", e)
        self._retention_jobs = []

    def close(self) -> None:
        """(collective) Wait for the save in flight and its retention; saves nothing else."""
        if self._closed:
            return
        self.wait()
        if self._agreement is not None:
            self._agreement.close()
        self._retention.shutdown(wait=True)
        self._restore_handlers()
        self._closed = True

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
