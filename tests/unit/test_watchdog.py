"""A storage that stops answering (a hung mount: I/O blocked in the kernel, no timeout
reaches it): saves and loads fail in bounded time instead of hanging, nothing is committed,
and the next save works."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import dckpt
from dckpt.reads import Fetcher
from dckpt.mounts import filesystem_type, mount_source, watched_filesystem
from dckpt.storage import Store
from dckpt.watchdog import Heartbeat, Stalled, call_bounded, wait_all
from dckpt_testing import MotoServer, arm, disarm


def test_wait_all_gives_results_in_order_the_first_failure_or_stalled():
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(lambda i=i: (time.sleep(0.05 * (3 - i)), i)[1]) for i in range(3)]
        assert wait_all(futures, 5.0, "x") == [0, 1, 2]
        failing = [pool.submit(time.sleep, 2), pool.submit(lambda: 1 / 0)]
        t0 = time.monotonic()
        with pytest.raises(ZeroDivisionError):
            wait_all(failing, 5.0, "x")
        assert time.monotonic() - t0 < 1.5  # not after the slow one
        gate = threading.Event()
        stuck = [pool.submit(gate.wait, 30)]
        t0 = time.monotonic()
        with pytest.raises(Stalled, match="no progress for 0.3 s with 1 request"):
            wait_all(stuck, 0.3, "x")
        assert 0.3 <= time.monotonic() - t0 < 2.0
        assert isinstance(Stalled("x"), dckpt.StorageError)
        # a long request that shows progress is not a stall
        beat = Heartbeat()

        def steady() -> str:
            for _ in range(10):
                time.sleep(0.1)
                beat.beat()
            return "done"

        assert wait_all([pool.submit(steady)], 0.4, "x", beat) == ["done"]
        gate.set()


STATE = {"w": torch.arange(300_000, dtype=torch.float32), "b": torch.ones(7)}


@pytest.mark.parametrize("mode, where", [("sync", "every write"), ("async", "every write"),
                                         ("sync", "the segments"), ("async", "the pause")])
def test_a_save_to_a_storage_that_stops_answering_fails_in_bounded_time(tmp_path, mode,
                                                                         where, monkeypatch):
    """Every write blocks 3 s (no progress for longer than the bound, 0.5 s): from the
    first (the coordinator's small metadata writes, in the caller's thread), from the
    segments on (the writer threads), or from the write of what the staging budget does not
    hold, in an async save's pause (the training must not hang there either)."""
    monkeypatch.setattr(Store, "watch_metadata", True)  # as on NFS: tmp_path is local
    url = f"faultyfile://{tmp_path}"
    config = dckpt.SaveConfig(io_stall_timeout_s=0.5)
    if where == "the pause":  # 1.2 MB of state, 128 KiB of staging
        config = dckpt.SaveConfig(io_stall_timeout_s=0.5, block_size_bytes=64 << 10,
                                  staging_bytes=128 << 10)
    dckpt.save(STATE, url, step=1, config=config)
    if where == "every write":
        arm("slow", delay_s=3.0)
    else:
        arm("hang", after_bytes=10_000, delay_s=3.0)
    t0 = time.monotonic()
    try:
        with pytest.raises(dckpt.CommitError, match="stopped answering") as e:
            if mode == "sync":
                dckpt.save({k: v + 1 for k, v in STATE.items()}, url, step=2, config=config)
            else:
                handle = dckpt.async_save({k: v + 1 for k, v in STATE.items()}, url, step=2,
                                          config=config)
                assert handle.pause_s < 2.0  # the pause gave up, and the training goes on
                handle.wait(timeout=30)
        assert time.monotonic() - t0 < 2.8  # before the first blocked write even returned
        if where == "the segments":
            assert "rank 0's writes of step 2: no progress for 0.5 s" in str(e.value)
        if where == "the pause":
            assert "the pause's write of step 2" in str(e.value)
    finally:
        disarm()
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]
    time.sleep(3.5)  # the writer left behind finishes its segment: gc's, not a checkpoint's
    save = dckpt.save if mode == "sync" else (
        lambda *a, **k: dckpt.async_save(*a, **k).wait(timeout=30))
    save({k: v + 2 for k, v in STATE.items()}, url, step=3, config=config)
    out = {k: torch.zeros_like(v) for k, v in STATE.items()}
    assert dckpt.load(out, str(tmp_path)).step == 3
    assert all(torch.equal(out[k], STATE[k] + 2) for k in STATE)
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1, 3]


def test_an_s3_server_that_stops_answering_fails_saves_and_loads_within_the_stall_bound():
    """A real S3 server frozen (SIGSTOP: its socket takes connections and answers nothing).
    The requests' own timeouts and retries took 90 s each, whatever io_stall_timeout_s
    said: a save, an async save and a load each hung 1.5-3 minutes where 3 s was asked.
    Now each fails after about the bound asked, nothing is committed, and once the server
    answers again the last checkpoint loads."""
    server = MotoServer()
    try:
        server.make_bucket("frozen")
        url, opts = "s3://frozen/repo", server.options()
        dckpt.save(STATE, url, step=1, storage_options=opts)
        changed = {k: v + 1 for k, v in STATE.items()}
        out = {k: torch.zeros_like(v) for k, v in STATE.items()}
        save_config = dckpt.SaveConfig(io_stall_timeout_s=1.0)
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(dckpt.CommitError, match="stopped answering"):
                dckpt.save(changed, url, step=2, storage_options=opts, config=save_config)
            with pytest.raises(dckpt.CommitError, match="stopped answering"):
                dckpt.async_save(changed, url, step=3, storage_options=opts,
                                 config=save_config).wait(timeout=60)
            with pytest.raises(dckpt.StorageError, match="stopped answering"):
                dckpt.load(out, url, storage_options=opts,
                           config=dckpt.LoadConfig(io_stall_timeout_s=1.0))
            assert time.monotonic() - t0 < 20  # not one request's 90 s
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert [i.step for i in dckpt.list_checkpoints(url, storage_options=opts)] == [1]
        assert dckpt.load(out, url, storage_options=opts).step == 1
        assert all(torch.equal(out[k], STATE[k]) for k in STATE)
    finally:
        server.stop()


def test_a_late_wake_is_added_to_the_last_beat_not_to_the_silence(monkeypatch):
    beat = Heartbeat()
    beat.last = 100.0
    monkeypatch.setattr(time, "monotonic", lambda: 110.0)
    assert beat.woke(since=103.0, timeout=1.0) == 110.0  # 6 s late: not running
    assert beat.last == 106.0
    assert beat.woke(since=108.5, timeout=1.0) == 110.0  # 0.5 s late: a busy machine
    assert beat.last == 106.0


_SUSPENDED_LOAD = """
import sys, time, torch, dckpt
from dckpt.reads import Fetcher
read = Fetcher._read
def slow(self, *args):  # 50 ms of running time a read: a suspension stops it too
    time.sleep(0.05)
    return read(self, *args)
Fetcher._read = slow
out = {"w": torch.zeros(1 << 20)}
print("loading", flush=True)
config = dckpt.LoadConfig(io_stall_timeout_s=1.0, reader_threads=1, read_request_bytes=64 << 10)
info = dckpt.load(out, sys.argv[1], config=config)
print("loaded", info.step, torch.equal(out["w"], torch.arange(1 << 20, dtype=torch.float32)),
      flush=True)
"""


def test_a_process_suspended_mid_load_goes_on_when_it_resumes(tmp_path):
    """A job stopped by its scheduler (SIGSTOP) for longer than the stall bound: its reads
    did not stall, the whole process did. The wait that woke late on resume took that time
    for the storage's silence and failed the load (a 5 s suspension on a 2 s bound); the
    load now goes on and ends as it would have."""
    dckpt.save({"w": torch.arange(1 << 20, dtype=torch.float32)}, str(tmp_path), step=1)
    # 64 reads of 50 ms: mid-load after 1 s
    assert _suspended(_SUSPENDED_LOAD, str(tmp_path), after_s=1.0, for_s=3.0) == "loaded 1 True"


def _suspended(script: str, arg: str, *, after_s: float, for_s: float) -> str:
    """What ``script`` prints after its first line, run with ``arg``; stopped (SIGSTOP)
    ``after_s`` after that first line for ``for_s``. It must exit 0."""
    child = subprocess.Popen([sys.executable, "-c", script, arg],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        child.stdout.readline()
        time.sleep(after_s)
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(for_s)
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err[-2000:]
    return out.strip()


_SUSPENDED_WAIT = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from dckpt.watchdog import call_bounded, wait_all
def slow():  # 1 s of running time, in steps: a suspension stops it too
    for _ in range(20):
        time.sleep(0.05)
    return "done"
print("waiting", flush=True)
if sys.argv[1] == "call_bounded":
    print(call_bounded(slow, 2.0, "a slow call"), flush=True)
else:
    with ThreadPoolExecutor(1) as pool:
        print(*wait_all([pool.submit(slow)], 2.0, "a slow read"), flush=True)
"""


@pytest.mark.parametrize("wait", ["call_bounded", "wait_all"])
def test_a_wait_suspended_longer_than_its_bound_goes_on_when_it_resumes(wait):
    """Suspended 0.5 s into a call of 1 s for 4 s, on a bound of 2 s: the call still has
    half a second to run when the process resumes, and the wait, whose own timeout ran
    out meanwhile, woke to 4.5 s without an answer and gave up."""
    assert _suspended(_SUSPENDED_WAIT, wait, after_s=0.5, for_s=4.0) == "done"


def _in_a_forked_child(fn):
    """``fn()``'s result (or its error's name and message) in a child forked from here."""
    ctx = multiprocessing.get_context("fork")
    results = ctx.SimpleQueue()

    def run():
        try:
            results.put(("ok", fn()))
        except Exception as e:
            results.put((type(e).__name__, str(e)))

    child = ctx.Process(target=run)
    child.start()
    child.join(60)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == 0
    return results.get()


def test_a_child_forked_after_a_bounded_call_makes_its_own(s3_repo):
    """The parent's idle worker thread is no thread in a forked child: a bounded call handed
    to it never ran, and a child's first load from S3 (whose listings and manifests run
    bounded) failed after io_stall_timeout_s as a storage that stopped answering."""
    assert call_bounded(lambda: 1, 5.0, "a call") == 1  # leaves its worker idle
    assert _in_a_forked_child(lambda: call_bounded(lambda: 2, 2.0, "a call")) == ("ok", 2)
    url, opts = s3_repo
    state = {"w": torch.arange(10.0)}  # small: torch's own thread pool is not fork-safe
    dckpt.save(state, url, step=1, storage_options=opts)
    assert [i.step for i in dckpt.list_checkpoints(url, storage_options=opts)] == [1]

    def load() -> bool:
        out = {"w": torch.zeros(10)}
        dckpt.load(out, url, storage_options=opts, config=dckpt.LoadConfig(io_stall_timeout_s=5))
        return torch.equal(out["w"], state["w"])

    assert _in_a_forked_child(load) == ("ok", True)


def test_a_storage_failure_in_status_is_named_for_status(tmp_path, monkeypatch):
    dckpt.save(STATE, str(tmp_path), step=1)

    def fail(store):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("dckpt.catalog.committed_steps", fail)
    with pytest.raises(dckpt.StorageError, match=r"^dckpt\.status: the storage failed"):
        dckpt.status(str(tmp_path))


def test_a_load_or_verify_of_a_storage_that_stops_answering_fails_in_bounded_time(
        tmp_path, monkeypatch):
    url = str(tmp_path)
    dckpt.save(STATE, url, step=1)
    read = Fetcher._read

    def blocked(self, *args):
        time.sleep(3.0)
        return read(self, *args)

    monkeypatch.setattr(Fetcher, "_read", blocked)
    out = {k: torch.zeros_like(v) for k, v in STATE.items()}
    t0 = time.monotonic()
    with pytest.raises(dckpt.StorageError, match="stopped answering"):
        dckpt.load(out, url, config=dckpt.LoadConfig(io_stall_timeout_s=0.5))
    assert time.monotonic() - t0 < 2.5
    monkeypatch.setattr("dckpt.watchdog.STALL_S", 0.5)  # verify's bound
    t0 = time.monotonic()
    with pytest.raises(dckpt.StorageError, match="verify of step 1 .* no progress for 0.5 s"):
        dckpt.verify(url)
    assert time.monotonic() - t0 < 2.5
    monkeypatch.setattr(Fetcher, "_read", read)
    time.sleep(3.0)
    assert dckpt.load(out, url).step == 1 and torch.equal(out["w"], STATE["w"])
    assert dckpt.verify(url).ok  # a storage that stalled is not a finding about the data


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "5"])
def test_the_stall_bound_is_checked(bad):
    with pytest.raises(dckpt.ArgumentError):
        dckpt.SaveConfig(io_stall_timeout_s=bad)
    with pytest.raises(dckpt.ArgumentError):
        dckpt.LoadConfig(io_stall_timeout_s=bad)


def test_metadata_calls_are_bounded_on_network_and_fuse_filesystems_only():
    mounts = ["/dev/vda / ext4 rw 0 0", "server:/x /mnt/nfs nfs4 rw 0 0",
              "s3fs /mnt/bucket fuse.s3fs rw 0 0", "tmpfs /dev/shm tmpfs rw 0 0",
              "srv:/y /mnt/nfs/local\\040disk ext4 rw 0 0", "short line"]
    assert filesystem_type("/work/repo", mounts) == "ext4"
    assert filesystem_type("/mnt/nfs/run1", mounts) == "nfs4"
    assert filesystem_type("/mnt/nfs", mounts) == "nfs4"
    assert filesystem_type("/mnt/nfsx", mounts) == "ext4"  # not a prefix by name alone
    assert filesystem_type("/mnt/nfs/local disk/a", mounts) == "ext4"
    assert filesystem_type("/mnt/bucket/ckpt", mounts) == "fuse.s3fs"
    # what each was mounted from (the disk a file's writes go to: dckpt.direct)
    assert mount_source("/work/repo", mounts) == "/dev/vda"
    assert mount_source("/mnt/nfs/local disk/a", mounts) == "srv:/y"
    assert mount_source("/dev/shm/x", mounts) == "tmpfs"
    assert mount_source("/anything", ["short line"]) == ""
    assert not watched_filesystem("/dev/shm")  # tmpfs
    watched_filesystem.cache_clear()



def test_a_long_load_says_how_far_it_got_and_a_short_one_says_nothing(tmp_path, monkeypatch,
                                                                       caplog):
    """A restore of hundreds of GB from an object store takes minutes, and said nothing
    before it ended."""
    url = str(tmp_path)
    dckpt.save(STATE, url, step=1, config=dckpt.SaveConfig(block_size_bytes=64 << 10))
    out = {k: torch.zeros_like(v) for k, v in STATE.items()}
    caplog.set_level("DEBUG", logger="dckpt.watchdog")
    dckpt.load(out, url)
    assert not [r for r in caplog.records if r.name == "dckpt.watchdog"]  # under PROGRESS_S
    read = Fetcher._read

    def slow(self, *args, **kwargs):
        time.sleep(0.05)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Fetcher, "_read", slow)
    monkeypatch.setattr("dckpt.watchdog.PROGRESS_S", 0.1)
    config = dckpt.LoadConfig(reader_threads=1, read_request_bytes=64 << 10)
    out = {k: torch.zeros_like(v) for k, v in STATE.items()}
    assert dckpt.load(out, url, config=config).step == 1
    assert all(torch.equal(out[k], STATE[k]) for k in STATE)
    said = [r.getMessage() for r in caplog.records if r.name == "dckpt.watchdog"]
    assert said and all(r.levelname == "INFO" for r in caplog.records
                        if r.name == "dckpt.watchdog")
    assert all(m.startswith(f"rank 0: load of step 1 from {url}: ") for m in said), said
    mib = [float(m.split(": ")[-1].split(" MiB read in ")[0]) for m in said]
    assert mib == sorted(mib) and 0 < mib[-1] <= 1.21e6 / 2**20, said  # 1.2 MB, counted once


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_long_save_says_how_far_it_got(tmp_path, monkeypatch, caplog, mode):
    url = f"faultyfile://{tmp_path}"
    config = dckpt.SaveConfig(block_size_bytes=64 << 10, writer_threads=1)
    caplog.set_level("INFO", logger="dckpt.watchdog")
    monkeypatch.setattr("dckpt.watchdog.PROGRESS_S", 0.1)
    monkeypatch.setattr("dckpt.segments.SegmentOut.WRITE_BYTES", 64 << 10)
    arm("slow", delay_s=0.03)  # each write: the segment's 1.2 MB go in 19 pieces
    try:
        if mode == "sync":
            dckpt.save(STATE, url, step=1, config=config)
        else:
            dckpt.async_save(STATE, url, step=1, config=config).wait(timeout=60)
    finally:
        disarm()
    said = [r.getMessage() for r in caplog.records if r.name == "dckpt.watchdog"]
    assert said and all(m.startswith(f"rank 0: save of step 1 to {url}: ") for m in said), said
    mib = [float(m.split(": ")[-1].split(" MiB written in ")[0]) for m in said]
    assert mib == sorted(mib) and 0 < mib[-1] <= 1.21e6 / 2**20, said
    out = {k: torch.zeros_like(v) for k, v in STATE.items()}
    assert dckpt.load(out, str(tmp_path)).step == 1
    assert all(torch.equal(out[k], STATE[k]) for k in STATE)
