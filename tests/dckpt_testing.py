"""Test support shared by unit and multiprocess tests: real gloo ranks, fault-injecting
filesystems and a moto S3 server on 127.0.0.1."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import fsspec
from fsspec.implementations.local import LocalFileSystem

# ------------------------------------------------------------------ forged manifests


def reseal(doc: dict) -> bytes:
    """A manifest document's bytes with a checksum that matches them: a forged manifest, or
    damage done before the checksum was taken. The checks behind the checksum must refuse
    it on their own."""
    import json

    from dckpt.manifest import seal

    return seal(json.dumps({k: v for k, v in doc.items() if k != "checksum"}).encode())


def as_rows(doc: dict) -> dict:
    """A third version's manifest document as the second version writes it: each item's
    block rows in JSON (``[segment, offset, length, raw_length, digest, codec]``), for
    tests that forge rows one field at a time. A reader still takes the second version."""
    from dckpt.block_table import BlockTable

    if doc.get("version") != 3:
        return doc
    import base64

    table = BlockTable(base64.b64decode(doc["block_table"]), list(range(len(doc["segments"]))))
    out = {k: v for k, v in doc.items() if k != "block_table"}
    out["version"] = 2
    out["items"] = {}
    for fqn, item in doc["items"].items():
        item = dict(item)
        datas = [item]
        if "chunks" in item:
            item["chunks"] = datas = [dict(c) for c in item["chunks"]]
        for d in datas:
            d["blocks"] = [list(r) for r in table.refs(*d["blocks"])]
        out["items"][fqn] = item
    return out


# ------------------------------------------------------------------ fault injection

FAULT: dict = {}
"""This process's armed fault: kind ('enospc', 'eio', 'kill', 'slow'), after_bytes,
delay_s. Set by arm()."""


def arm(kind: str, after_bytes: int = 0, delay_s: float = 0.0, only: str = "") -> None:
    """Arm a fault for this process's faultyfile:// and faultys3:// writes: past
    ``after_bytes`` the write fails ('enospc', 'eio'), the process dies ('kill') or stops
    until a SIGCONT ('stop') or every write blocks ``delay_s`` first ('hang'); 'slow' makes
    every write sleep ``delay_s`` first and fail nothing; 'gate' makes every write wait until
    open_gate(). ``only``: just the writes of files whose path holds it."""
    FAULT.clear()
    FAULT.update(kind=kind, after_bytes=after_bytes, written=0, delay_s=delay_s, only=only,
                 gate=threading.Event())


def open_gate() -> None:
    """Let the writes an armed 'gate' holds go on."""
    FAULT["gate"].set()


def disarm() -> None:
    FAULT.clear()


class _FaultyFile:
    def __init__(self, f, path: str) -> None:
        self._f = f
        self._path = path

    def write(self, data) -> int:
        if FAULT and FAULT["only"] not in self._path:
            return self._f.write(data)
        if FAULT and FAULT["kind"] == "slow":
            time.sleep(FAULT["delay_s"])
            return self._f.write(data)
        if FAULT and FAULT["kind"] == "gate":
            FAULT["gate"].wait()
            return self._f.write(data)
        if FAULT and FAULT["written"] + len(data) > FAULT["after_bytes"]:
            room = FAULT["after_bytes"] - FAULT["written"]
            if room > 0:
                self._f.write(memoryview(data)[:room])
                self._f.flush()
            FAULT["written"] = FAULT["after_bytes"]
            if FAULT["kind"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if FAULT["kind"] == "hang":  # every write from here on blocks delay_s first
                FAULT["kind"] = "slow"
                time.sleep(FAULT["delay_s"])
                return self._f.write(data)
            if FAULT["kind"] == "stop":  # frozen, alive, its sockets open; goes on at SIGCONT
                FAULT.clear()
                os.kill(os.getpid(), signal.SIGSTOP)
                return self._f.write(data)
            if FAULT["kind"] == "enospc":
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            raise OSError(errno.EIO, "SlowDown: service unavailable (injected)")
        if FAULT:
            FAULT["written"] += len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __setattr__(self, name, value):  # the file's own attributes (closed), as unwrapped
        if name in ("_f", "_path"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._f, name, value)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class FaultyLocalFileSystem(LocalFileSystem):
    """The local filesystem, whose writes fail (or kill the process) once armed."""

    protocol = ("faultyfile",)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faultyfile://"):
            path = path[len("faultyfile://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        return _FaultyFile(f, str(path)) if "w" in mode else f


fsspec.register_implementation("faultyfile", FaultyLocalFileSystem, clobber=True)


def faulty_s3_class():
    """s3fs, whose uploads fail once armed (a server error mid-save)."""
    import s3fs

    class FaultyS3FileSystem(s3fs.S3FileSystem):
        protocol = ("faultys3",)
        cachable = False

        def _open(self, path, mode="rb", **kwargs):
            f = super()._open(path, mode, **kwargs)
            return _FaultyFile(f, str(path)) if "w" in mode else f

    return FaultyS3FileSystem


def flip_stored_byte(folder: str, step: int, fqn: str, at: int = 0, mask: int = 0x01) -> str:
    """Flip the bits ``mask`` of byte ``at`` of ``fqn``'s first stored block in checkpoint
    ``step`` of the repository at ``folder``, in place; returns the object's path."""
    import dckpt

    entry = dckpt.inspect(folder, step=step).items[fqn]
    data = entry.chunks[0].data if hasattr(entry, "chunks") else entry.data  # a tensor, a value
    ref = data.blocks[0]
    path = os.path.join(folder, ref.segment)
    with open(path, "r+b") as f:
        f.seek(ref.offset + at)
        byte = f.read(1)[0]
        f.seek(ref.offset + at)
        f.write(bytes([byte ^ mask]))
    return path


def leftovers(folder: str) -> list[str]:
    """What a failed save left in the local repository at ``folder``: objects no committed
    checkpoint references, and temp files; [] when it left nothing."""
    import dckpt

    garbage = list(dckpt.gc(folder, dry_run=True, min_age_s=0).deleted)
    return sorted(garbage + [os.path.relpath(os.path.join(d, n), folder)
                             for d, _, names in os.walk(folder)
                             for n in names if n.startswith(".tmp-")])


# ------------------------------------------------------------------ real gloo ranks


@dataclass
class Outcome:
    rank: int
    exitcode: int | None
    value: object = None
    error_type: str | None = None
    error: str | None = None
    reported: bool = False  # it put a result (or an error) on the queue

    @property
    def killed(self) -> bool:
        return self.exitcode == -signal.SIGKILL


INIT_FAILED = "InitFailed"
"""A rank's error type where its gloo group could not be made: rarely, on a loaded machine,
"Gloo connectFullMesh failed ... Connection closed by peer" (tests on other workers make
groups on 127.0.0.1 at once). No code of the test ran; run_ranks starts the ranks again."""


def _entry(fn, rank, world_size, init_file, queue, args, timeout_s):
    import torch.distributed as dist

    sys.path[:0] = [p for p in os.environ.get("DCKPT_TEST_PATH", "").split(os.pathsep) if p]
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout_s))
    except RuntimeError as e:  # the harness's group, before any of the test's code ran
        queue.put((rank, None, INIT_FAILED, "".join(traceback.format_exception(e))))
        queue.close()
        queue.join_thread()
        os._exit(3)
    try:
        result = (rank, fn(rank, world_size, *args), None, None)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        result = (rank, None, type(e).__name__, "".join(traceback.format_exception(e)))
    queue.put(result)
    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001
        pass
    # The result is what the test checks: flush it, then leave without the interpreter's
    # teardown, where gloo's C++ threads can rarely abort a process that did all its work
    # ("terminate called without an active exception", SIGABRT).
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _preloaded() -> list[str]:
    """What each rank's forkserver imports: torch, DCP, s3fs and every module of dckpt
    (its integrations with the frameworks aside, which import those)."""
    import pkgutil

    import dckpt

    own = [f"dckpt.{m.name}" for m in pkgutil.iter_modules(dckpt.__path__)
           if not m.ispkg and m.name != "__main__"]
    return ["torch", "torch.distributed", "torch.distributed.checkpoint", "s3fs",
            "dckpt", *own, "dckpt_testing"]


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0,
              allow_failures: bool = False, daemon: bool = True) -> list[Outcome]:
    """Run ``fn(rank, world_size, *args)`` on real gloo ranks (spawned processes).

    Returns one Outcome per rank. Unless ``allow_failures``, a rank that raised or died
    fails the test with that rank's traceback. ``daemon=False``: ranks that start processes
    of their own (a daemon may not).
    """
    for attempt in range(3):
        outcomes = _run_ranks_once(fn, world_size, args, timeout_s, daemon)
        if not any(o.error_type == INIT_FAILED for o in outcomes) or attempt == 2:
            break
        print(f"run_ranks: a gloo group could not be made (attempt {attempt + 1}); "
              "starting the ranks again", file=sys.stderr)
    if not allow_failures:
        for o in outcomes:
            if o.error is not None:
                raise AssertionError(f"rank {o.rank} raised:\n{o.error}")
            if o.exitcode != 0:
                returned = "returned its result, then" if o.reported else "gave no result and"
                raise AssertionError(f"rank {o.rank} {returned} exited with {o.exitcode}")
    return outcomes


def _run_ranks_once(fn, world_size: int, args, timeout_s: float, daemon: bool) -> list[Outcome]:
    import multiprocessing as mp

    # forkserver: one server per test process imports torch, DCP and dckpt's modules once,
    # and each rank is a fork of it (a spawned rank imported them anew: about 4 s of CPU
    # each; a fork of a server that imported dckpt's package alone still imported DCP and
    # the modules behind it in every rank: 1.4 s of each 2-rank call's 1.5 s)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_preloaded())
    queue = ctx.Queue()
    init_file = tempfile.mktemp(prefix="dckpt-pg-")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, init_file, queue, args,
                                              timeout_s), daemon=daemon)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, tuple] = {}
    deadline = time.monotonic() + timeout_s
    while len(results) < world_size and time.monotonic() < deadline:
        try:
            item = queue.get(timeout=0.2)
            results[item[0]] = item
            if item[2] == INIT_FAILED:  # the others cannot make the group either
                break
        except Exception:  # noqa: BLE001 - queue.Empty
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
    init_failed = any(r[2] == INIT_FAILED for r in results.values())
    for p in procs:
        p.join(timeout=5.0 if init_failed else max(1.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
    if os.path.exists(init_file):
        os.unlink(init_file)
    outcomes = []
    for r, p in enumerate(procs):
        _, value, etype, err = results.get(r, (r, None, None, None))
        outcomes.append(Outcome(r, p.exitcode, value, etype, err, reported=r in results))
    return outcomes


# ------------------------------------------------------------------ moto S3 server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto in server mode, a separate process speaking S3 on 127.0.0.1."""

    def __init__(self, *, check_credentials: bool = False) -> None:
        self.port = free_port()
        env = dict(os.environ, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        if check_credentials:  # moto then refuses keys its IAM does not hold
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start within 30 s")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def options(self) -> dict:
        return {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing",
                "client_kwargs": {"region_name": "us-east-1"}}

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1"
                     ).create_bucket(Bucket=name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


_METHODS = (b"GET", b"PUT", b"POST", b"HEAD", b"DELETE")


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 in front of an S3 server that breaks connections: each new
    connection is reset, with probability ``p``, after a random number of bytes (below
    ``max_cut``) in one direction: mid-response, or before the next request past that many
    bytes (S3 never stores a partial upload; moto's server stores what it got, an empty
    object for a cut after the headers, which a create-only PUT then finds); a request whose
    first line
    holds ``truncate`` gets its response cut one byte into the body, then a reset (a
    response cut short: aiohttp's ClientPayloadError); one whose first line holds ``drop``
    is served, and its answer lost to a reset. Real sockets, real resets."""

    def __init__(self, upstream_port: int, *, p: float = 0.0, max_cut: int = 4000,
                 truncate: bytes | None = None, drop: bytes | None = None,
                 seed: int = 0) -> None:
        import random
        import threading

        self.upstream_port = upstream_port
        self.p = p
        self.max_cut = max_cut
        self.truncate = truncate
        self.drop = drop
        self.resets = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(128)
        self.port = self._srv.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def options(self) -> dict:
        return {"endpoint_url": f"http://127.0.0.1:{self.port}", "key": "testing",
                "secret": "testing", "client_kwargs": {"region_name": "us-east-1"}}

    def close(self) -> None:
        self._srv.close()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                client, _ = self._srv.accept()
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                return
            with self._lock:
                cut = (self._rng.randrange(self.max_cut) if self._rng.random() < self.p
                       else None)
                downward = self._rng.random() < 0.5
            conn = {"socks": (client, upstream), "dead": False, "keep": None}
            threading.Thread(target=self._pump, args=(client, upstream, conn, None if downward
                                                      else cut, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, conn, cut if downward
                                                      else None, False), daemon=True).start()

    def _reset(self, conn: dict) -> None:
        import struct

        with self._lock:
            if conn["dead"]:
                return
            conn["dead"] = True
            self.resets += 1
        for s in conn["socks"]:
            try:  # linger 0: close sends a reset; shutdown wakes the other pump's recv
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: dict, cut: int | None,
              request: bool) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                if request:
                    line = data.split(b"\r\n", 1)[0]
                    if self.truncate and self.truncate in line:
                        conn["keep"] = 1  # bytes of the response's body
                    if self.drop and self.drop in line:
                        conn["keep"] = -1  # none of the response
                elif (conn["keep"] is not None and b"\r\n\r\n" in data
                      and not data.startswith(b"HTTP/1.1 100")):  # not "100 Continue"
                    keep = conn["keep"]
                    dst.sendall(data[:data.index(b"\r\n\r\n") + 4 + keep] if keep >= 0 else b"")
                    return self._reset(conn)
                if cut is not None and sent + len(data) > cut:
                    if not request:
                        dst.sendall(data[:cut - sent])
                        return self._reset(conn)
                    if data.split(b" ", 1)[0] in _METHODS:  # before a request, not in one
                        return self._reset(conn)
                dst.sendall(data)
                sent += len(data)
        except OSError:
            self._reset(conn)
