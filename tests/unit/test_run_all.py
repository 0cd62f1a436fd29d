"""The one benchmark command: runs benchmarks, writes JSON lines and a PNG summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_run_all_tiny_writes_results_and_a_chart(tmp_path):
    """save_load among them: each of dckpt's saves, sync and async, is loaded back and
    compared with the state. dedup among them: its restores are checked against the values
    saved, and one workload's optimizer moments were drawn unseeded, different in each
    method's run, so that every run of it failed at that check (a benchmark's bug; the
    loads were right)."""
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--size", "tiny",
         "--only", "save_load,compress,manager,dedup", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "results.jsonl") as f:
        records = [json.loads(line) for line in f]
    benches = {r["bench"] for r in records}
    assert benches == {"save_load", "compress", "manager", "dedup"}
    assert all(r["run_size"] == "tiny" for r in records)
    workloads = {r.get("workload") for r in records if r["bench"] == "dedup"}
    assert {"dense", "finetune", "finetune_adamw", "embedding"} <= workloads
    methods = {r.get("method") for r in records if r["bench"] == "compress"}
    assert {"raw write", "dckpt compression=on", "dckpt compression=off", "DCP"} <= methods
    saved = {r.get("method"): r for r in records if r["bench"] == "save_load"}
    assert {"raw O_DIRECT", "dckpt", "dckpt, no window", "dckpt async", "DCP"} <= set(saved)
    assert all(saved[m]["save_s"] > 0 and saved[m]["load_s"] > 0 for m in saved if m)
    ratios = next(r["ratios"] for r in records if r["bench"] == "save_load" and "ratios" in r)
    assert ratios["async_save_vs_raw_direct_write"] > 0
    assert ratios["save_vs_save_without_window"] > 0
    assert (tmp_path / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_all_refuses_an_unknown_benchmark(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "run_all.py"), "--only", "nope",
         "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown benchmarks ['nope']" in proc.stderr
