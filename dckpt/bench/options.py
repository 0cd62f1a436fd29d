"""``dckpt bench``'s arguments and their checks, apart from the measuring code: ``dckpt --help``
and a refused run import no torch."""

from __future__ import annotations

import argparse
import math
import os
import secrets
import shutil
import tempfile

from dckpt.cli_format import path_argument
from dckpt.config import MAX_THREADS, SaveConfig
from dckpt.errors import ArgumentError
from dckpt.prefetch import available_memory
from dckpt.storage import Store

__all__ = ["add_arguments", "check", "out_problem", "reach", "room", "METHODS", "LAYOUTS", "WORKLOADS",
           "DTYPES"]

METHODS = ("raw", "memcpy", "dckpt", "DCP", "torch-checkpointing")
LAYOUTS = ("sharded", "dense")
WORKLOADS = ("full", "unchanged90", "sparse-rows")
DTYPES = ("fp32", "bf16")
STORING = ("raw", "dckpt", "DCP", "torch-checkpointing")
"""The methods that hold a copy of the state in host memory (staging, an aligned buffer) and
a checkpoint on the storage."""
GIB = 1 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", type=path_argument,
                   help="where to write: a path, file://, s3://bucket/prefix, ... "
                   "(a new folder under it, removed at the end)")
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="fsspec storage option, e.g. -o endpoint_url=http://127.0.0.1:9000 "
                        "(S3 also reads the AWS_* variables)")
    p.add_argument("--gib-per-rank", type=float, default=1.0,
                   help="GiB of tensors each rank holds (default 1)")
    p.add_argument("--tensor-mib", type=float, default=64.0,
                   help="MiB per tensor (default 64)")
    p.add_argument("--layout", choices=LAYOUTS, default="sharded",
                   help="sharded: DTensor shards, FSDP2's layout (default); dense: the same "
                        "plain tensors on every rank, DDP's layout")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--workload", choices=WORKLOADS, default="full",
                   help="what changes before each save: full (every value, default), "
                        "unchanged90 (one tensor in ten), sparse-rows (1%% of the rows)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the state lives (auto: this rank's GPU when there is one)")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (default: all that "
                        "run here)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed runs of each phase; figures are medians (default 3)")
    p.add_argument("--threads", type=int, default=SaveConfig().writer_threads,
                   help="writer threads of every method that has them (default: dckpt's)")
    p.add_argument("--out", default=".", metavar="DIR",
                   help="where results.jsonl and summary.png go (default: this folder)")


def check(args: argparse.Namespace) -> list[str]:
    """The methods asked for; ArgumentError for arguments out of range."""
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise ArgumentError(f"--methods {args.methods!r}: expected names from {METHODS}")
    if args.repeats < 1 or args.threads < 1:
        raise ArgumentError("--repeats and --threads must be at least 1")
    if args.threads > MAX_THREADS:  # found by the first save, it cost the run
        raise ArgumentError(f"--threads must be at most {MAX_THREADS}, got {args.threads}")
    if not (0 < args.gib_per_rank < math.inf and 0 < args.tensor_mib < math.inf):
        raise ArgumentError("--gib-per-rank and --tensor-mib must be positive and finite")
    problem = out_problem(args.out)
    if problem:  # found at the end, it would cost the run's measurements
        raise ArgumentError(f"--out {args.out}: {problem}")
    return names


OUTPUTS = ("results.jsonl", "summary.png")


def out_problem(out: str) -> str | None:
    """Why the results cannot be written into the folder ``out`` (made at the end if it
    does not exist), or None."""
    folder = os.path.abspath(out)
    for name in OUTPUTS:
        path = os.path.join(folder, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            return f"{path} is there and is not a file; the results would be written over it"
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder; name a folder for the results"
    try:  # a file made and removed: the permission bits do not tell (root, read-only mounts)
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".dckpt-bench-out-"):
            pass
    except OSError as e:
        return (f"cannot write in {existing} ({e.strerror or e}); name a folder this user "
                "may write to")
    return None


def reach(url: str, options: dict | None) -> None:
    """Refuse a URL, storage options or credentials the storage does not take, before any
    rank set-up: a listing of the URL's folder, and a small object written and removed."""
    store = Store(url, options)
    try:
        exists = store.fs.exists(store.root)
    except Exception as e:
        raise ArgumentError(f"{url}: the storage does not answer a listing with storage "
                            f"options {sorted(options or {})}: {type(e).__name__}: "
                            f"{str(e)[:300]}") from e
    if exists and store.local and not store.fs.isdir(store.root):
        raise ArgumentError(f"{url} is a file; dckpt bench needs a folder to write under "
                            "(it creates one, and removes it at the end)")
    probe = f".dckpt-bench-probe-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        with store.open_write(probe) as f:
            f.write(b"probe")
        store.delete(probe)
        if not exists:
            store.remove_folder("")  # leave no folder behind that the run did not need
    except Exception as e:
        raise ArgumentError(f"{url}: cannot write there ({type(e).__name__}: {str(e)[:300]}); "
                            "point dckpt bench at a folder or prefix it may write under") from e


def room(args: argparse.Namespace, names: list[str], *, local_world: int, on_gpu: bool,
         local_root: str | None) -> str | None:
    """Why this node cannot hold the run (host memory, or the local disk at ``local_root``),
    or None. A run holds, per rank, the state and the twin it restores into (on the GPU when
    there is one) and one host copy per storing method (``STORING``); measured: 6.2x the
    state with every method on the CPU. The storage holds one checkpoint per storing method,
    two of one method's while its older one goes. Refused before anything is allocated: a
    run the node cannot hold would be killed for memory (with whatever else runs there), or
    fill a disk others write to."""
    state = args.gib_per_rank * GIB
    storing = sum(n in names for n in STORING)
    copies = (0 if on_gpu else 2) + storing + (1 if on_gpu and "memcpy" in names else 0)
    need = local_world * (state * copies + GIB // 2)  # and torch itself
    have = available_memory()
    if have is not None and need > have:
        return (f"--gib-per-rank {args.gib_per_rank:g} needs about {need / GIB:.1f} GiB of "
                f"host memory on this node ({local_world} rank(s) x {copies} copies of the "
                f"state, for the methods {','.join(names)}); {have / GIB:.1f} GiB is available. "
                "Pass a smaller --gib-per-rank, or fewer --methods")
    if local_root is None or not storing:
        return None
    per_method = state * (local_world if args.layout == "sharded" else 1)
    need = per_method * (storing + 1)
    free = shutil.disk_usage(_existing(local_root)).free
    if need > free:
        return (f"--gib-per-rank {args.gib_per_rank:g} needs about {need / GIB:.1f} GiB free "
                f"at {local_root} (a checkpoint of {per_method / GIB:.1f} GiB from this node for "
                f"each of {storing} method(s), and one more while a method replaces its own); "
                f"{free / GIB:.1f} GiB is free. Pass a smaller --gib-per-rank, or fewer --methods")
    return None


def _existing(path: str) -> str:
    """``path``, or its nearest folder that exists (the run's folder is made later)."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path
