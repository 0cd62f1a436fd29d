"""End-to-end recovery: from the torchrun launch to the state loaded on every rank and the
first training step done, cold page cache (or --cache warm), dckpt against DCP and a raw
read of the same bytes.

    python benchmarks/bench_restore.py --ranks 2 --gib-per-rank 4

The driver (this script without --worker) first launches one torchrun job that writes the
state (``--gib-per-rank`` GiB of float32 DTensor shards per rank) each method's way: a dckpt
checkpoint, a DCP checkpoint (FileSystemWriter), a torch-checkpointing one (its sync saver,
each rank its shards; when installed) and one raw file per rank. Then, for each
method and ``--repeats`` times, in an order that interleaves the methods, it drops the
files from the page cache and times a fresh torchrun job that restores them and runs one
training step. Each worker reports, from rank 0 after barriers: when its Python started
(after torchrun spawned it), when the process group was up, when the state was loaded, and
when the first step was done. The read phase of a method is its load (barrier to barrier);
the raw method reads the same bytes per rank with positional reads, 8 in flight, straight
into the tensors: the disk's limit. Ratios against DCP and the raw read in the last line.

With ``--device cuda`` the state lives on the GPU (one per rank, NCCL): the raw method reads
into two pinned host buffers in turn and copies each to the device while the next one is
read. ``--methods`` picks a subset (a state as big as the GPU may not fit on the disk three
times); without the raw method, the raw sequential figure reads the objects of dckpt's
newest checkpoint.

    python benchmarks/bench_restore.py --device cuda --ranks 1 --gib-per-rank 40 --methods dckpt
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

T_PYTHON = time.time()  # as early as possible: the worker's start, before the heavy imports

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = ("raw", "dckpt", "DCP", "torch-checkpointing", "memory")
METHOD_DIRS = {"raw": "raw-", "dckpt": "dckpt", "DCP": "dcp", "torch-checkpointing": "tc",
               "memory": "memory"}
DIFF_SAVES = 5


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    sys.path.insert(0, HERE)
    import dckpt
    from bench_save_load import local_tensors, raw_read, raw_write, torch_checkpointing

    t_imports = time.time()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(args.device, (world,))
    t_group = time.time()
    base = os.path.abspath(args.dir)
    if args.worker == "prepare":
        torch.manual_seed(rank)
        state, change = build_state(args, mesh, fill=True)
        methods = args.methods.split(",")
        if "dckpt" in methods:
            dckpt.save(state, f"{base}/dckpt", step=1)
            for step in range(2, DIFF_SAVES + 2 if change else 2):
                change(step)  # differential saves: the blocks of 5 checkpoints
                dckpt.save(state, f"{base}/dckpt", step=step)
        if "DCP" in methods:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(f"{base}/dcp", sync_files=True))
        if "memory" in methods:  # the memory tier's checkpoint of the newest step, as a save
            from dckpt.memory import MemoryTier  # of CheckpointManager(memory_every_steps=)

            newest = dckpt.list_checkpoints(f"{base}/dckpt")[-1].step
            dckpt.save(state, MemoryTier(f"{base}/dckpt", args.memory_dir).url, step=newest,
                       config=dckpt.SaveConfig(dedup=False, compression="off",
                                               direct_io=False))
        if "torch-checkpointing" in methods:  # its sync saver, each rank its shards
            tc = torch_checkpointing()
            tc.save(f"{base}/tc", {"model": local_tensors(state)})
            tc.close()
        if "raw" in methods:
            raw_write(f"{base}/raw-{rank}.bin",
                      {k: v.cpu() for k, v in local_tensors(state).items()})
        sums = {k: float(v.to_local().double().sum()) for k, v in state.items()}
        with open(f"{base}/sums-{rank}.json", "w") as f:
            json.dump(sums, f)
        dist.barrier()
        return
    state, _ = build_state(args, mesh, fill=False)
    if args.destination == "built":  # a model built before its restore: its pages present
        for v in state.values():
            v.to_local().zero_()
        if cuda:
            torch.cuda.synchronize()
    # dckpt imports its parts at first use; a training script names what it uses at its top,
    # before it builds its state (0.1 s here, 0.25 s on the H200 machine: not the read's)
    dckpt.load, dckpt.CheckpointManager  # noqa: B018
    dist.barrier()
    t0 = time.time()
    info = None
    config = read_config(dckpt, args.read_config)
    if args.worker == "dckpt":
        info = dckpt.load(state, f"{base}/dckpt", config=config)
    elif args.worker == "DCP":
        dcp.load(state, storage_reader=dcp.FileSystemReader(f"{base}/dcp"))
    elif args.worker == "torch-checkpointing":
        tc = torch_checkpointing()
        tc.load(f"{base}/tc", into={"model": local_tensors(state)})
        tc.close()
    elif args.worker == "memory":
        mgr = dckpt.CheckpointManager(f"{base}/dckpt", memory_every_steps=1, gc=False,
                                      memory_dir=args.memory_dir, handle_signals=False,
                                      load_config=config)
        t_made = time.time()
        info = mgr.restore(state)
        assert info is not None and info.tier == "memory", info
        info.phase_s["manager"] = t_made - t0  # the manager's construction, in the read phase
    elif cuda:
        raw_read_to_device(f"{base}/raw-{rank}.bin", local_tensors(state))
    else:
        raw_read(f"{base}/raw-{rank}.bin", local_tensors(state))
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t_loaded = time.time()
    first = next(iter(state.values())).to_local()
    w = torch.randn(first.shape[1], 256, device=first.device)
    torch.tanh(first[:16384] @ w).sum().item()  # the first step: reads restored weights
    dist.barrier()
    t_step = time.time()
    if args.worker == "memory":  # a job's end, outside the timed phases
        mgr._close(remove_memory=False)  # kept for the next repeat
    with open(f"{base}/sums-{rank}.json") as f:
        want = json.load(f)
    ok = all(abs(float(v.to_local().double().sum()) - want[k]) <= 1e-6 * max(1.0, abs(want[k]))
             for k, v in state.items())
    bad = torch.tensor([int(not ok)], device=first.device)
    dist.all_reduce(bad)  # every rank's values must match
    ok = int(bad.item()) == 0
    if rank == 0:
        print("RESULT " + json.dumps({
            "python_start": T_PYTHON, "imports_done": t_imports, "group_up": t_group,
            "load_start": t0, "loaded": t_loaded, "first_step": t_step, "values_ok": ok,
            "phase_s": info.phase_s if info else None}), flush=True)
    dist.destroy_process_group()


def read_config(dckpt, spec: str):
    """``THREADSxMIB`` (reader threads x request MiB) or ``THREADSxMIBxBUFMIB`` (and the host
    buffer's bound, ``read_buffer_bytes``, in MiB) as a LoadConfig; "": the defaults."""
    if not spec:
        return dckpt.LoadConfig()
    threads, mib, *buf = (int(x) for x in spec.split("x"))
    return dckpt.LoadConfig(reader_threads=threads, read_request_bytes=mib << 20,
                            **({"read_buffer_bytes": buf[0] << 20} if buf else {}))


def build_state(args: argparse.Namespace, mesh, fill: bool) -> tuple[dict, object]:
    """The state of ``--state``, and for "embedding" the function that changes it."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    from common import make_state
    if args.state == "dense":
        return make_state(args.gib_per_rank, mesh, device=args.device, fill=fill), None
    from bench_dedup import make_workload
    local, change = make_workload("embedding", int(args.gib_per_rank * (1 << 30)),
                                  mesh.get_rank())
    world = mesh.size()
    state = {k: DTensor.from_local(t.to(args.device) if fill else
                                   torch.empty_like(t, device=args.device), mesh, [Shard(0)],
                                   shape=torch.Size([t.shape[0] * world, *t.shape[1:]]),
                                   stride=t.stride())
             for k, t in local.items()}
    if args.device != "cpu":  # the changes go to the host copy; keep the device one in step
        host, base_change = local, change

        def change(i: int) -> None:
            base_change(i)
            for k, v in state.items():
                v.to_local().copy_(host[k])
    return state, change


def raw_read_to_device(path: str, tensors: dict) -> None:
    """The raw read onto the GPU: each tensor's bytes into one of two pinned buffers in
    turn (positional reads, 8 in flight), then copied to the device on a side stream while
    the next tensor is read."""
    import torch

    from bench_save_load import raw_read

    size = max(t.numel() * t.element_size() for t in tensors.values())
    buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    events: list = [None, None]
    stream = torch.cuda.Stream()
    offset = 0
    for i, t in enumerate(tensors.values()):
        n = t.numel() * t.element_size()
        buf = buffers[i % 2][:n]
        if events[i % 2] is not None:
            events[i % 2].synchronize()  # its last copy to the device is done
        raw_read(path, {"x": buf}, offset=offset)
        with torch.cuda.stream(stream):
            t.view(-1).view(torch.uint8).copy_(buf, non_blocking=True)
            events[i % 2] = torch.cuda.Event()
            events[i % 2].record(stream)
        offset += n
    stream.synchronize()


def launch(args: argparse.Namespace, mode: str) -> tuple[float, dict | None]:
    """Run one torchrun job; ``mode`` is a method, "dckpt THREADSxMIB[xBUFMIB]" (or memory
    with one), or "dckpt prefetch"
    (``python -m dckpt.prefetch`` started beside torchrun, in the launch-to-first-step time)."""
    method, _, config = mode.partition(" ")
    prefetch = config == "prefetch"
    config = "" if prefetch else config
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.ranks}", os.path.abspath(__file__), "--worker", method,
           "--gib-per-rank", str(args.gib_per_rank), "--dir", args.dir,
           "--device", args.device, "--methods", args.methods, "--state", args.state,
           "--memory-dir", args.memory_dir, "--destination", args.destination,
           *(["--read-config", config] if config else [])]
    t_launch = time.time()
    helper = (subprocess.Popen([sys.executable, "-m", "dckpt.prefetch",
                                os.path.join(args.dir, "dckpt")], stderr=subprocess.PIPE,
                               text=True) if prefetch else None)
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if helper is not None:
        print("  " + helper.communicate()[1].strip(), flush=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} job failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    return t_launch, json.loads(line[len("RESULT "):]) if line else None


def evict_tree(path: str) -> None:
    sys.path.insert(0, HERE)
    from common import evict
    evict(path)


def warm_tree(path: str) -> None:
    """Read a method's files once, so that its restore finds them in the page cache."""
    names = [path] if os.path.exists(path) else [
        os.path.join(os.path.dirname(path), f) for f in os.listdir(os.path.dirname(path))
        if f.startswith(os.path.basename(path))]
    subprocess.run(["sh", "-c", 'find "$@" -type f -exec cat {} + >/dev/null', "sh", *names],
                   check=True)


def memcpy_s(nbytes: int, ranks: int, fresh: bool, verified: bool = False) -> float:
    """Seconds for ``ranks`` threads to each copy ``nbytes`` into host memory: present
    pages, or ``fresh`` ones (as a restarted process's tensors are: the page faults count).
    The memory tier's floor (each rank copies its shard out of shared memory); ``verified``:
    into present pages, each 64 MiB followed by its xxh3-128 digest, as a load checks
    every byte (on few cores the digests take cores the copies would use)."""
    import threading

    import torch
    import xxhash

    pairs = [(torch.empty(nbytes, dtype=torch.uint8).fill_(1),
              torch.empty(nbytes, dtype=torch.uint8)) for _ in range(ranks)]
    if not fresh:
        for _, dst in pairs:
            dst.fill_(0)

    def copy(src: torch.Tensor, dst: torch.Tensor) -> None:
        if not verified:
            dst.copy_(src)
            return
        piece = 64 << 20
        for at in range(0, nbytes, piece):
            dst[at:at + piece].copy_(src[at:at + piece])
            xxhash.xxh3_128_digest(memoryview(dst[at:at + piece].numpy()))

    threads = [threading.Thread(target=copy, args=pair) for pair in pairs]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def host_to_device_s(nbytes: int) -> float:
    """Seconds to copy ``nbytes`` of ordinary (pageable) host memory into a fresh GPU tensor:
    the floor of a restore from the memory tier onto the GPU, beside the host memcpy."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.empty(nbytes, dtype=torch.uint8, device="cuda").copy_(src)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del src
    torch.cuda.empty_cache()
    return seconds


def pinned_alloc_s(nbytes: int) -> float:
    """Seconds to allocate ``nbytes`` of pinned host memory afresh (a restore onto the GPU
    reads through such buffers, up to ``LoadConfig.read_buffer_bytes`` at once)."""
    import torch

    t0 = time.perf_counter()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    seconds = time.perf_counter() - t0
    # the caching host allocator would hand it to the next repeat: released where torch
    # says how, else held (the next repeat then pins afresh all the same)
    empty = next((getattr(torch._C, n) for n in ("_accelerator_emptyHostCache",
                                                 "_cuda_hostEmptyCache") if hasattr(torch._C, n)),
                 None)
    if empty is None:
        _HELD.append(buf)
    else:
        del buf
        empty()
    return seconds


_HELD: list = []


def raw_cold_read_sequential(args: argparse.Namespace) -> float:
    """A single sequential stream per file, all ranks' files at once: cat-like."""
    paths = [os.path.join(args.dir, f"raw-{r}.bin") for r in range(args.ranks)]
    if not os.path.exists(paths[0]):  # the newest checkpoint's objects, a stream per rank
        from dckpt.prefetch import plan

        root = os.path.join(args.dir, "dckpt")
        files = sorted((os.path.join(root, name) for name in plan(root).ranges),
                       key=os.path.getsize, reverse=True)
        paths = [files[r::args.ranks] for r in range(args.ranks)]
    else:
        paths = [[p] for p in paths]
    for group in paths:
        for p in group:
            evict_tree(p)
    t0 = time.perf_counter()
    procs = [subprocess.Popen(["cat", *group], stdout=subprocess.DEVNULL) for group in paths]
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
                        "(reader threads x request MiB), e.g. 8x64,4x32; THREADSxMIBxBUFMIB "
                        "also bounds the host buffer (read_buffer_bytes, MiB)")
    p.add_argument("--memory-read-configs", default="",
                   help="more memory methods with other read settings, as --read-configs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--state", choices=("dense", "embedding"), default="dense",
                   help="embedding: one row-sharded table (512-byte rows) that dckpt saves "
                        f"once and then {DIFF_SAVES} times after 1%% of its rows change, so "
                        "that its newest checkpoint's blocks lie in short runs across the "
                        "segments of 4 saves (DCP and raw: the last state, written once)")
    p.add_argument("--prefetch", action="store_true",
                   help="also dckpt with `python -m dckpt.prefetch` started beside torchrun")
    p.add_argument("--cache", choices=("cold", "warm"), default="cold",
                   help="warm: each method's files are read into the page cache before its "
                        "job (a restart on the node that wrote them, with memory to spare)")
    p.add_argument("--methods", default=",".join(m for m in METHODS if m != "torch-checkpointing"
                                                 or importlib.util.find_spec("torch_checkpointing")),
                   help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--destination", choices=("fresh", "built"), default="fresh",
                   help="the state the restore loads into: fresh (allocated, never touched: "
                        "the load pays its page faults, as the memcpy into fresh pages "
                        "does) or built (written once before, as a model's initialized "
                        "weights are: beside the memcpy into present pages)")
    p.add_argument("--memory-dir", default="/dev/shm",
                   help="the memory tier's parent folder (method memory)")
    p.add_argument("--worker", choices=("prepare",) + METHODS, help=argparse.SUPPRESS)
    p.add_argument("--read-config", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    args.dir = os.path.abspath(args.dir)
    chosen = tuple(m for m in METHODS if m in args.methods.split(","))
    if "dckpt" not in chosen or set(args.methods.split(",")) - set(METHODS):
        p.error(f"--methods: a subset of {','.join(METHODS)} with dckpt in it")
    if args.memory_read_configs and "memory" not in chosen:
        p.error("--memory-read-configs needs memory in --methods")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if not os.path.exists(os.path.join(args.dir, "sums-0.json")):
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        print(f"writing {args.ranks} x {args.gib_per_rank} GiB each method's way ...", flush=True)
        launch(args, "prepare")
    nbytes = (int(args.gib_per_rank * (1 << 30)) // (64 << 20) * (64 << 20) * args.ranks
              if args.state == "dense" else int(args.gib_per_rank * (1 << 30)) // 512 * 512
              * args.ranks)
    methods = chosen + tuple(f"dckpt {c}" for c in args.read_configs.split(",") if c)
    methods += tuple(f"memory {c}" for c in args.memory_read_configs.split(",") if c)
    methods += ("dckpt prefetch",) if args.prefetch else ()
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    seq, copies, fresh, verified, to_device, pinning = [], [], [], [], [], []
    for i in range(args.repeats):
        copies.append(memcpy_s(nbytes // args.ranks, args.ranks, fresh=False))
        fresh.append(memcpy_s(nbytes // args.ranks, args.ranks, fresh=True))
        verified.append(memcpy_s(nbytes // args.ranks, args.ranks, fresh=False, verified=True))
        if args.device == "cuda":  # one GPU here: the ranks' shards one after another
            to_device.append(host_to_device_s(nbytes))
            pinning.append(pinned_alloc_s(1 << 30))
        print(f"memcpy {copies[-1]:.3f} s, into fresh pages {fresh[-1]:.3f} s, with digests "
              f"{verified[-1]:.3f} s"
              + (f", host to GPU {to_device[-1]:.3f} s, 1 GiB pinned allocated in "
                 f"{pinning[-1]:.3f} s" if to_device else ""), flush=True)
        seq.append(raw_cold_read_sequential(args))
        for method in methods:
            evict_tree(args.dir)
            if args.cache == "warm" and method != "memory":
                warm_tree(os.path.join(args.dir, METHOD_DIRS[method.split()[0]]))
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
                                    "device": args.device, "cache": args.cache,
                                    "destination": args.destination, "state": args.state,
                                    "bytes": nbytes, "ranks": args.ranks, **row}) + "\n")
            print(method, {k: round(v, 2) if isinstance(v, float) else v
                           for k, v in row.items() if k != "phase_s"}, flush=True)
    med = {m: {k: statistics.median(r[k] for r in rows) for k in
               ("read_s", "launch_to_first_step_s", "launch_to_python_s", "imports_s")}
           for m, rows in runs.items()}
    summary = {
        "bytes": nbytes, "device": args.device, "cache": args.cache, "state": args.state,
        "destination": args.destination,
        "raw_sequential_read_gbps": nbytes / statistics.median(seq) / 1e9,
        **{f"{m}_read_gbps": nbytes / med[m]["read_s"] / 1e9 for m in methods},
        "dckpt_read_vs_raw_sequential": statistics.median(seq) / med["dckpt"]["read_s"],
        **{f"dckpt_read_vs_{m}": med[m]["read_s"] / med["dckpt"]["read_s"]
           for m in ("raw", "DCP", "torch-checkpointing") if m in med},
        "memcpy_s": statistics.median(copies),
        "memcpy_fresh_s": statistics.median(fresh),
        "memcpy_verified_s": statistics.median(verified),
        **({"memory_read_vs_memcpy": med["memory"]["read_s"] / statistics.median(copies),
            "memory_read_vs_memcpy_fresh": med["memory"]["read_s"] / statistics.median(fresh),
            "memory_read_vs_memcpy_verified": med["memory"]["read_s"]
            / statistics.median(verified),
            **({"host_to_device_s": statistics.median(to_device),
                "pinned_alloc_1gib_s": statistics.median(pinning),
                "memory_read_vs_host_to_device": med["memory"]["read_s"]
                / statistics.median(to_device)} if to_device else {}),
            "memory_first_step_above_bare_start_s": statistics.median(
                r["launch_to_first_step_s"] - r["launch_to_python_s"] - r["imports_s"]
                - r["group_s"] for r in runs["memory"])} if "memory" in med else {}),
        "launch_to_first_step_s": {m: med[m]["launch_to_first_step_s"] for m in methods},
        "start_up_s": {m: med[m]["launch_to_python_s"] + med[m]["imports_s"] for m in methods},
        "all_values_ok": all(r["values_ok"] for rows in runs.values() for r in rows),
    }
    with open(args.out, "a") as f:
        f.write(json.dumps({"bench": "restore", "summary": summary}) + "\n")
    print(json.dumps(summary, indent=1))
    if not args.keep:
        from dckpt.memory import memory_folder

        shutil.rmtree(memory_folder(os.path.join(args.dir, "dckpt"), args.memory_dir),
                      ignore_errors=True)
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
