"""The memory tier's save: the training's pause per memory checkpoint against a memcpy of the
same bytes, the training step's slowdown at ``memory_every_steps``, and how long a memory
checkpoint takes to commit, against a storage-only manager in the same run.

    torchrun --standalone --nproc-per-node=2 benchmarks/bench_memory.py --gib-per-rank 1
    torchrun --standalone --nproc-per-node=2 benchmarks/bench_memory.py --nodes 2
    torchrun --standalone --nproc-per-node=1 benchmarks/bench_memory.py --device cuda --gib-per-rank 4

With ``--nodes 2`` the two ranks play two nodes (torchrun's GROUP_RANK), each with a memory
folder of its own, and the method ``memory every N, 1 replica`` adds the replication: each
rank's memory checkpoint also goes to the other node over gloo (``commit_s``: one memory
save from the call to its commit, beside the one without replicas).

Every rank holds ``--gib-per-rank`` GiB of float32 DTensor shards. Each method runs
``--steps`` stand-in training steps (matrix products, bench_async's Trainer) and calls
``maybe_save`` after each; every value of the state changes before each save. Methods:

- ``none``: no manager (the bare step);
- ``memory every N``: ``CheckpointManager(memory_every_steps=N)``, no storage trigger; a
  memory save still writing is waited for (the pause counts the wait);
- ``memory every N, skip while writing``: the same with ``SaveConfig(if_busy="skip")``;
- ``memory every N + storage every 5N``: the storage saves copy the memory checkpoints;
- ``storage every N``: ``CheckpointManager(save_every_steps=N)`` (async, the storage tier).

The floor of a pause is the copy itself: a memcpy of the state into pre-faulted memory
(bench_async's ``copy_limit``). JSON lines to --out; the ratios in the last line.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

import dckpt
from bench_async import Trainer, copy_limit
from common import emit, fresh_folders, make_state


def run(name: str, state: dict, trainer: Trainer, steps: int, every: int, url: str | None,
        **manager: object) -> dict:
    mgr = (dckpt.CheckpointManager(url, handle_signals=False, gc=False, **manager)
           if url is not None else None)
    step_s, pauses, saves = [], [], 0
    dist.barrier()
    t0 = time.perf_counter()
    for step in range(steps):
        step_s.append(trainer.step())
        for v in state.values():
            v.to_local().add_(1.0)  # every block changes
        if mgr is not None:
            mem = mgr.memory.saver._in_flight if mgr.memory is not None else None
            t = time.perf_counter()
            mgr.maybe_save(step, state)
            if step % every == 0:  # the call, as the training sees it, at each trigger
                pauses.append(time.perf_counter() - t)
            saves += int((mgr.memory is not None and mgr.memory.saver._in_flight is not mem)
                         or bool(mgr._pending and mgr._pending[-1].step == step))
    dist.barrier()
    total = time.perf_counter() - t0
    commit_s = None
    if mgr is not None and mgr.memory is not None:  # one memory save, call to commit
        mgr.wait()
        dist.barrier()
        t = time.perf_counter()
        mgr.memory.save(steps, state, None, may_skip=False)
        mgr.memory.poll(wait=True)
        commit_s = time.perf_counter() - t
    if mgr is not None:
        mgr.close()
    dist.barrier()
    return {"method": name, "steps": steps, "total_s": total,
            "step_ms": statistics.median(step_s) * 1e3,
            "mean_step_ms": statistics.mean(step_s) * 1e3,
            "pause_s": statistics.median(pauses) if pauses else 0.0,
            "max_pause_s": max(pauses, default=0.0), "saves": saves, "commit_s": commit_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib-per-rank", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--dir", default="bench-out/memory")
    p.add_argument("--memory-dir", default="/dev/shm")
    p.add_argument("--out", default="bench-out/memory.jsonl")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the state and the stand-in training live (cuda: one GPU per "
                        "rank; the pause's floor is then the copy to pinned host memory)")
    p.add_argument("--nodes", type=int, default=1,
                   help="the ranks play this many nodes (GROUP_RANK), each with a memory "
                        "folder of its own; with 2 or more the replication is measured")
    args = p.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if args.nodes > 1:  # as torchrun would set them on that many hosts
        per_node = dist.get_world_size() // args.nodes
        os.environ.update(GROUP_RANK=str(rank // per_node), LOCAL_RANK=str(rank % per_node),
                          LOCAL_WORLD_SIZE=str(per_node))
        args.memory_dir = os.path.join(args.memory_dir, f"dckpt-bench-node{rank // per_node}")
        os.makedirs(args.memory_dir, exist_ok=True)
    mesh = init_device_mesh(args.device, (dist.get_world_size(),))
    base = fresh_folders(args.dir, args.out)
    torch.manual_seed(rank)
    state = make_state(args.gib_per_rank, mesh, device=args.device)
    trainer = Trainer(args.device)
    memcpy_s, nbytes = copy_limit(state, args.device)
    n = args.every
    methods = [("none", None, {}),
               (f"memory every {n}", "m", {"memory_every_steps": n,
                                           "memory_dir": args.memory_dir}),
               (f"memory every {n}, skip while writing", "mk",
                {"memory_every_steps": n, "memory_dir": args.memory_dir,
                 "save_config": dckpt.SaveConfig(if_busy="skip")}),
               (f"memory every {n} + storage every {5 * n}", "ms",
                {"memory_every_steps": n, "save_every_steps": 5 * n,
                 "memory_dir": args.memory_dir}),
               (f"storage every {n}", "s", {"save_every_steps": n})]
    if args.nodes > 1:
        methods.insert(2, (f"memory every {n}, 1 replica", "mr",
                           {"memory_every_steps": n, "memory_dir": args.memory_dir,
                            "memory_replicas": 1}))
    rows = []
    for name, folder, kw in methods:
        url = os.path.join(base, folder) if folder else None
        row = run(name, state, trainer, args.steps, n, url, **kw)
        row.update(bench="memory", device=args.device, bytes_per_rank=nbytes, memcpy_s=memcpy_s,
                   pause_vs_memcpy=row["pause_s"] / memcpy_s if url else None)
        rows.append(row)
        if rank == 0:
            emit(args.out, row)
        if url is not None and rank == 0:
            shutil.rmtree(url, ignore_errors=True)
        dist.barrier()
    bare = rows[0]["mean_step_ms"]
    if rank == 0:
        emit(args.out, {"bench": "memory", "summary": {
            "memcpy_s": memcpy_s, "bytes_per_rank": nbytes,
            **{r["method"]: {"pause_vs_memcpy": r["pause_vs_memcpy"],
                             "mean_step_vs_bare": r["mean_step_ms"] / bare,
                             "commit_s": r["commit_s"],
                             "total_s": r["total_s"]} for r in rows[1:]}}})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
