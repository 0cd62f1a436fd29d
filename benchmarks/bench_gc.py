"""What gc costs on a repository of many differential checkpoints: seconds and peak memory
of one ``dckpt.gc`` (dry run) over N checkpoints of R block references each, checkpoint k
rewriting a fraction F of the blocks into an object of its own (the rest referenced where
earlier ones wrote them), beside the floor of reading every manifest's bytes. The
repository is synthetic: manifests built in memory and committed, their objects sparse
files of the right sizes (gc reads manifests and lists objects; it reads no data).

    .venv/bin/python benchmarks/bench_gc.py [--checkpoints 20] [--refs 1000000]
        [--changed 0.1] [--repeat 2] [--src PATH ...] [--keep | --repo PATH]

Each gc runs in a process of its own (its peak RSS is the child's); ``--src`` runs the gc of
other copies of the package too (``git archive <rev> dckpt | tar -x -C /tmp/base``), in
turns with this one. JSON lines on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BLOCK = 4096

_CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from dckpt import sweep
from dckpt.storage import Store
t = time.perf_counter()
report = sweep.collect(Store(sys.argv[2]), dry_run=True, min_age_s=3600)
# VmHWM, not ru_maxrss: Linux keeps a process's ru_maxrss across execve, so a child forked
# from a large parent reports the parent's size
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"gc_s": time.perf_counter() - t, "peak_rss_mib": hwm / 1024,
                  "live": len(report.live_checkpoints), "deleted": len(report.deleted),
                  "wasted_bytes": report.wasted_bytes, "src": sys.argv[1]}))
"""


def build(root: str, checkpoints: int, refs: int, changed: float, tensors: int = 100) -> int:
    """The synthetic repository; returns its distinct blocks."""
    sys.path.insert(0, ROOT)
    from dckpt import layout
    from dckpt.block_table import BlockRef
    from dckpt.manifest import ChunkEntry, Manifest, StoredData, TensorEntry, encode
    from dckpt.storage import Store

    store = Store(root)
    per = refs // tensors
    refs = per * tensors
    start = time.time() - 7 * 86400  # old attempts: nothing spared as young
    where: list[tuple[str, int]] = [("", 0)] * refs
    rng = random.Random(0)
    distinct = 0
    for k in range(checkpoints):
        attempt = layout.new_attempt(k + 1, start + k)
        segment = layout.segment_name(attempt, 0, 0)
        rewritten = range(refs) if k == 0 else sorted(rng.sample(range(refs), int(refs * changed)))
        for n, i in enumerate(rewritten):
            where[i] = (segment, n * BLOCK)
        distinct += len(rewritten)
        os.makedirs(os.path.dirname(os.path.join(root, segment)), exist_ok=True)
        with open(os.path.join(root, segment), "wb") as f:
            f.truncate(len(rewritten) * BLOCK)
        items = {}
        for t in range(tensors):
            blocks = tuple(BlockRef(where[i][0], where[i][1], BLOCK, BLOCK, f"{i:032x}")
                           for i in range(t * per, (t + 1) * per))
            items[f"t{t}"] = TensorEntry("float32", (per * BLOCK // 4,), False, (
                ChunkEntry((0,), (per * BLOCK // 4,), StoredData(per * BLOCK, blocks)),))
        m = Manifest(step=k + 1, attempt=attempt, created_at=start + k, world_size=1,
                     items=items, bytes_logical=refs * BLOCK, block_size_bytes=BLOCK)
        store.create_exclusive(layout.manifest_name(k + 1), encode(m))
    garbage = layout.segment_name(layout.new_attempt(checkpoints + 1, start), 0, 0)
    os.makedirs(os.path.dirname(os.path.join(root, garbage)), exist_ok=True)
    open(os.path.join(root, garbage), "wb").close()
    return distinct


def read_floor(root: str) -> float:
    """Seconds to read every manifest's bytes (the page cache warm, as for gc)."""
    folder = os.path.join(root, "manifests")
    t = time.perf_counter()
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb") as f:
            f.read()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoints", type=int, default=20)
    p.add_argument("--refs", type=int, default=1_000_000)
    p.add_argument("--changed", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--src", nargs="*", default=[], help="other copies of the package to run")
    p.add_argument("--dir", default=None, help="where to build (default: a temp folder)")
    p.add_argument("--repo", default=None,
                   help="a repository this script built and kept (--keep): no build")
    p.add_argument("--keep", action="store_true", help="keep the repository, and say where")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="dckpt-gc-", dir=args.dir) if args.repo is None else None
    repo = args.repo or os.path.join(root, "repo")
    try:
        setup = {"checkpoints": args.checkpoints, "refs_per_checkpoint": args.refs,
                 "changed": args.changed}
        if args.repo is None:
            t = time.perf_counter()
            setup["distinct_blocks"] = build(repo, args.checkpoints, args.refs, args.changed)
            setup["build_s"] = time.perf_counter() - t
        else:
            setup = {"repo": repo}
        print(json.dumps({"setup": setup, "kept": repo if args.keep else None}), flush=True)
        for _ in range(args.repeat):
            print(json.dumps({"read_manifests_s": read_floor(repo)}), flush=True)
            for src in [ROOT, *args.src]:
                out = subprocess.run([sys.executable, "-c", _CHILD, src, repo],
                                     check=True, capture_output=True, text=True).stdout
                print(json.dumps({**setup, **json.loads(out.splitlines()[-1])}), flush=True)
    finally:
        if root is not None and not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
