"""Replicated state: every rank reads it, or one rank reads each tensor and broadcasts it.

    torchrun --standalone --nproc-per-node=2 benchmarks/bench_replicated.py --gib 0.5
    torchrun --standalone --nproc-per-node=2 benchmarks/bench_replicated.py --layout sharded

``--layout sharded`` measures the usual FSDP case instead: ``--gib`` GiB per rank of row-
sharded DTensors, each rank reading only its shards (dckpt against DCP; nothing to share).

A DDP-like state (plain tensors, the same on every rank: ``--gib`` GiB in 64 MiB tensors) is
saved once to the local disk and once to an S3 protocol server on 127.0.0.1 (moto, started
by rank 0), then loaded back, interleaved and repeated, with
``LoadConfig(replicated="read")`` (every rank reads every byte) and ``"broadcast"`` (each
tensor read by one rank, then broadcast over the gloo checkpoint group), and with DCP (every
rank reads). Local loads start from a cold page cache. In the same run: a gloo broadcast of
the same bytes alone (the sharing's limit). Seconds from a barrier to a barrier. JSON lines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import fsspec
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import dckpt
import dckpt.dist

from common import emit, evict, fresh_folders, timed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dckpt_testing import MotoServer  # noqa: E402


def state_of(gib: float, fill: bool, layout: str = "replicated") -> dict:
    if layout == "sharded":
        from torch.distributed.device_mesh import init_device_mesh

        from common import make_state

        torch.manual_seed(dist.get_rank())
        return make_state(gib, init_device_mesh("cpu", (dist.get_world_size(),)), fill=fill)
    n = max(1, int(gib * 16))
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": (torch.randn(4096, 4096, generator=g) if fill
                                 else torch.empty(4096, 4096)) for i in range(n)}


def raw_read(fs, path: str, _n: int, chunk: int, threads: int = 8) -> int:
    """The rank's bytes as one object, read in 16 MiB ranges, 8 in flight."""
    from concurrent.futures import ThreadPoolExecutor

    size = fs.size(path)
    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(lambda o: len(fs.cat_file(path, start=o, end=min(size, o + chunk))),
                            range(0, size, chunk)))


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if hasattr(a, "to_local"):
        return torch.equal(a.to_local(), b.to_local())
    return torch.equal(a, b)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--stores", default="local,s3")
    p.add_argument("--layout", choices=("replicated", "sharded"), default="replicated")
    p.add_argument("--dir", default="bench-out/replicated")
    p.add_argument("--out", default="bench-out/replicated.jsonl")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = fresh_folders(args.dir, args.out)
    state = state_of(args.gib, fill=True, layout=args.layout)
    local = [t.to_local() if hasattr(t, "to_local") else t for t in state.values()]
    nbytes = sum(t.numel() * t.element_size() for t in local) * (
        dist.get_world_size() if args.layout == "sharded" else 1)
    group = dckpt.dist.checkpoint_group(300.0)
    flat = torch.cat([t.reshape(-1) for t in local])
    bcast = [timed(lambda: dist.broadcast(flat, src=0, group=group))
             for _ in range(args.repeats)]
    flat = torch.empty(0)
    if rank == 0 and args.layout == "replicated":
        emit(args.out, {"bench": "replicated", "method": "gloo broadcast (limit)",
                        "bytes": nbytes, "world": world, "seconds": statistics.median(bcast)})
    server = None
    try:
        for store in args.stores.split(","):
            if store == "local":
                url, opts = f"{base}/dckpt", None
                dcp_writer = dcp.FileSystemWriter(f"{base}/dcp", sync_files=True)
            else:
                info = [None]
                if rank == 0:
                    server = MotoServer()
                    server.make_bucket("bench")
                    info = [server.options()]
                dist.broadcast_object_list(info, src=0)
                opts = info[0]
                url = "s3://bench/dckpt"
                dcp_writer = FsspecWriter("s3://bench/dcp", sync_files=False, **opts)
            dckpt.save(state, url, step=1, storage_options=opts)
            dcp.save(state, storage_writer=dcp_writer)
            raw = f"{base}/raw-{rank}.bin" if store == "local" else f"s3://bench/raw-{rank}.bin"
            fs, _ = fsspec.core.url_to_fs(raw, **(opts or {}))
            fs.pipe(raw, b"".join(t.contiguous().view(torch.uint8).numpy().tobytes()
                                  for t in local))
            times: dict[str, list[float]] = {}
            for _ in range(args.repeats):
                methods = (("raw ranged reads, one object per rank", "dckpt read", "DCP")
                           if args.layout == "sharded"
                           else ("dckpt read", "dckpt broadcast", "DCP"))
                for method in methods:
                    if store == "local" and rank == 0:
                        evict(base)
                    dist.barrier()
                    target = state_of(args.gib, fill=False, layout=args.layout)
                    if method.startswith("raw"):
                        s = timed(lambda: raw_read(fs, raw, len(local), 16 << 20))
                        times.setdefault(method, []).append(s)
                        continue
                    if method == "DCP":
                        reader = (dcp.FileSystemReader(f"{base}/dcp") if store == "local"
                                  else FsspecReader("s3://bench/dcp", **opts))
                        s = timed(lambda: dcp.load(target, storage_reader=reader))
                    else:
                        cfg = dckpt.LoadConfig(replicated=method.split()[1])
                        s = timed(lambda: dckpt.load(target, url, storage_options=opts,
                                                     config=cfg))
                    assert all(same(target[k], v) for k, v in state.items())
                    times.setdefault(method, []).append(s)
            if rank == 0:
                med = {m: statistics.median(v) for m, v in times.items()}
                for m, v in times.items():
                    emit(args.out, {"bench": "replicated", "layout": args.layout,
                                    "store": store, "method": m,
                                    "bytes": nbytes, "world": world, "seconds": med[m],
                                    "all_s": [round(x, 3) for x in v],
                                    "vs_dckpt_read": round(med["dckpt read"] / med[m], 3)})
            if server is not None:
                server.stop()
                server = None
            dist.barrier()
    finally:
        if server is not None:
            server.stop()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
