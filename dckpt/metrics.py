"""Prometheus metrics for checkpoints, through prometheus-client, three ways out: a textfile
for node_exporter's textfile collector, a push to a Pushgateway, an HTTP endpoint to scrape.

    metrics = dckpt.Metrics(job="llm-pretrain", textfile="/var/lib/node_exporter/dckpt.prom")
    mgr = dckpt.CheckpointManager(url, save_every_steps=500, metrics=metrics)
    metrics.serve(9400)                          # optional: http://host:9400/metrics
    metrics.push("pushgateway:9091")             # optional, e.g. at the end of a batch job

The manager records every save, failure, restore and retention run; ``observe_*`` can be
called directly by code that uses ``dckpt.save`` / ``load`` without the manager. Only rank 0
records by default (the figures in a CheckpointInfo already cover all ranks), so one series
per job, not per rank. Metric names and what they mean: docs/operations.md.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    push_to_gateway,
    start_http_server,
    write_to_textfile,
)

from dckpt import dist
from dckpt.arguments import check_bool, check_path, public
from dckpt.errors import ArgumentError, DckptError, StorageError
from dckpt.files import replaced_by_rename
from dckpt.info import CheckpointInfo

__all__ = ["Metrics"]

log = logging.getLogger(__name__)

_SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """A registry of dckpt's metrics for one training job (its ``job`` label)."""

    def __init__(self, job: str = "dckpt", *, textfile: str | os.PathLike | None = None,
                 all_ranks: bool = False) -> None:
        if not isinstance(job, str) or not job:
            raise ArgumentError(f"Metrics job must be a non-empty str, got {job!r}")
        if textfile is not None:
            textfile = check_path(textfile, "Metrics textfile", "a file path or None")
            if os.path.isdir(textfile):
                raise ArgumentError(f"Metrics textfile {textfile!r} is a folder; name the file "
                                    "(node_exporter reads *.prom files)")
            other = replaced_by_rename(textfile)
            if other:  # written beside it and renamed over it
                raise ArgumentError(f"Metrics textfile {textfile!r} is {other}, which writing "
                                    "it would replace; name a file (node_exporter reads *.prom "
                                    "files)")
        check_bool(all_ranks, "Metrics all_ranks")
        self.job = job
        self.textfile = textfile
        self._unwritable: str | None = None  # the kind of textfile failure logged
        self.enabled = all_ranks or dist.rank() == 0
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        r, j = self.registry, ("job_name",)
        self.last_success_ts = Gauge("dckpt_last_success_timestamp_seconds",
                                     "Unix time of the newest committed checkpoint", j, registry=r)
        self.last_success_step = Gauge("dckpt_last_success_step",
                                       "Step of the newest committed checkpoint", j, registry=r)
        self.save_phase = Gauge("dckpt_save_phase_seconds",
                                "Seconds per phase of the last save (plan, write, commit, "
                                "total, ...)", ("job_name", "phase"), registry=r)
        self.save_seconds = Histogram("dckpt_save_seconds", "Seconds per save, start to commit",
                                      j, buckets=_SECONDS_BUCKETS, registry=r)
        self.pause = Histogram("dckpt_training_pause_seconds",
                               "Seconds the training was held per save (the staging copy)",
                               j, buckets=_SECONDS_BUCKETS, registry=r)
        self.bytes_logical = Counter("dckpt_bytes_logical", "State bytes saved, all ranks",
                                     j, registry=r)
        self.bytes_written = Counter("dckpt_bytes_written",
                                     "Bytes stored by saves (after dedup and compression)",
                                     j, registry=r)
        self.dedup_ratio = Gauge("dckpt_dedup_ratio",
                                 "Last save: state bytes / bytes stored (1 = nothing reused)",
                                 j, registry=r)
        self.compression_ratio = Gauge("dckpt_compression_ratio",
                                       "Last save: raw bytes / stored bytes of its new blocks",
                                       j, registry=r)
        self.saves = Counter("dckpt_saves", "Committed saves", j, registry=r)
        self.failures = Counter("dckpt_save_failures", "Failed saves by reason",
                                ("job_name", "reason"), registry=r)
        self.corrupt = Counter("dckpt_corrupt_checkpoints_detected",
                               "Checkpoints found damaged (skipped on restore, or by verify)",
                               j, registry=r)
        self.restore_seconds = Gauge("dckpt_restore_seconds",
                                     "Seconds of the last restore, find to loaded", j,
                                     registry=r)
        self.recoveries = Gauge("dckpt_recoveries", "Restarts this job recovered from", j,
                                registry=r)
        self.data_lost_steps = Gauge("dckpt_data_lost_steps",
                                     "Last restore: steps between the checkpoint used and the "
                                     "newest one attempted", j, registry=r)
        self.free_bytes = Gauge("dckpt_storage_free_bytes",
                                "Free bytes on the repository's filesystem (local only)", j,
                                registry=r)
        self.checkpoints = Gauge("dckpt_checkpoints", "Committed checkpoints in the repository",
                                 j, registry=r)
        self.memory_bytes = Gauge("dckpt_memory_bytes",
                                  "Bytes the memory tier holds in this node's shared memory",
                                  j, registry=r)
        self.health = Gauge("dckpt_health_status",
                            "Last health check: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN", j,
                            registry=r)
        self.recoverable_step = Gauge("dckpt_recoverable_step",
                                      "Last health check: the step a restart would load "
                                      "(-1: none)", j, registry=r)
        self.damaged = Gauge("dckpt_damaged_checkpoints",
                             "Checkpoints the last verify or health check found damaged", j,
                             registry=r)
        self._server: Any = None

    # ------------------------------------------------------------ recording

    def _on(self) -> bool:
        return self.enabled

    @public
    def observe_save(self, info: CheckpointInfo) -> None:
        if not self._on():
            return
        with self._lock:
            self.last_success_ts.labels(self.job).set(info.created_at)
            self.last_success_step.labels(self.job).set(info.step)
            for phase, seconds in info.phase_s.items():
                self.save_phase.labels(self.job, phase).set(seconds)
            if "total" in info.phase_s:
                self.save_seconds.labels(self.job).observe(info.phase_s["total"])
            self.bytes_logical.labels(self.job).inc(info.bytes_logical)
            self.bytes_written.labels(self.job).inc(info.bytes_written)
            self.dedup_ratio.labels(self.job).set(
                info.bytes_logical / info.bytes_written if info.bytes_written else 0.0)
            if info.bytes_written and info.bytes_written_raw:
                self.compression_ratio.labels(self.job).set(
                    info.bytes_written_raw / info.bytes_written)
            self.saves.labels(self.job).inc()
        self._flush()

    @public
    def observe_pause(self, seconds: float) -> None:
        """The training's pause for one save (recorded when the save is staged)."""
        if self._on():
            self.pause.labels(self.job).observe(seconds)

    @public
    def observe_failure(self, reason: str) -> None:
        if not self._on():
            return
        self.failures.labels(self.job, reason).inc()
        self._flush()

    @public
    def observe_restore(self, info: CheckpointInfo, recoveries: int) -> None:
        if not self._on():
            return
        with self._lock:
            self.restore_seconds.labels(self.job).set(info.phase_s.get("total", 0.0))
            self.recoveries.labels(self.job).set(recoveries)
            self.data_lost_steps.labels(self.job).set(info.data_lost_steps or 0)
            if info.skipped:
                self.corrupt.labels(self.job).inc(len(info.skipped))
        self._flush()

    @public
    def observe_corrupt(self, n: int = 1) -> None:
        if self._on():
            self.corrupt.labels(self.job).inc(n)

    @public
    def observe_memory(self, held_bytes: int) -> None:
        """What the memory tier holds on this node (after each memory commit)."""
        if self._on():
            self.memory_bytes.labels(self.job).set(held_bytes)

    @public
    def observe_repository(self, url: str, checkpoints: int) -> None:
        """The count of checkpoints, and free space where the repository is a local path."""
        if not self._on():
            return
        self.checkpoints.labels(self.job).set(checkpoints)
        path = url[len("file://"):] if url.startswith("file://") else url
        if "://" not in path:
            try:
                self.free_bytes.labels(self.job).set(shutil.disk_usage(path).free)
            except OSError:
                pass
        self._flush()

    @public
    def observe_health(self, health: Any) -> None:
        """A dckpt.Health (``dckpt health --metrics-textfile``, e.g. from cron)."""
        if not self._on():
            return
        with self._lock:
            self.health.labels(self.job).set(health.code)
            self.recoverable_step.labels(self.job).set(
                -1 if health.recoverable_step is None else health.recoverable_step)
            self.damaged.labels(self.job).set(len(health.unrecoverable))
            self.checkpoints.labels(self.job).set(health.checkpoints)
            if health.free_bytes is not None:
                self.free_bytes.labels(self.job).set(health.free_bytes)
            if health.newest_step is not None and health.newest_age_s is not None:
                self.last_success_step.labels(self.job).set(health.newest_step)
                self.last_success_ts.labels(self.job).set(time.time() - health.newest_age_s)
        self._flush()

    @public
    def observe_unknown(self) -> None:
        """A health check that could not run."""
        if self._on():
            self.health.labels(self.job).set(3)
            self._flush()

    @public
    def observe_verify(self, report: Any) -> None:
        """A dckpt.VerifyReport: the damaged checkpoints it found."""
        if not self._on():
            return
        damaged = len({p.step for p in report.problems if p.damage})  # not the storage's
        self.damaged.labels(self.job).set(damaged)
        if damaged:
            self.corrupt.labels(self.job).inc(damaged)
        self._flush()

    # ------------------------------------------------------------ output

    def _flush(self) -> None:
        """The textfile, after each record: a failure to write it is logged (once while it
        lasts), never raised into the save or the training that recorded."""
        if not self.textfile:
            return
        try:
            self.write_textfile(self.textfile)
            self._unwritable = None
        except StorageError as e:
            kind = type(e.__cause__).__name__  # its message names a temporary file
            if kind != self._unwritable:
                log.warning("%s; the checkpoints are not affected", str(e))
            self._unwritable = kind

    @public
    def write_textfile(self, path: str | os.PathLike) -> None:
        """Write the metrics for node_exporter's textfile collector (atomically);
        StorageError when it cannot be written."""
        path = check_path(path, "write_textfile's path", "a file path")
        other = replaced_by_rename(path)
        if other:
            raise StorageError(f"metrics textfile {path}: not written: it is {other}, which "
                               "writing it would replace")
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_to_textfile(path, self.registry)
        except OSError as e:
            raise StorageError(f"metrics textfile {path}: not written ({type(e).__name__}: "
                               f"{e})") from e

    @public
    def push(self, gateway: str, *, timeout: float = 10.0) -> None:
        """Push to a Pushgateway (``host:port`` or a URL), grouped by job; DckptError when
        the gateway does not take it within ``timeout`` seconds."""
        if not isinstance(gateway, str) or not gateway:
            raise ArgumentError(f"push: gateway must be 'host:port' or a URL, got {gateway!r}")
        if type(timeout) not in (int, float) or not 0 < timeout < math.inf:
            raise ArgumentError(f"push: timeout must be a number of seconds > 0, got "
                                f"{timeout!r}")
        try:
            push_to_gateway(gateway, job=self.job, registry=self.registry, timeout=timeout)
        except (OSError, ValueError) as e:  # urllib's URLError and HTTPError are OSErrors
            raise DckptError(f"metrics push to {gateway}: not pushed ({type(e).__name__}: "
                             f"{e}); check that a Pushgateway answers there") from e

    @public
    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` over HTTP from a daemon thread; returns the port it listens
        on (``port=0``: one the system chose). A second call returns the first's port."""
        if type(port) is not int or not 0 <= port <= 65535:
            raise ArgumentError(f"serve: port must be an int in [0, 65535], got {port!r}")
        if not isinstance(addr, str):
            raise ArgumentError(f"serve: addr must be an address (str), got {addr!r}")
        if self._server is None:
            try:
                self._server = start_http_server(port, addr=addr, registry=self.registry)
            except OSError as e:  # the port is taken, the address is not this host's
                raise DckptError(f"metrics: cannot serve on {addr}:{port} "
                                 f"({type(e).__name__}: {e}); pick a free port (0: any) or an "
                                 "address of this host") from e
        return int(self._server[0].server_port)

    def close(self) -> None:
        if self._server is not None:
            server, _thread = self._server
            server.shutdown()
            server.server_close()
            self._server = None

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()
