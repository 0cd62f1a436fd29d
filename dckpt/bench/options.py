"""``dckpt bench``'s arguments, apart from the measuring code: ``dckpt --help`` imports no
torch."""

from __future__ import annotations

import argparse

from dckpt.config import SaveConfig

__all__ = ["add_arguments", "METHODS", "LAYOUTS", "WORKLOADS", "DTYPES"]

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
