"""What a manifest of many block references costs: decoding 100,000 of them as written
(format 3: a binary block table) and in format 2's form (the same references as JSON rows),
beside the JSON parse alone; a load of the state (and its find phase: reading and decoding
the manifest); and differential saves of it, sync and async (call to commit), with their
commits (gathering the ranks' references, checking them, encoding and writing the manifest).
With --synthetic N, no save: a manifest of N references over 64 ranks' items built in
memory, its encoding, decoding and gc's reading of its references in both forms, the
memory a decoded manifest holds (before and after one rank's items build their references),
and the dedup index of the first save after a restore (one rank's items, or every item),
decode included.

    .venv/bin/python benchmarks/bench_manifest.py [--blocks 100000] [--repeat 5]
    .venv/bin/python benchmarks/bench_manifest.py --small-tensors 20000 [--repeat 3]
    .venv/bin/python benchmarks/bench_manifest.py --synthetic 2000000 [--repeat 3]
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
import sys
import tempfile
import time
import tracemalloc

import torch
import torch.distributed as dist

import dckpt
from dckpt import dedup, layout
from dckpt.decoder import decode, references
from dckpt.manifest import BlockRef, ChunkEntry, Manifest, StoredData, TensorEntry, encode, seal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from dckpt_testing import as_rows  # noqa: E402


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
    p.add_argument("--synthetic", type=int, default=0,
                   help="instead: a manifest of N block references built in memory (no save)")
    args = p.parse_args()
    if args.synthetic:
        _synthetic(args.synthetic, args.repeat)
        return
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
    raw_v2 = _as_v2(raw)
    v3 = _median(lambda: decode(raw), args.repeat)
    v2 = _median(lambda: decode(raw_v2), args.repeat)
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
    print(json.dumps({"ranks": world, "blocks": blocks, "manifest_bytes": len(raw),
                      "manifest_v2_bytes": len(raw_v2), "json_parse_s": parse,
                      "decode_s": v3, "decode_v2_s": v2,
                      "load_s": load, "load_find_s": statistics.median(finds),
                      "save_s": statistics.median(saves), "commit_s": statistics.median(commits),
                      "async_save_s": statistics.median(async_saves),
                      "async_commit_s": statistics.median(async_commits)}))


def _as_v2(raw: bytes) -> bytes:
    """The manifest in format 2's form: every block reference a JSON row in its item."""
    doc = as_rows(json.loads(raw))
    doc.pop("checksum")
    return seal(json.dumps(doc, separators=(",", ":")).encode())


def _synthetic(n: int, repeat: int) -> None:
    ranks, per_item, block = 64, 1024, 256 << 10
    items: dict[str, TensorEntry] = {}
    for i in range(max(1, n // per_item)):
        seg = f"data/s100-t1700000000000-deadbeef/r{i % ranks:05d}-{i % 4:03d}.seg"
        blocks = tuple(BlockRef(seg, (i // ranks) * per_item * block + j * block, block, block,
                                f"{i * per_item + j:032x}") for j in range(per_item))
        items[f"rank{i % ranks}.layers.{i}.w"] = TensorEntry(
            "bfloat16", (per_item * block // 2,), False,
            (ChunkEntry((0,), (per_item * block // 2,), StoredData(per_item * block, blocks)),))
    m = Manifest(step=100, attempt="s100-t1700000000000-deadbeef", created_at=1.0,
                 world_size=ranks, items=items, bytes_logical=sum(e.nbytes for e in items.values()),
                 block_size_bytes=block)
    raw = encode(m)
    raw_v2 = _as_v2(raw)
    out: dict[str, object] = {"references": sum(1 for _ in m.refs()), "manifest_bytes": len(raw),
                              "manifest_v2_bytes": len(raw_v2),
                              "encode_s": _median(lambda: encode(m), repeat)}
    del m, items
    for form, data in (("", raw), ("_v2", raw_v2)):
        out[f"decode{form}_s"] = _median(lambda: decode(data), repeat)  # noqa: B023
        out[f"references{form}_s"] = _median(lambda: references(data), repeat)  # noqa: B023
        tracemalloc.start()
        held = decode(data)
        out[f"decoded{form}_bytes"] = tracemalloc.get_traced_memory()[0]
        mine = [d for fqn, d in held.datas() if fqn.startswith("rank0.")]
        for d in mine:
            d.blocks  # noqa: B018 - one rank's items read: their references built
        out[f"decoded{form}_rank0_built_bytes"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held, mine
    # the first differential save after a restore: rank 0's index of the base's blocks, of
    # its own items (as dckpt indexes now) and of every item (as it did)
    keys = {dedup.item_key(fqn, (0,)) for fqn in decode(raw).items if fqn.startswith("rank0.")}
    for name, wanted in (("rank0_items", keys), ("every_item", None)):
        out[f"index_{name}_s"] = _median(
            lambda: dedup.BlockIndex.of_manifest(decode(raw), wanted), repeat)  # noqa: B023
        m = decode(raw)
        tracemalloc.start()
        index = dedup.BlockIndex.of_manifest(m, wanted)
        out[f"index_{name}_bytes"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del index, m
    print(json.dumps(out))


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
