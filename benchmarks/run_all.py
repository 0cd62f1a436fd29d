"""Every benchmark at one size, one JSON-lines file, one PNG summary chart.

    .venv/bin/python benchmarks/run_all.py --size small        # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --size full         # the issues' sizes (an hour+)
    .venv/bin/python benchmarks/run_all.py --size tiny --only save_load,manager

Each benchmark runs as its own process (torchrun where it needs ranks) and writes its JSON
lines into ``--out-dir``; they are concatenated into ``results.jsonl`` (each record tagged with
the size and the time of the run) and summarised in ``summary.png``: one panel per benchmark,
dckpt against its peers and the hardware limit measured in the same run. The chart needs
matplotlib (``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

SIZES = {
    # benchmark: {size: arguments}; in this order: the CPU-bound one first, before the disk
    # is busy writing back what the others wrote
    "manager": {"tiny": ["--steps", "200", "--rounds", "1"],
                "small": ["--steps", "1000", "--rounds", "3"],
                "full": ["--steps", "2000", "--rounds", "5"]},
    "save_load": {"tiny": ["--gib-per-rank", "0.0625", "--repeats", "1"],
                  "small": ["--gib-per-rank", "0.25", "--repeats", "2"],
                  "full": ["--gib-per-rank", "1", "--repeats", "3"]},
    "async": {"tiny": ["--gib-per-rank", "0.0625", "--saves", "2"],
              "small": ["--gib-per-rank", "0.25", "--saves", "3"],
              "full": ["--gib-per-rank", "1", "--saves", "5"]},
    "dedup": {"tiny": ["--gib-per-rank", "0.0625", "--saves", "1"],
              "small": ["--gib-per-rank", "0.25", "--saves", "2"],
              "full": ["--gib-per-rank", "1", "--saves", "3"]},
    "restore": {"tiny": ["--gib-per-rank", "0.0625", "--repeats", "1"],
                "small": ["--gib-per-rank", "0.5", "--repeats", "1"],
                "full": ["--gib-per-rank", "4", "--repeats", "2"]},
    "replicated": {"tiny": ["--gib", "0.0625", "--repeats", "1"],
                   "small": ["--gib", "0.25", "--repeats", "1"],
                   "full": ["--gib", "1", "--repeats", "2"]},
    "compress": {"tiny": ["--mib", "32", "--repeat", "1"],
                 "small": ["--mib", "128", "--repeat", "1"],
                 "full": ["--mib", "512", "--repeat", "2"]},
    "reads": {"tiny": ["--gib", "0.0625", "--repeats", "1"],
              "small": ["--gib", "0.5", "--repeats", "3"],
              "full": ["--gib", "1", "--repeats", "5"]},
    "profile": {"tiny": ["--gib-per-rank", "0.0625", "--saves", "1"],
                "small": ["--gib-per-rank", "0.25", "--saves", "3"],
                "full": ["--gib-per-rank", "1", "--saves", "5"]},
    "frameworks": {"tiny": ["--mparams", "4", "--repeat", "1"],
                   "small": ["--mparams", "32", "--repeat", "3"],
                   "full": ["--mparams", "32", "--repeat", "5"]},
}
FRAMEWORKS = {"lightning": "lightning", "trainer": "transformers", "accelerate": "accelerate",
              "torchtitan": "torchtitan"}
"""bench_frameworks.py's frameworks and the package each needs: one torchrun job each, for
those installed."""
NEEDS_RANKS = {"save_load", "async", "dedup", "manager", "replicated", "frameworks"}
"""Run under torchrun with 2 ranks; restore and profile launch their own torchrun jobs,
compress and reads are one process."""


def run_one(name: str, size: str, out_dir: str, device: str) -> tuple[str, int, float]:
    out = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.exists(out):
        os.remove(out)
    script = os.path.join(HERE, f"bench_{name}.py")
    args = [*SIZES[name][size], "--out", out]
    data = os.path.join(out_dir, "data", name)
    if name == "frameworks":
        jobs = [[*args, "--framework", f, "--data-dir", data] for f, package in FRAMEWORKS.items()
                if importlib.util.find_spec(package)]
    else:
        jobs = [args + (["--dir", data] if name != "manager" else [])
                + (["--device", "cuda"] if name == "async" and device == "cuda" else [])]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1",
               PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    rc = 0
    with open(os.path.join(out_dir, f"{name}.log"), "w") as log:
        for job in jobs:
            if name in NEEDS_RANKS:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node=2", script, *job]
            else:
                cmd = [sys.executable, script, *job]
            os.sync()  # the previous benchmark's dirty pages go now, not during this one
            time.sleep(2)
            log.flush()
            rc = rc or subprocess.run(cmd, cwd=HERE, env=env, stdout=log,
                                      stderr=subprocess.STDOUT).returncode
    return out, rc, time.perf_counter() - t0


def records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _panels(results: list[dict]) -> list[tuple[str, str, list[str], list[float]]]:
    """(title, unit, labels, values) per benchmark present, headline figures only."""
    by = {}
    for r in results:
        by.setdefault(r.get("bench"), []).append(r)
    panels = []
    rows = [r for r in by.get("save_load", []) if "save_gbps" in r]
    if rows:
        panels.append(("Save throughput (2 ranks)", "GB/s", [r["method"] for r in rows],
                       [r["save_gbps"] for r in rows]))
        panels.append(("Cold load throughput (2 ranks)", "GB/s", [r["method"] for r in rows],
                       [r["load_gbps"] for r in rows]))
    rows = [r for r in by.get("async", []) if "pause_median_s" in r]
    copy = [r for r in by.get("async", []) if r.get("limit") == "copy"]
    if rows:
        labels = [r["method"] for r in rows] + (["memcpy (limit)"] if copy else [])
        values = [r["pause_median_s"] for r in rows] + ([copy[0]["copy_s"]] if copy else [])
        panels.append(("Async save: training pause (median)", "s", labels, values))
    rows = [r for r in by.get("dedup", []) if r.get("method") in ("dckpt", "DCP")
            and "save_s_median" in r]
    if rows:
        panels.append(("Differential saves: bytes written / full", "ratio",
                       [f"{r['workload']} {r['method']}" for r in rows],
                       [r["written_vs_full"] for r in rows]))
    rows = [r for r in by.get("restore", []) if "read_s" in r]
    if rows:
        med: dict[str, list[float]] = {}
        for r in rows:
            med.setdefault(r["method"], []).append(r["bytes"] / r["read_s"] / 1e9)
        panels.append(("Restore: read phase, cold", "GB/s", list(med),
                       [sorted(v)[len(v) // 2] for v in med.values()]))
    rows = [r for r in by.get("replicated", []) if "seconds" in r]
    if rows:
        panels.append(("Replicated state: load (2 ranks)", "s",
                       [f"{r.get('store', '')} {r['method']}".strip() for r in rows],
                       [r["seconds"] for r in rows]))
    rows = [r for r in by.get("compress", []) if "save_s" in r]
    if rows:
        panels.append(("Compression: save time by store", "s",
                       [f"{r['store']} {r['method']}" for r in rows], [r["save_s"] for r in rows]))
    rows = [r for r in by.get("reads", []) if "us_per_read" in r]
    if rows:
        panels.append(("Cold reads: cost of a read beyond its bytes", "us",
                       [r["method"] for r in rows], [r["us_per_read"] for r in rows]))
    rows = [r for r in by.get("profile", []) if r.get("rank") == 0]
    if rows:
        panels.append(("Save vs raw O_DIRECT write (profile)", "ratio",
                       [f"{r['ranks']} rank(s) {r['mode']}" for r in rows],
                       [r["vs_raw_direct_write"] for r in rows]))
    rows = [r for r in by.get("frameworks", []) if "restore_s" in r]
    if rows:
        panels.append(("Frameworks: save pause (2 ranks)", "s",
                       [f"{r['framework']} {r['saver']}" for r in rows],
                       [r["pause_s"] for r in rows]))
        panels.append(("Frameworks: cold restore (2 ranks)", "s",
                       [f"{r['framework']} {r['saver']}" for r in rows],
                       [r["restore_s"] for r in rows]))
    rows = [r for r in by.get("manager", []) if "step_us" in r]
    if rows:
        panels.append(("Manager: time per training step", "us", [r["method"] for r in rows],
                       [r["step_us"] for r in rows]))
    return panels


def chart(results: list[dict], path: str, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is missing (pip install -e .[bench]): no chart", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(results)
    if not panels:
        return False
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(14, 3.2 * rows), squeeze=False)
    for ax, (name, unit, labels, values) in zip(axes.flat, panels):
        colors = ["#cc6677" if "dckpt" in lab or "maybe_save" in lab
                  else "#999999" if "limit" in lab or "raw" in lab else "#4477aa"
                  for lab in labels]
        bars = ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel(unit, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("tiny", "small", "full"), default="small")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(SIZES))
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(HERE), "bench-out",
                                                     "run_all"))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(SIZES)
    unknown = set(names) - set(SIZES)
    if unknown:
        p.error(f"unknown benchmarks {sorted(unknown)}; choose from {', '.join(SIZES)}")
    args.out_dir = os.path.abspath(args.out_dir)  # the benchmarks run in benchmarks/
    os.makedirs(args.out_dir, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    results, failed = [], []
    for i, name in enumerate(names):
        print(f"[{i + 1}/{len(names)}] {name} ({args.size}) ...", flush=True)
        out, rc, seconds = run_one(name, args.size, args.out_dir, args.device)
        got = records(out)
        print(f"      {'ok' if rc == 0 else f'FAILED (exit {rc})'}: {len(got)} records in "
              f"{seconds:.0f} s; log {os.path.join(args.out_dir, name + '.log')}", flush=True)
        if rc != 0:
            failed.append(name)
        results += [{**r, "run_size": args.size, "run_at": stamp} for r in got]
    with open(os.path.join(args.out_dir, "results.jsonl"), "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    png = os.path.join(args.out_dir, "summary.png")
    drew = chart(results, png, f"dckpt benchmarks, size {args.size}, {stamp}")
    print(f"results: {os.path.join(args.out_dir, 'results.jsonl')} ({len(results)} records)"
          + (f"; chart: {png}" if drew else ""))
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
