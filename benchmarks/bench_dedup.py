"""Differential saves: bytes written, save and restore time, dckpt against dedup off and DCP.

    torchrun --standalone --nproc-per-node=2 benchmarks/bench_dedup.py --gib-per-rank 1

Every rank holds ``--gib-per-rank`` GiB of float32 DTensor shards (row-sharded, as FSDP
shards). Workloads, each saved once in full and then
``--saves`` times after a change:

- ``dense``: parameters and their AdamW moments (exp_avg, exp_avg_sq); every value changes;
- ``finetune``: 90% of the parameters frozen, 10% change (no optimizer state: SGD);
- ``finetune_adamw``: the same with AdamW moments for the trainable 10% (so 25% of the bytes
  change: the floor of what any differential save can reach);
- ``embedding``: one table, 512-byte rows; between checkpoints 1% of the rows change, drawn
  from a Zipf distribution (a=1.2) over the row ids (ids in frequency order, as vocabularies
  are; the heavy tail still touches rows all over the table).

Methods: dckpt (dedup on, the default), dckpt with ``dedup=False``, and DCP's FileSystemWriter.
Per save: bytes written over all ranks and seconds (barrier to barrier); restore: cold loads
of the last checkpoint (the older ones pruned), ``--restores`` rounds that take the methods'
checkpoints in turns, the median counting. ``--block-sizes`` adds a sweep of dckpt's block size on the sparse
workloads (bytes written against metadata and requests); ``--fragmentation`` a sweep of
``SaveConfig.min_read_run_bytes`` on the embedding table (bytes written against the restore
of the last checkpoint, whose blocks scatter over the segments of earlier saves). JSON lines
to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

import dckpt
from common import emit, evict, fresh_folders, timed

MiB = 1 << 20
ZIPF_A = 1.2
PIECE = 32 * MiB  # tensor size


def _tensors(prefix: str, nbytes: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(1, nbytes // PIECE)
    # 2-D, as weight matrices: DTensor's planning of a 1-D shard of 16M elements builds an
    # arange over the whole dimension (1.2 s for 32 such tensors with torch 2.13)
    return {f"{prefix}{i}": torch.randn(PIECE // 4 // 1024, 1024, generator=g) for i in range(n)}


def make_workload(name: str, nbytes: int, rank: int) -> tuple[dict, callable]:
    """The rank's local shards and the function that changes them between checkpoints."""
    r = ""
    if name == "dense":
        third = nbytes // 3
        state = (_tensors(r + "param", third, rank) | _tensors(r + "exp_avg", third, rank + 10)
                 | _tensors(r + "exp_avg_sq", third, rank + 20))

        def change(i: int) -> None:
            for t in state.values():
                t.mul_(0.999).add_(1e-3 * i)
    elif name.startswith("finetune"):
        adamw = name.endswith("adamw")
        params = nbytes * 10 // (12 if adamw else 10)  # with AdamW, 2 moments of the 10% too
        frozen = _tensors(r + "frozen", params * 9 // 10, rank)
        trainable = _tensors(r + "train", params // 10, rank + 10)
        state = frozen | trainable
        if adamw:  # random moments: constant ones would make identical blocks; seeded, as
            # the rest: every method's run must hold the same values (the restores are
            # checked against the last run's)
            g = torch.Generator().manual_seed(rank + 30)
            state |= {k.replace("train", "exp_avg"): torch.randn(v.shape, generator=g)
                      for k, v in trainable.items()}
            state |= {k.replace("train", "exp_avg_sq"): torch.rand(v.shape, generator=g)
                      for k, v in trainable.items()}

        def change(i: int) -> None:
            for k, t in state.items():
                if "frozen" not in k:
                    t.add_(1e-3 * i)
    elif name == "embedding":
        dim = 128  # 512-byte rows
        rows = nbytes // (dim * 4)
        table = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rank))
        state = {"embedding": table}
        rng = np.random.default_rng(rank + 1)

        def change(i: int) -> None:
            ids = np.empty(0, dtype=np.int64)
            while len(ids) < rows // 100:  # about 1% of the rows, distinct
                draw = rng.zipf(ZIPF_A, size=rows // 100)
                ids = np.unique(np.concatenate([ids, draw[draw <= rows] - 1]))
            table[torch.from_numpy(ids)] += 1e-3
    else:
        raise ValueError(name)
    return state, change


def read_runs_per_rank(path: str, world: int) -> float:
    """The reads a restore of the newest checkpoint takes (``segments.read_runs``), per rank."""
    from dckpt.manifest import TensorEntry
    from dckpt.repository import read_manifest
    from dckpt.segments import read_runs
    from dckpt.storage import Store

    m = read_manifest(Store(path), None)
    return sum(read_runs(list(c.data.blocks)) for e in m.items.values()
               if isinstance(e, TensorEntry) for c in e.chunks) / world


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib-per-rank", type=float, default=1.0)
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--workloads", default="dense,finetune,finetune_adamw,embedding")
    p.add_argument("--block-sizes", default="", help="comma-separated KiB, e.g. 256,1024,4096,16384")
    p.add_argument("--fragmentation", default="",
                   help="comma-separated SaveConfig.min_read_run_bytes values in KiB to sweep "
                        "on the embedding table (none: never rewrite), e.g. none,64,128,256")
    p.add_argument("--settle-s", type=float, default=0.0,
                   help="seconds to wait between the saves and the restores")
    p.add_argument("--restores", type=int, default=1,
                   help="cold restores of the last checkpoint per method (the median counts)")
    p.add_argument("--dir", default="bench-out/dedup")
    p.add_argument("--out", default="bench-out/dedup.jsonl")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    base = fresh_folders(args.dir, args.out)
    nbytes = int(args.gib_per_rank * (1 << 30))

    mesh = init_device_mesh("cpu", (world,))

    def run(workload: str, method: str, config: dckpt.SaveConfig | None,
            restore: bool) -> tuple[dict, dict]:
        local, change = make_workload(workload, nbytes, rank)
        logical = sum(t.numel() * t.element_size() for t in local.values()) * world
        state = {k: DTensor.from_local(t, mesh, [Shard(0)],
                                       shape=torch.Size([t.shape[0] * world, *t.shape[1:]]),
                                       stride=t.stride())
                 for k, t in local.items()}
        path = os.path.join(base, f"{workload}-{method}".replace(" ", "_"))
        written, seconds = [], []
        for i in range(args.saves + 1):
            if i:
                change(i)
            if method == "DCP":
                before = du(path) if rank == 0 and os.path.exists(path) else 0
                s = timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(
                    f"{path}/{i}", sync_files=True)))
                w = (du(path) - before) if rank == 0 else 0
            else:
                info = None

                def save() -> None:
                    nonlocal info
                    info = dckpt.save(state, path, step=i, config=config)
                s = timed(save)
                w = info.bytes_written
            if i:  # the first save is the full one every method pays once
                written.append(w)
                seconds.append(s)
        result = {"bench": "dedup", "workload": workload, "method": method,
                  "world_size": world, "bytes_logical": logical,
                  "bytes_written_median": statistics.median(written),
                  "written_vs_full": statistics.median(written) / logical,
                  "save_s_median": statistics.median(seconds), "save_s": seconds,
                  "written_vs_full_each": [w / logical for w in written]}
        if config is not None:
            result["block_size_bytes"] = config.block_size_bytes
            result["min_read_run_bytes"] = config.min_read_run_bytes
        if restore:  # the last checkpoint stays (the older ones pruned) for restore_all
            if rank == 0:
                if method == "DCP":
                    for i in range(args.saves):
                        shutil.rmtree(f"{path}/{i}")
                else:
                    for i in range(args.saves):
                        dckpt.delete(path, step=i)
                    dckpt.gc(path, min_age_s=0)
                result["stored_bytes"] = du(path)
            result["path"] = path
        else:
            dist.barrier()
            if rank == 0:
                shutil.rmtree(path, ignore_errors=True)
                emit(args.out, result)
        dist.barrier()
        return result, local

    def restore_all(results: dict[str, dict], local: dict) -> None:
        """Cold restores of every method's last checkpoint, taken in turns (``--restores``
        rounds: this disk's speed drifts over minutes), checked against ``local``."""
        out = {k: DTensor.from_local(torch.zeros_like(t), mesh, [Shard(0)],
                                     shape=torch.Size([t.shape[0] * world, *t.shape[1:]]),
                                     stride=t.stride())
               for k, t in local.items()}
        last = args.saves
        times: dict[str, list[float]] = {m: [] for m in results}
        if rank == 0:  # the saves' writes drain first: reads right after them stalled for
            os.sync()  # seconds (a restore of 1.3 s took 18 s)
            time.sleep(args.settle_s)
        dist.barrier()
        for _ in range(args.restores):
            for method, result in results.items():
                path = result["path"]
                for t in out.values():
                    t.to_local().zero_()
                if rank == 0:
                    evict(path)
                dist.barrier()
                if method == "DCP":
                    times[method].append(timed(lambda: dcp.load(
                        out, storage_reader=dcp.FileSystemReader(f"{path}/{last}"))))
                else:
                    times[method].append(timed(lambda: dckpt.load(out, path, step=last)))
                assert all(torch.equal(out[k].to_local(), local[k]) for k in local), method
        for method, result in results.items():
            result["restore_s"] = statistics.median(times[method])
            result["restore_s_all"] = times[method]
            if method != "DCP":
                result["read_runs_per_rank"] = read_runs_per_rank(result["path"], world)
            dist.barrier()
            if rank == 0:
                shutil.rmtree(result.pop("path"), ignore_errors=True)
                emit(args.out, result)
            dist.barrier()

    summary: dict[str, dict] = {}
    for workload in args.workloads.split(","):
        res: dict[str, dict] = {}
        for method, config in (("dckpt", dckpt.SaveConfig()),
                               ("dckpt no dedup", dckpt.SaveConfig(dedup=False)),
                               ("DCP", None)):
            res[method], local = run(workload, method, config, True)
        if args.block_sizes and workload != "dense":
            for kib in args.block_sizes.split(","):
                r, _ = run(workload, f"dckpt block {kib} KiB",
                           dckpt.SaveConfig(block_size_bytes=int(kib) * 1024), False)
                summary.setdefault(workload, {})[f"written_vs_full_block_{kib}KiB"] = (
                    r["written_vs_full"])
                summary[workload][f"save_s_block_{kib}KiB"] = r["save_s_median"]
        sweep = args.fragmentation.split(",") if args.fragmentation and workload == "embedding" else []
        for limit in sweep:
            value = None if limit == "none" else int(limit) * 1024
            res[f"frag_{limit}"], _ = run(workload, f"dckpt min_read_run {limit} KiB",
                                          dckpt.SaveConfig(min_read_run_bytes=value), True)
        restore_all(res, local)
        summary.setdefault(workload, {}).update({
            "written_vs_full": res["dckpt"]["written_vs_full"],
            "save_vs_no_dedup": res["dckpt"]["save_s_median"] / res["dckpt no dedup"]["save_s_median"],
            "DCP_save_vs_dckpt": res["DCP"]["save_s_median"] / res["dckpt"]["save_s_median"],
            "restore_vs_DCP": res["dckpt"]["restore_s"] / res["DCP"]["restore_s"],
        })
        for limit in sweep:
            r = res[f"frag_{limit}"]
            summary[workload][f"written_vs_full_frag_{limit}"] = r["written_vs_full"]
            summary[workload][f"restore_vs_DCP_frag_{limit}"] = (
                r["restore_s"] / res["DCP"]["restore_s"])
    if rank == 0:
        emit(args.out, {"bench": "dedup", "summary": summary})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
