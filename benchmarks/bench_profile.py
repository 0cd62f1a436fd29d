"""Where a save's time goes: the phases of a sync save and of an async save's background
write, per rank, at 1 and 2 ranks, beside the raw O_DIRECT write of the same bytes.

    .venv/bin/python benchmarks/bench_profile.py --gib-per-rank 1 --saves 5

The driver launches one torchrun job per rank count (``--ranks 1,2``). Every rank holds
``--gib-per-rank`` GiB of float32 DTensor shards (64 MiB tensors, from torch's allocator:
not page-aligned, as a model's are) and saves them ``--saves`` times with ``dckpt.save``,
then as many times with ``AsyncSaver.async_save`` (staging reserved first), every value
changed before each save. Each save's ``CheckpointInfo.phase_s`` holds the coordinator's
phases (plan, write, commit, total) and this rank's (``rank_*``, see ``Writer.rank_s``:
wall seconds for plan, write and wait; thread-seconds summed over the writer threads for
index, copy, hash, lookup, compress, io, close). One JSON line per (ranks, mode, rank) with
the medians, and the raw limits measured in the same job, in turns with the saves: each
rank writing the same bytes with ``O_DIRECT``, one file per writer thread, then fsync, from
page-aligned memory on 4 KiB pages (``raw_direct_write``) and on transparent huge pages
(``raw_direct_write_huge``: the kernel pins 2 MiB pages, the disk's limit from the best
memory).
``--thp off,on`` runs each job twice, the second with ``THP_MEM_ALLOC_ENABLE=1`` (torch's
CPU allocator on transparent huge pages: the sync save writes from the state's own memory).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dckpt
    from dckpt.bench.methods import Raw
    from dckpt.bench.workload import Workload

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    w = Workload.build(gib_per_rank=args.gib_per_rank, tensor_mib=64, layout="sharded",
                       dtype="fp32", kind="full", device="cpu", mesh=mesh)
    base = os.path.join(os.path.abspath(args.dir), f"ranks{world}")
    if rank == 0:
        shutil.rmtree(base, ignore_errors=True)
    dist.barrier()
    threads = dckpt.SaveConfig().writer_threads
    raws = {"raw_direct_write": Raw(w, f"{base}/raw", None, threads),
            "raw_direct_write_huge": Raw(w, f"{base}/raw_huge", None, threads,
                                         huge_pages=True)}
    raw_s: dict[str, list[float]] = {name: [] for name in raws}
    saver = dckpt.AsyncSaver()
    saver.reserve(w.state)
    url = f"{base}/dckpt"
    runs: dict[str, list[dict]] = {"sync": [], "async": []}
    step = 0
    for i in range(args.saves):  # in turns: the disk's speed drifts
        for name, raw in raws.items():
            raw.before_save()
            dist.barrier()
            t0 = time.perf_counter()
            raw.save(i)
            dist.barrier()
            raw_s[name].append(time.perf_counter() - t0)
            if rank == 0:
                raw.drop(i)
        for mode in ("sync", "async"):
            step += 1
            w.change(step)
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "sync":
                info = dckpt.save(w.state, url, step=step)
            else:
                info = saver.async_save(w.state, url, step=step).wait()
            dist.barrier()
            runs[mode].append({**info.phase_s, "barrier_to_barrier": time.perf_counter() - t0})
            if rank == 0 and step > 1:
                dckpt.delete(url, step=step - 1)
                dckpt.gc(url, min_age_s=0)
            dist.barrier()
    saver.close()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, runs)
    if rank == 0:
        nbytes = w.checkpoint_bytes
        for r, got in enumerate(gathered):
            for mode, rows in got.items():
                med = {k: statistics.median(row[k] for row in rows if k in row)
                       for k in rows[0]}
                line = {"bench": "profile", "ranks": world, "mode": mode, "rank": r,
                        "bytes": nbytes, "saves": len(rows), **med,
                        "gbps": nbytes / med["barrier_to_barrier"] / 1e9}
                for name, seconds in raw_s.items():
                    line[f"{name}_s"] = statistics.median(seconds)
                    line[f"{name}_gbps"] = nbytes / statistics.median(seconds) / 1e9
                    line[f"vs_{name}"] = line["gbps"] / line[f"{name}_gbps"]
                print("RESULT " + json.dumps(line), flush=True)
        shutil.rmtree(base, ignore_errors=True)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib-per-rank", type=float, default=1.0)
    p.add_argument("--saves", type=int, default=5)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--dir", default="bench-out/profile")
    p.add_argument("--out", default="bench-out/profile.jsonl")
    p.add_argument("--thp", default="off",
                   help="off, on or off,on: torch's CPU allocator on transparent huge pages "
                        "(THP_MEM_ALLOC_ENABLE=1) for the state the sync save writes from")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for thp in args.thp.split(","):
        for n in (int(x) for x in args.ranks.split(",")):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={n}", os.path.abspath(__file__), "--worker",
                   "--gib-per-rank", str(args.gib_per_rank), "--saves", str(args.saves),
                   "--dir", args.dir]
            env = dict(os.environ, OMP_NUM_THREADS="1",
                       THP_MEM_ALLOC_ENABLE="1" if thp == "on" else "0")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{n} ranks failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            with open(args.out, "a") as f:
                for line in proc.stdout.splitlines():
                    if line.startswith("RESULT "):
                        record = dict(json.loads(line[len("RESULT "):]), thp=thp == "on")
                        f.write(json.dumps(record) + "\n")
                        print(json.dumps(record), flush=True)

if __name__ == "__main__":
    main()
