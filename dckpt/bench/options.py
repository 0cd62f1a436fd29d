"""``dckpt bench``'s arguments and their checks, apart from the measuring code: ``dckpt --help``
and a refused run import no torch."""

from __future__ import annotations

import argparse
import os
import secrets

from dckpt.config import SaveConfig
from dckpt.errors import ArgumentError
from dckpt.storage import Store

__all__ = ["add_arguments", "check", "reach", "METHODS", "LAYOUTS", "WORKLOADS", "DTYPES"]

METHODS = ("raw", "memcpy", "dckpt", "DCP", "torch-checkpointing")
LAYOUTS = ("sharded", "dense")
WORKLOADS = ("full", "unchanged90", "sparse-rows")
DTYPES = ("fp32", "bf16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", help="where to write: a path, file://, s3://bucket/prefix, ... "
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
    if not (args.gib_per_rank > 0 and args.tensor_mib > 0):
        raise ArgumentError("--gib-per-rank and --tensor-mib must be positive")
    return names


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
