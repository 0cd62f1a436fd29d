"""What a manifest of many block references costs: decoding 100,000 of them with the
checksum, tiling and bound checks (format 2) against the same manifest without them (format
1), beside the JSON parse alone; a load of the state (and its find phase: reading and
decoding the manifest); and differential saves of it, sync and async (call to commit), with
their commits (gathering the ranks' references, checking them, encoding and writing the
manifest).

    .venv/bin/python benchmarks/bench_manifest.py [--blocks 100000] [--repeat 5]
    .venv/bin/python benchmarks/bench_manifest.py --small-tensors 20000 [--repeat 3]
    .venv/bin/torchrun --standalone --nproc-per-node=2 benchmarks/bench_manifest.py ...

Under torchrun the ranks share the blocks (each its own items), and the saves' commits
include DCP's gather of every rank's references to the coordinator; with --small-tensors
the ranks share the tensors (as DDP's) and each has a quarter as many of its own.

JSON lines on stdout: seconds (medians), and the checks' share of a load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import dckpt
from dckpt import layout
from dckpt.decoder import decode


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--blocks", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--small-tensors", type=int, default=0,
                   help="instead: N tensors of 64 bytes each; async pause (layout reused), "
                        "sync save and load, against DCP's save and load and torch.save "
                        "(fsynced) and torch.load")
    args = p.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    first = world == 1 or dist.get_rank() == 0
    shared = [(tempfile.mkdtemp(), tempfile.mkdtemp()) if first else None]
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    assert shared[0] is not None
    url, peer = shared[0]
    try:
        if args.small_tensors:
            _small_tensors(args.small_tensors, args.repeat, url, peer)
        else:
            _blocks(args, url)
    finally:  # 1.2 GB by default: a run must not leave it behind in /tmp
        if world > 1:
            dist.barrier()
        if first:
            shutil.rmtree(url, ignore_errors=True)
            shutil.rmtree(peer, ignore_errors=True)


def _blocks(args: argparse.Namespace, url: str) -> None:
    block = 4096
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    # one tensor per 1,000 blocks, so that items, chunks and blocks are all many
    n_items = max(1, args.blocks // 1000 // world)
    state = {f"rank{rank}.layer{i}.w": torch.randn(1000 * block // 4) for i in range(n_items)}
    config = dckpt.SaveConfig(block_size_bytes=block, sparse_block_size_bytes=None)
    dckpt.save(state, url, step=1, config=config)
    raw = open(f"{url}/{layout.manifest_name(1)}", "rb").read()
    m = decode(raw)
    blocks = sum(1 for _ in m.blocks())
    doc = json.loads(raw)
    doc.pop("checksum")
    doc["version"] = 1
    for e in doc["items"].values():
        e.pop("encoding", None)
    raw_v1 = json.dumps(doc, separators=(",", ":")).encode()
    v2 = _median(lambda: decode(raw), args.repeat)
    v1 = _median(lambda: decode(raw_v1), args.repeat)
    parse = _median(lambda: json.loads(raw), args.repeat)
    out = {k: torch.empty_like(v) for k, v in state.items()}
    finds: list[float] = []
    load = _median(lambda: finds.append(dckpt.load(out, url, step=1).phase_s["find"]),
                   args.repeat)
    saves, commits, async_saves, async_commits = [], [], [], []
    for i in range(args.repeat):  # differential: every block known, none written
        t0 = time.perf_counter()
        commits.append(dckpt.save(state, url, step=2 + 2 * i, config=config).phase_s["commit"])
        t1 = time.perf_counter()
        handle = dckpt.async_save(state, url, step=3 + 2 * i, config=config)
        async_commits.append(handle.wait().phase_s["commit"])
        t2 = time.perf_counter()
        saves.append(t1 - t0)
        async_saves.append(t2 - t1)
    if rank != 0:
        return
    print(json.dumps({"ranks": world, "blocks": blocks, "manifest_bytes": len(raw), "json_parse_s": parse,
                      "decode_v1_s": v1, "decode_v2_s": v2, "checks_s": v2 - v1,
                      "load_s": load, "load_find_s": statistics.median(finds),
                      "checks_share_of_load": (v2 - v1) / load,
                      "save_s": statistics.median(saves), "commit_s": statistics.median(commits),
                      "async_save_s": statistics.median(async_saves),
                      "async_commit_s": statistics.median(async_commits)}))


def _small_tensors(n: int, repeat: int, url: str, peer: str) -> None:
    """Per-tensor costs: the bytes are nothing, the Python per tensor is all. Under torchrun
    the ranks share the n tensors (as DDP's) and each has n/4 of its own."""
    import torch.distributed.checkpoint as dcp

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    state = {f"layer{i}.w": torch.randn(16) for i in range(n)}
    if world > 1:
        state.update({f"rank{rank}.x{i}": torch.randn(16) for i in range(n // 4)})
    out = {k: torch.zeros(16) for k in state}

    def timed(fn) -> float:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        fn()
        if world > 1:
            dist.barrier()
        return time.perf_counter() - t0

    steps = iter(range(1, 10 ** 6))
    dckpt.async_save(state, url, step=next(steps)).wait()  # the layout's first save
    pauses: list[float] = []
    commits: list[float] = []
    for _ in range(repeat):
        handle: list = []
        pauses.append(timed(lambda: handle.append(dckpt.async_save(state, url, step=next(steps)))))
        commits.append(timed(lambda: handle[0].wait()) + pauses[-1])
    save = statistics.median(timed(lambda: dckpt.save(state, url, step=next(steps)))
                             for _ in range(repeat))
    load = statistics.median(timed(lambda: dckpt.load(out, url)) for _ in range(repeat))
    dcp_save = statistics.median(timed(lambda: dcp.save(state, checkpoint_id=peer))
                                 for _ in range(repeat))
    dcp_load = statistics.median(timed(lambda: dcp.load(out, checkpoint_id=peer))
                                 for _ in range(repeat))
    own = os.path.join(peer, f"torch-save-{rank}.pt")  # each rank its own file, made durable

    def torch_save() -> None:
        with open(own, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    torch_save_s = statistics.median(timed(torch_save) for _ in range(repeat))
    torch_load_s = statistics.median(timed(lambda: torch.load(own, weights_only=True))
                                     for _ in range(repeat))
    if rank == 0:
        print(json.dumps({"tensors": n, "ranks": world, "tensors_per_rank": len(state),
                          "async_pause_s": statistics.median(pauses),
                          "async_call_to_commit_s": statistics.median(commits),
                          "save_s": save, "load_s": load, "dcp_save_s": dcp_save,
                          "dcp_load_s": dcp_load, "torch_save_s": torch_save_s,
                          "torch_load_s": torch_load_s}))


if __name__ == "__main__":
    main()
