"""Save and load throughput of dckpt against DCP, torch.save and the raw disk, in one run.

    torchrun --standalone --nproc-per-node=2 benchmarks/bench_save_load.py --gib-per-rank 1

Every rank holds ``--gib-per-rank`` GiB of float32 DTensor shards (an FSDP-like state). Each
method saves the same state durably (fsync) to a fresh folder; each load starts cold (the
files' pages are dropped from the page cache first). The raw disk is each rank writing
(sequentially, then fsync) and reading back (positional reads, 8 in flight) the same byte
count with plain file I/O, all ranks at once as in a checkpoint; ``raw O_DIRECT`` writes the
same bytes from page-aligned memory with ``O_DIRECT`` (no page cache, no copy: the disk's own
limit); ``raw O_DIRECT, tensors' memory`` writes them the same way from the tensors' own
memory, each tensor's first and last partial page through a page of its own. The copies
``raw O_DIRECT`` writes are made after the state and the state loaded into, so they lie on
longer runs of physical pages, and the same bytes write faster from them (1.2-1.5x on the
2-core machine: a process's first allocations get its most scattered pages;
docs/benchmarks.md, Where a save's time goes); ``raw O_DIRECT, tensors' memory`` is the
limit for the state as it lies. ``dckpt, no window`` is dckpt's sync save with
``SaveConfig(write_window_bytes=0)``: every whole page written from the tensors' own memory
instead of copied through reused windows on huge pages (where dckpt uses them: a disk that
takes scattered pages slowly; the summary line's ``write_window_bytes_used`` says whether
they were used here, 0 where not, and then the two are the same save). ``dckpt
async`` is ``dckpt.async_save(...).wait()``, the call
to the commit: the state copied into dckpt's staging memory, reused from save to save (the
first round's save also makes it), and written from there, as the CheckpointManager saves by
default.
torch-checkpointing (meta-pytorch's, when installed) saves each rank's shards with its sync
saver, ``use_direct_io=False`` (its ``O_DIRECT`` path fails on ext4) and a finalize callback
that fsyncs (it never fsyncs by itself), and loads them back into the same tensors.
Figures are GB/s over all ranks, the median of ``--repeats`` rounds that take the methods
in turns, each round starting one method later; ratios compare dckpt with the peers. JSON
lines go to --out, a chart beside.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh

import dckpt
from dckpt.writer import Writer
from common import bar_chart, emit, fresh_folders, evict, make_state, median, timed

def local_tensors(state: dict) -> dict:
    return {k: v.to_local() for k, v in state.items()}


def raw_write(path: str, tensors: dict) -> None:
    with open(path, "wb") as f:
        for t in tensors.values():
            f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: str, tensors: dict, threads: int = 8, chunk: int = 16 << 20,
             offset: int = 0) -> None:
    """The disk's limit: positional reads of 16 MiB, 8 in flight per rank, from ``offset``.
    On the 2-core machine's disk one thread reading in order is faster on a file written
    through the page cache (0.80 against 0.99 s for 2 GiB) and twice as slow on files written
    with ``O_DIRECT``: this read treats both alike (docs/benchmarks.md, At full size)."""
    fd = os.open(path, os.O_RDONLY)
    jobs = []
    for t in tensors.values():
        mv = memoryview(t.view(-1).view(torch.uint8).numpy())
        for start in range(0, len(mv), chunk):
            piece = mv[start: start + chunk]
            jobs.append((piece, offset + start))
        offset += len(mv)
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda j: os.preadv(fd, [j[0]], j[1]), jobs))
    finally:
        os.close(fd)


def direct_write(path: str, aligned: list[memoryview]) -> None:
    """The bytes from page-aligned memory to one file with ``O_DIRECT``, then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for mv in aligned:
            for off in range(0, len(mv), 4 << 20):
                os.write(fd, mv[off: off + (4 << 20)])
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_write_in_place(path: str, tensors: dict) -> None:
    """Each tensor's bytes to one file with ``O_DIRECT`` from its own memory: its whole pages
    in 4 MiB writes, its partial first and last pages copied into a page-aligned page (the
    file holds them padded), then fsync."""
    page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        for t in tensors.values():
            mv = memoryview(t.view(-1).view(torch.uint8).numpy())
            head = min(-t.data_ptr() % 4096, len(mv))
            end = head + (len(mv) - head) // 4096 * 4096
            for part in (mv[:head], mv[end:]):  # through the page, padded
                if len(part):
                    page[:len(part)] = part
                    os.write(fd, page)
            for off in range(head, end, 4 << 20):
                os.write(fd, mv[off: min(end, off + (4 << 20))])
        os.fsync(fd)
    finally:
        os.close(fd)
        page.close()


def aligned_copies(tensors: dict) -> list[memoryview]:
    out = []
    for t in tensors.values():
        nbytes = t.numel() * t.element_size()
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        torch.frombuffer(buf, dtype=torch.uint8).copy_(t.view(-1).view(torch.uint8))
        out.append(memoryview(buf))
    return out


def torch_checkpointing():
    """torch-checkpointing's sync manager, made durable; None when it is not installed."""
    try:
        import torch_checkpointing as tc
        from torch_checkpointing.config import SyncCheckpointSaverConfig
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig
    except ImportError:
        return None
    from dckpt.bench.methods import fsync_files

    return tc.CheckpointManager(tc.CheckpointManager.Config(
        save=SyncCheckpointSaverConfig(), finalize_callback=fsync_files,
        storage_config=LocalFileSystemStorageConfig(use_direct_io=False)))


def torch_save(path: str, tensors: dict) -> None:
    with open(path, "wb") as f:
        torch.save(tensors, f)
        f.flush()
        os.fsync(f.fileno())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib-per-rank", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default="bench-out/data")
    p.add_argument("--out", default="bench-out/save_load.jsonl")
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    src = make_state(args.gib_per_rank, mesh, fill=True)
    dst = make_state(args.gib_per_rank, mesh, fill=False)
    nbytes = sum(t.to_local().numel() * 4 for t in src.values()) * world
    base = fresh_folders(args.dir, args.out)

    def fresh(name: str, i: int) -> str:
        path = os.path.join(base, f"{name}-{i}")
        if rank == 0:
            os.makedirs(path, exist_ok=True)
        dist.barrier()
        return path

    def cleanup(path: str) -> None:
        dist.barrier()
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def evict_all(path: str) -> None:
        if rank == 0:
            evict(path)
        dist.barrier()

    aligned = aligned_copies(local_tensors(src))
    phases: list[dict[str, float]] = []
    methods = {
        "raw disk": (
            lambda d: raw_write(f"{d}/rank{rank}.bin", local_tensors(src)),
            lambda d: raw_read(f"{d}/rank{rank}.bin", local_tensors(dst))),
        "raw O_DIRECT": (
            lambda d: direct_write(f"{d}/rank{rank}.bin", aligned),
            lambda d: raw_read(f"{d}/rank{rank}.bin", local_tensors(dst))),
        "raw O_DIRECT, tensors' memory": (
            lambda d: direct_write_in_place(f"{d}/rank{rank}.bin", local_tensors(src)),
            lambda d: raw_read(f"{d}/rank{rank}.bin", local_tensors(dst))),
        "dckpt": (  # each save's phases kept: where a slow repeat's time went
            lambda d: phases.append(dckpt.save(src, d, step=1).phase_s),
            lambda d: dckpt.load(dst, d, step=1)),
        "dckpt, no window": (  # every whole page straight from the tensors' memory
            lambda d: dckpt.save(src, d, step=1, config=dckpt.SaveConfig(write_window_bytes=0)),
            lambda d: dckpt.load(dst, d, step=1)),
        "dckpt async": (  # staged into reused memory, then written: the manager's default
            lambda d: dckpt.async_save(src, d, step=1).wait(),
            lambda d: dckpt.load(dst, d, step=1)),
        "DCP": (
            lambda d: dcp.save(src, storage_writer=dcp.FileSystemWriter(d)),
            lambda d: dcp.load(dst, storage_reader=dcp.FileSystemReader(d))),
        "torch.save": (
            lambda d: torch_save(f"{d}/rank{rank}.pt", local_tensors(src)),
            lambda d: torch.load(f"{d}/rank{rank}.pt", weights_only=True)),
    }
    tc = torch_checkpointing()
    if tc is not None:
        methods["torch-checkpointing"] = (
            lambda d: tc.save(f"{d}/tc", {"model": local_tensors(src)}),
            lambda d: tc.load(f"{d}/tc", into={"model": local_tensors(dst)}))
    results: dict[str, dict[str, float]] = {}
    saves: dict[str, list[float]] = {name: [] for name in methods}
    loads: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(args.repeats):  # the methods in turns: this disk's speed drifts over minutes
        # each round starts one method later: none always follows the same one (a save's
        # aftermath and the deletion of the last method's files weigh on what comes next)
        for name in names[i % len(names):] + names[:i % len(names)]:
            save, load = methods[name]
            d = fresh("".join(c if c.isalnum() else "_" for c in name), i)
            saves[name].append(timed(lambda: save(d)))
            evict_all(d)
            loads[name].append(timed(lambda: load(d)))
            if name.startswith("dckpt") or name == "torch-checkpointing":  # the loaded values are the saved ones
                assert all(torch.equal(src[k].to_local(), dst[k].to_local()) for k in src)
                for t in local_tensors(dst).values():
                    t.zero_()
            cleanup(d)
    for name in methods:
        results[name] = {"save_gbps": nbytes / median(saves[name]) / 1e9,
                         "load_gbps": nbytes / median(loads[name]) / 1e9,
                         "save_s": median(saves[name]), "load_s": median(loads[name])}
        if rank == 0:
            emit(args.out, {"bench": "save_load", "method": name, "bytes": nbytes,
                            "world_size": world, **results[name],
                            "save_s_all": saves[name], "load_s_all": loads[name],
                            **({"phase_s_all": phases} if name == "dckpt" else {})})
    if rank == 0:
        d, raw, ref = results["dckpt"], results["raw disk"], results["DCP"]
        ratios = {
            "save_vs_raw_write": d["save_gbps"] / raw["save_gbps"],
            "save_vs_raw_direct_write": d["save_gbps"] / results["raw O_DIRECT"]["save_gbps"],
            "save_vs_raw_direct_write_tensors_memory":
                d["save_gbps"] / results["raw O_DIRECT, tensors' memory"]["save_gbps"],
            "async_save_vs_raw_direct_write":
                results["dckpt async"]["save_gbps"] / results["raw O_DIRECT"]["save_gbps"],
            "async_save_vs_save": results["dckpt async"]["save_gbps"] / d["save_gbps"],
            "save_vs_save_without_window":
                d["save_gbps"] / results["dckpt, no window"]["save_gbps"],
            "save_vs_dcp": d["save_gbps"] / ref["save_gbps"],
            "save_vs_torch_save": d["save_gbps"] / results["torch.save"]["save_gbps"],
            "load_vs_raw_cold_read": d["load_gbps"] / raw["load_gbps"],
            "load_vs_dcp": d["load_gbps"] / ref["load_gbps"],
            "load_vs_torch_load": d["load_gbps"] / results["torch.save"]["load_gbps"],
        }
        if "torch-checkpointing" in results:
            tcr = results["torch-checkpointing"]
            ratios["save_vs_torch_checkpointing"] = d["save_gbps"] / tcr["save_gbps"]
            ratios["load_vs_torch_checkpointing"] = d["load_gbps"] / tcr["load_gbps"]
        # whether dckpt's sync saves wrote through windows on this disk and memory
        windows = Writer(base, step=1).window_bytes(True)
        emit(args.out, {"bench": "save_load", "ratios": ratios, "bytes": nbytes,
                        "write_window_bytes_used": windows})
        labels = [f"{m} {op}" for m in results for op in ("save", "load")]
        values = [results[m][f"{op}_gbps"] for m in results for op in ("save", "load")]
        bar_chart(args.out.replace(".jsonl", ".png"),
                  f"save / cold load, {world} ranks x {args.gib_per_rank} GiB", labels, values,
                  "GB/s (all ranks)")
    if tc is not None:
        tc.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
