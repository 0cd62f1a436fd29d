"""``dckpt bench``'s run: set up the ranks, measure each method in turn, report, clean up.

Everything a run writes goes under one new folder, ``URL/dckpt-bench-<time>-<id>``, and that
folder is removed at the end, after an error, and on Ctrl-C (SIGINT) or SIGTERM: the
engines' writer processes are stopped first, so none writes after the removal.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import dckpt
from dckpt.bench.methods import Method, make_methods, memcpy_seconds
from dckpt.bench.options import room
from dckpt.bench.report import Report, Result
from dckpt.bench.workload import Workload
from dckpt.errors import ArgumentError
from dckpt.storage import Store
from dckpt.writer import write_window_bytes

__all__ = ["main"]


class Run:
    """One rank's part of a bench run."""

    def __init__(self, args: argparse.Namespace, options: dict | None) -> None:
        self.args, self.options = args, options
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.store = Store(args.url, options)
        self.base = self._base_url(args.url.rstrip("/"))
        self.steps = 0
        self.live: dict[str, Method] = {}
        self.newest: dict[str, int] = {}
        self.done = 0
        self.total = 0

    def _base_url(self, url: str) -> str:
        name = [f"dckpt-bench-{dt.datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"]
        dist.broadcast_object_list(name, src=0)
        return f"{url}/{name[0]}"

    # ------------------------------------------------------------------ output

    def say(self, text: str) -> None:
        if self.rank == 0:
            print(f"dckpt bench: {text}", file=sys.stderr, flush=True)

    def progress(self, what: str, figure: str) -> None:
        self.done += 1
        self.say(f"[{self.done:>2}/{self.total}] {what:<34} {figure}")

    # ------------------------------------------------------------------ timing

    def timed(self, fn: Callable[[], object]) -> float:
        """Seconds from a barrier before ``fn`` on every rank to a barrier after it."""
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def slowest(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([0 if flag else 1])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) == 0

    def evict(self, url: str) -> None:
        """Drop the local page cache of a method's files (one rank per node does it)."""
        if self.store.local and self.local_rank == 0:
            root = url[len("file://"):] if url.startswith("file://") else url
            for folder, _, files in os.walk(root):
                for name in files:
                    fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                    try:
                        os.fsync(fd)
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    finally:
                        os.close(fd)
        dist.barrier()

    def next_step(self) -> int:
        self.steps += 1
        return self.steps

    # ------------------------------------------------------------------ phases

    def measure(self, methods: dict[str, Method], w: Workload, report: Report) -> None:
        """Each phase in rounds: one save (restore, async save) of every method per round,
        so that the storage's drift over the run touches every method alike. A method that
        fails is reported and leaves the run."""
        self.live, self.newest = dict(methods), {}
        if "dckpt" in self.live and w.kind != "full":  # the base of the differential saves
            w.change(self.next_step())
            self.live["dckpt"].save(self.steps)
            self.newest["dckpt"] = self.steps
        for phase in ("save", "restore", "async"):
            results = getattr(self, f"_{phase}s")(w, report)
            for r in results:
                if r.seconds and r.method in self.live:
                    report.add(r)

    def _each(self, phase: str, report: Report, round_: Callable[[Method], None]) -> None:
        for name, m in list(self.live.items()):
            if phase not in m.phases:
                continue
            try:
                round_(m)
            except Exception as e:
                report.errors.append({"method": name, "phase": phase,
                                      "error": f"{type(e).__name__}: {str(e)[:300]}"})
                self.say(f"{name} {phase} failed: {type(e).__name__}: {e}")
                self.live.pop(name)

    def _saves(self, w: Workload, report: Report) -> list[Result]:
        reps = self.args.repeats
        saves = {n: Result(n, "save", bytes=w.checkpoint_bytes) for n in self.live}
        for i in range(reps):
            w.change(step := self.next_step())

            def save(m: Method) -> None:
                m.before_save()
                r = saves[m.name]
                r.seconds.append(self.timed(lambda: m.save(step)))
                self.progress(f"{m.name} save {i + 1}/{reps}",
                              f"{r.bytes / r.seconds[-1] / 1e9:.3f} GB/s")
                self.drop(m, step)
            self._each("save", report, save)
        return list(saves.values())

    def _restores(self, w: Workload, report: Report) -> list[Result]:
        reps = self.args.repeats
        nbytes = w.checkpoint_bytes * (1 if w.layout == "sharded" else self.world)
        restores = {n: Result(n, "restore", bytes=nbytes, equal=True) for n in self.live}
        for i in range(reps):
            def restore(m: Method) -> None:
                r = restores[m.name]
                self.evict(m.url)
                w.scramble()
                r.seconds.append(self.timed(lambda: m.restore(self.newest[m.name])))
                r.equal = r.equal and self.all_true(w.equal(m.keys, step=m.name != "raw"))
                self.progress(f"{m.name} cold restore {i + 1}/{reps}",
                              f"{r.bytes / r.seconds[-1] / 1e9:.3f} GB/s"
                              + ("" if r.equal else "  VALUES DIFFER"))
            self._each("restore", report, restore)
        return list(restores.values())

    def _asyncs(self, w: Workload, report: Report) -> list[Result]:
        reps = self.args.repeats
        pauses = {n: Result(n, "pause") for n in self.live}
        commits = {n: Result(n, "commit", bytes=w.checkpoint_bytes) for n in self.live}
        for i in range(reps + 1):  # the first sets up (processes, staging): not in medians
            w.change(step := self.next_step())

            def async_save(m: Method) -> None:
                dist.barrier()
                t0 = time.perf_counter()
                wait = m.start(step)
                p = time.perf_counter() - t0
                wait()
                p, c = self.slowest(p, time.perf_counter() - t0)
                if i == 0:
                    pauses[m.name].first_s, commits[m.name].first_s = p, c
                else:
                    pauses[m.name].seconds.append(p)
                    commits[m.name].seconds.append(c)
                self.progress(f"{m.name} async {'set-up' if i == 0 else f'{i}/{reps}'}",
                              f"pause {p:.3f} s, commit {w.checkpoint_bytes / c / 1e9:.3f} GB/s")
                self.drop(m, step)
            self._each("async", report, async_save)
        return list(pauses.values()) + list(commits.values())

    def drop(self, m: Method, step: int) -> None:
        """``step`` is ``m``'s newest checkpoint; its older one goes: the storage holds one
        checkpoint per method at a time."""
        older = self.newest.get(m.name)
        self.newest[m.name] = step
        if older is not None:
            dist.barrier()
            if (self.local_rank if self.store.local else self.rank) == 0:
                m.drop(older)
            dist.barrier()

    def count(self, methods: dict[str, Method]) -> int:
        reps = self.args.repeats
        n = sum(reps * (("save" in m.phases) + ("restore" in m.phases))
                + (reps + 1) * ("async" in m.phases) for m in methods.values())
        return n + ("memcpy" in self.args.methods.split(","))

    # ------------------------------------------------------------------ clean-up

    def remove_all(self) -> None:
        """Remove the run's folder (each node's first rank for local files, rank 0 for an
        object store), twice: a writer stopped mid-write may still close a file."""
        if (self.local_rank if self.store.local else self.rank) != 0:
            return
        for attempt in range(2):
            try:
                path = Store(self.base, self.options)
                if path.fs.exists(path.root):
                    path.fs.rm(path.root, recursive=True)
            except FileNotFoundError:
                pass
            if attempt == 0:
                time.sleep(0.5)


def stop_children() -> None:
    """Stop the writer processes of the engines (DCP's checkpointer, torch-checkpointing's
    writer) of this process: after an interruption they would go on writing."""
    for child in multiprocessing.active_children():
        child.kill()
        child.join(timeout=10)


def init_ranks(device: str) -> str:
    """Join torchrun's ranks, or make a group of one; returns the state's device. ``main``
    destroys the group it made: a gloo group left to the interpreter's exit sometimes
    aborted the process there ("terminate called without an active exception"), after a
    refusal had been printed, with SIGABRT in place of its exit status."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" not in os.environ:  # one process: a group of one, as torchrun would set it up
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if device == "cuda" else "gloo")
    return device


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def refuse_what_the_nodes_cannot_hold(args: argparse.Namespace, options: dict | None,
                                      names: list[str], device: str) -> None:
    """ArgumentError on every rank when any node lacks the memory or the local disk space
    for the run (``options.room``), the first such node's reason."""
    store = Store(args.url, options)
    problem = room(args, names, local_world=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
                   on_gpu=device == "cuda", local_root=store.root if store.local else None)
    problems: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    first = next((p for p in problems if p), None)
    if first is not None:
        raise ArgumentError(first)


def main(args: argparse.Namespace, options: dict | None, names: list[str]) -> int:
    """The run, after ``options.check`` and ``options.reach`` (the command calls them before
    torch's import, so that a refusal answers at once) gave the ``names`` of the methods."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ArgumentError("--device cuda: no GPU is visible here")
    made = not dist.is_initialized()
    device = init_ranks(args.device)
    try:
        return _run(args, options, names, device)
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, options: dict | None, names: list[str], device: str) -> int:
    refuse_what_the_nodes_cannot_hold(args, options, names, device)
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    run = Run(args, options)
    report = Report(run_facts(args, run, device, options))
    methods: dict[str, Method] = {}
    try:
        from torch.distributed.device_mesh import init_device_mesh

        run.say(f"{run.world} rank(s) x {args.gib_per_rank} GiB ({args.layout}, {args.dtype}, "
                f"{args.workload}) on {device}, writing under {run.base}")
        w = Workload.build(gib_per_rank=args.gib_per_rank, tensor_mib=args.tensor_mib,
                           layout=args.layout, dtype=args.dtype, kind=args.workload,
                           device=device, mesh=init_device_mesh(device, (run.world,)))
        methods, missing = make_methods(names, w, run.base, options, args.threads)
        report.notes.update(missing)
        run.total = run.count(methods)
        if "memcpy" in names:
            copy_s = run.slowest(memcpy_seconds(w))[0]
            report.add(Result("memcpy", "pause", seconds=[copy_s]))
            run.progress("memcpy (the pause's limit)", f"{copy_s:.3f} s")
        run.measure(methods, w, report)
        code = 1 if report.errors else 0
        for m in methods.values():
            m.close()
        dist.barrier()
    except BaseException as e:  # Ctrl-C, SIGTERM, or a failure outside any one method
        interrupted = isinstance(e, KeyboardInterrupt)
        run.say("interrupted: removing what the run wrote" if interrupted else
                f"failed ({type(e).__name__}): removing what the run wrote")
        stop_children()
        for m in methods.values():
            try:
                m.close()
            except Exception:  # closing after an interruption is best effort
                pass
        run.remove_all()
        if interrupted:
            return 130
        raise
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run.remove_all()
    if run.rank == 0:
        print(report.table())  # first: a failed write below leaves the figures on screen
        try:
            print(f"\nwrote {', '.join(report.write(args.out))}")
        except OSError as e:  # checked at the start; changed since
            run.say(f"the results could not be written to {args.out}: {e}")
            code = 2
    dist.barrier()
    return code


def run_facts(args: argparse.Namespace, run: Run, device: str, options: dict | None) -> dict:
    scheme = args.url.split("://", 1)[0] if "://" in args.url else "file"
    return {"url": args.url, "storage_option_keys": sorted(options or {}),
            "storage": "local files" if run.store.local else scheme,
            "world_size": run.world, "nodes": run.world // int(os.environ.get(
                "LOCAL_WORLD_SIZE", str(run.world)) or 1),
            "gib_per_rank": args.gib_per_rank, "tensor_mib": args.tensor_mib,
            "layout": args.layout, "dtype": args.dtype, "workload": args.workload,
            "device": device, "repeats": args.repeats, "threads": args.threads,
            "cold_reads": ("each restore after the files' pages are dropped from the page "
                           "cache (posix_fadvise)" if run.store.local else
                           "from the object store: no local cache to drop"),
            "sync_saves": sync_saves(run.store),
            "torch": torch.__version__, "dckpt": dckpt.__version__,
            "host": socket.gethostname(), "time": dt.datetime.now(dt.timezone.utc).isoformat()}


def sync_saves(store: Store) -> str:
    """How dckpt's sync saves write to this storage (docs/operations.md, Save speed)."""
    if not store.local:
        return "to the object store"
    if not store.direct_capable:
        return "buffered, then fsync'd"
    window = write_window_bytes(dckpt.SaveConfig(), store.root)
    if window:
        return (f"O_DIRECT, copied through {window >> 20} MiB windows on huge pages (this "
                "disk takes scattered pages slowly)")
    return "O_DIRECT, straight from the tensors' memory"
