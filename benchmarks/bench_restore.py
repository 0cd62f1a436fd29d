"""End-to-end recovery: from the torchrun launch to the state loaded on every rank and the
first training step done, cold page cache, dckpt against DCP and a raw read of the same bytes.

    python benchmarks/bench_restore.py --ranks 2 --gib-per-rank 4

The driver (this script without --worker) first launches one torchrun job that writes the
state (``--gib-per-rank`` GiB of float32 DTensor shards per rank) three ways: a dckpt
checkpoint, a DCP checkpoint (FileSystemWriter) and one raw file per rank. Then, for each
method and ``--repeats`` times, in an order that interleaves the methods, it drops the
files from the page cache and times a fresh torchrun job that restores them and runs one
training step. Each worker reports, from rank 0 after barriers: when its Python started
(after torchrun spawned it), when the process group was up, when the state was loaded, and
when the first step was done. The read phase of a method is its load (barrier to barrier);
the raw method reads the same bytes per rank with positional reads, 8 in flight, straight
into the tensors: the disk's limit. Ratios against DCP and the raw read in the last line.
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

T_PYTHON = time.time()  # as early as possible: the worker's start, before the heavy imports

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("raw", "dckpt", "DCP")


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, HERE)
    import dckpt
    from bench_save_load import local_tensors, raw_read, raw_write
    from common import make_state

    t_imports = time.time()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    t_group = time.time()
    base = os.path.abspath(args.dir)
    if args.worker == "prepare":
        torch.manual_seed(rank)
        state = make_state(args.gib_per_rank, mesh, fill=True)
        dckpt.save(state, f"{base}/dckpt", step=1)
        dcp.save(state, storage_writer=dcp.FileSystemWriter(f"{base}/dcp", sync_files=True))
        raw_write(f"{base}/raw-{rank}.bin", local_tensors(state))
        sums = {k: float(v.to_local().double().sum()) for k, v in state.items()}
        with open(f"{base}/sums-{rank}.json", "w") as f:
            json.dump(sums, f)
        dist.barrier()
        return
    state = make_state(args.gib_per_rank, mesh, fill=False)
    dist.barrier()
    t0 = time.time()
    info = None
    if args.worker == "dckpt":
        config = dckpt.LoadConfig()
        if args.read_config:
            threads, mib = (int(x) for x in args.read_config.split("x"))
            config = dckpt.LoadConfig(reader_threads=threads, read_request_bytes=mib << 20)
        info = dckpt.load(state, f"{base}/dckpt", config=config)
    elif args.worker == "DCP":
        dcp.load(state, storage_reader=dcp.FileSystemReader(f"{base}/dcp"))
    else:
        raw_read(f"{base}/raw-{rank}.bin", local_tensors(state))
    dist.barrier()
    t_loaded = time.time()
    first = next(iter(state.values())).to_local()
    w = torch.randn(first.shape[1], 256)
    torch.tanh(first @ w).sum().item()  # the first step: reads the restored weights
    dist.barrier()
    t_step = time.time()
    with open(f"{base}/sums-{rank}.json") as f:
        want = json.load(f)
    ok = all(abs(float(v.to_local().double().sum()) - want[k]) <= 1e-6 * max(1.0, abs(want[k]))
             for k, v in state.items())
    bad = torch.tensor([int(not ok)])
    dist.all_reduce(bad)  # every rank's values must match
    ok = int(bad.item()) == 0
    if rank == 0:
        print("RESULT " + json.dumps({
            "python_start": T_PYTHON, "imports_done": t_imports, "group_up": t_group,
            "load_start": t0, "loaded": t_loaded, "first_step": t_step, "values_ok": ok,
            "phase_s": info.phase_s if info else None}), flush=True)
    dist.destroy_process_group()


def launch(args: argparse.Namespace, mode: str) -> tuple[float, dict | None]:
    """Run one torchrun job; ``mode`` is a method, or "dckpt THREADSxMIB"."""
    method, _, config = mode.partition(" ")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.ranks}", os.path.abspath(__file__), "--worker", method,
           "--gib-per-rank", str(args.gib_per_rank), "--dir", args.dir,
           *(["--read-config", config] if config else [])]
    t_launch = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} job failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return t_launch, json.loads(line[len("RESULT "):]) if line else None


def evict_tree(path: str) -> None:
    sys.path.insert(0, HERE)
    from common import evict
    evict(path)


def raw_cold_read_sequential(args: argparse.Namespace) -> float:
    """A single sequential stream per file, all ranks' files at once: cat-like."""
    paths = [os.path.join(args.dir, f"raw-{r}.bin") for r in range(args.ranks)]
    for p in paths:
        evict_tree(p)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["dd", f"if={p}", "of=/dev/null", "bs=16M"],
                              stderr=subprocess.DEVNULL) for p in paths]
    for p in procs:
        p.wait()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--gib-per-rank", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default="bench-out/restore")
    p.add_argument("--out", default="bench-out/restore.jsonl")
    p.add_argument("--keep", action="store_true", help="keep the written state for a rerun")
    p.add_argument("--read-configs", default="",
                   help="more dckpt methods with other read settings: THREADSxMIB,... "
                        "(reader threads x request MiB), e.g. 8x64,4x32")
    p.add_argument("--worker", choices=("prepare",) + METHODS, help=argparse.SUPPRESS)
    p.add_argument("--read-config", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.dir = os.path.abspath(args.dir)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not os.path.exists(os.path.join(args.dir, "sums-0.json")):
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        print(f"writing {args.ranks} x {args.gib_per_rank} GiB three ways ...", flush=True)
        launch(args, "prepare")
    nbytes = int(args.gib_per_rank * (1 << 30)) // (64 << 20) * (64 << 20) * args.ranks
    methods = METHODS + tuple(f"dckpt {c}" for c in args.read_configs.split(",") if c)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    seq = []
    for i in range(args.repeats):
        seq.append(raw_cold_read_sequential(args))
        for method in methods:
            evict_tree(args.dir)
            t_launch, r = launch(args, method)
            row = {"launch_to_python_s": r["python_start"] - t_launch,
                   "imports_s": r["imports_done"] - r["python_start"],
                   "group_s": r["group_up"] - r["imports_done"],
                   "setup_s": r["load_start"] - r["group_up"],
                   "read_s": r["loaded"] - r["load_start"],
                   "first_step_s": r["first_step"] - r["loaded"],
                   "launch_to_first_step_s": r["first_step"] - t_launch,
                   "values_ok": r["values_ok"], "phase_s": r["phase_s"]}
            runs[method].append(row)
            with open(args.out, "a") as f:
                f.write(json.dumps({"bench": "restore", "method": method, "repeat": i,
                                    "bytes": nbytes, "ranks": args.ranks, **row}) + "\n")
            print(method, {k: round(v, 2) if isinstance(v, float) else v
                           for k, v in row.items() if k != "phase_s"}, flush=True)
    med = {m: {k: statistics.median(r[k] for r in rows) for k in
               ("read_s", "launch_to_first_step_s", "launch_to_python_s", "imports_s")}
           for m, rows in runs.items()}
    extra = {f"{m}_read_gbps": nbytes / med[m]["read_s"] / 1e9 for m in methods[len(METHODS):]}
    summary = {
        "bytes": nbytes, "raw_sequential_read_gbps": nbytes / statistics.median(seq) / 1e9,
        **{f"{m}_read_gbps": nbytes / med[m]["read_s"] / 1e9 for m in METHODS}, **extra,
        "dckpt_read_vs_raw": med["raw"]["read_s"] / med["dckpt"]["read_s"],
        "dckpt_read_vs_raw_sequential": statistics.median(seq) / med["dckpt"]["read_s"],
        "dckpt_read_vs_DCP": med["DCP"]["read_s"] / med["dckpt"]["read_s"],
        "launch_to_first_step_s": {m: med[m]["launch_to_first_step_s"] for m in METHODS},
        "start_up_s": {m: med[m]["launch_to_python_s"] + med[m]["imports_s"] for m in METHODS},
        "all_values_ok": all(r["values_ok"] for rows in runs.values() for r in rows),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps({"bench": "restore", "summary": summary}) + "\n")
    print(json.dumps(summary, indent=1))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
