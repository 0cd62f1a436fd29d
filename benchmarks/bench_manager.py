"""What CheckpointManager.maybe_save costs a training step when no save fires.

    torchrun --standalone --nproc-per-node=2 benchmarks/bench_manager.py --steps 2000

The time trigger and preemption signals need the ranks to agree; the manager does it with
one all-reduce of two numbers per call, started at one call and read at the next. Measured
per step, in the same run, around a DDP step of a small model (gloo): the bare step; with
maybe_save (agreement on: signals handled); with maybe_save and no agreement
(``handle_signals=False``, steps trigger only); and with a blocking all-reduce per step,
the naive way to agree. JSON lines to --out.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import dckpt
from dckpt import manager as manager_module

from common import emit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default="bench-out/manager.jsonl")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(16, 64)
    state = {"app": dckpt.TrainState(model, opt)}
    group = dist.new_group(backend="gloo")

    def step() -> None:
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def bare(i: int) -> None:
        step()

    def blocking(i: int) -> None:
        step()
        t = torch.zeros(2, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)

    def with_manager(mgr: dckpt.CheckpointManager):
        def fn(i: int) -> None:
            step()
            mgr.maybe_save(i + 1, state)  # save_every_steps is never reached
        return fn

    results: dict[str, list[float]] = {}
    exchanges: list[int] = []
    interval = manager_module.AGREE_INTERVAL_S
    for _ in range(args.rounds):
        folder = tempfile.mkdtemp()
        agreeing = dckpt.CheckpointManager(folder, save_every_steps=10**9,
                                           save_every_seconds=1e9)
        quiet = dckpt.CheckpointManager(folder, save_every_steps=10**9, handle_signals=False)
        manager_module.AGREE_INTERVAL_S = 0.0  # the naive schedule: an exchange every call
        every = dckpt.CheckpointManager(folder, save_every_steps=10**9, save_every_seconds=1e9)
        manager_module.AGREE_INTERVAL_S = interval
        for name, fn in (("bare step", bare), ("maybe_save (agreement)", with_manager(agreeing)),
                         ("maybe_save (no agreement)", with_manager(quiet)),
                ("maybe_save (exchange every call)", with_manager(every)),
                         ("blocking all-reduce", blocking)):
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(args.steps):
                fn(i)
            dist.barrier()
            results.setdefault(name, []).append((time.perf_counter() - t0) / args.steps)
        exchanges.append(agreeing._agreement.exchanges)
        for mgr in (agreeing, quiet, every):
            mgr.close()
        shutil.rmtree(folder, ignore_errors=True)
    base = statistics.median(results["bare step"])
    for name, xs in results.items():
        med = statistics.median(xs)
        if rank == 0:
            emit(args.out, {"bench": "manager", "method": name, "world": dist.get_world_size(),
                            "steps": args.steps, "step_us": round(med * 1e6, 1),
                            "overhead_us": round((med - base) * 1e6, 1),
                            "vs_bare": round(med / base, 3),
                            **({"exchanges_per_round": exchanges}
                               if name == "maybe_save (agreement)" else {})})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
