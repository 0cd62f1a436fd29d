"""Markdown tables of a run_all results file, one per benchmark: what docs/benchmarks.md
states, so that its figures come from one run and are regenerated, not retyped.

    .venv/bin/python benchmarks/tables.py bench-out/run_all/results.jsonl > tables.md
"""

from __future__ import annotations

import json
import sys

COLUMNS = {  # benchmark -> (header, key) of its per-method records; keys missing show "-"
    "save_load": [("method", "method"), ("save GB/s", "save_gbps"),
                  ("cold load GB/s", "load_gbps")],
    "async": [("method", "method"), ("pause median s", "pause_median_s"),
              ("pause max s", "pause_max_s"), ("commit median s", "commit_median_s"),
              ("step slowdown", "step_slowdown"), ("steps lost s", "steps_lost_s"),
              ("pause / memcpy", "pause_vs_copy"),
              ("lost over call and next steps s", "window_lost_median_s")],
    "dedup": [("workload", "workload"), ("method", "method"),
              ("written / full", "written_vs_full"), ("save s", "save_s_median"),
              ("restore s", "restore_s")],
    "restore": [("method", "method"), ("read s", "read_s"),
                ("launch to first step s", "launch_to_first_step_s"),
                ("values ok", "values_ok")],
    "replicated": [("store", "store"), ("method", "method"), ("load s", "seconds"),
                   ("vs dckpt read", "vs_dckpt_read")],
    "compress": [("store", "store"), ("method", "method"), ("save s", "save_s"),
                 ("load s", "load_s"), ("bytes written", "bytes_written")],
    "manager": [("method", "method"), ("step us", "step_us"), ("overhead us", "overhead_us"),
                ("vs bare step", "vs_bare")],
    "reads": [("method", "method"), ("s", "s"), ("reads", "runs"), ("mean run bytes", "mean_run_bytes"),
              ("GB/s wanted", "gbps_wanted"), ("us per read", "us_per_read"), ("CPU s", "cpu_s")],
    "profile": [("ranks", "ranks"), ("mode", "mode"), ("THP", "thp"), ("rank", "rank"), ("GB/s", "gbps"),
                ("vs raw O_DIRECT", "vs_raw_direct_write"),
                ("vs raw O_DIRECT, huge pages", "vs_raw_direct_write_huge"), ("pause", "pause"),
                ("plan", "rank_plan"), ("write", "rank_write"), ("io*", "rank_io"),
                ("hash*", "rank_hash"), ("lookup*", "rank_lookup"), ("close*", "rank_close"),
                ("wait", "rank_wait"), ("commit", "commit"), ("total", "total"),
                ("call", "barrier_to_barrier")],
    "frameworks": [("framework", "framework"), ("saver", "saver"), ("pause s", "pause_s"),
                   ("commit s", "commit_s"), ("cold restore s", "restore_s"),
                   ("pause / own", "pause_vs_own"), ("restore / own", "restore_vs_own"),
                   ("pause / memcpy", "pause_vs_memcpy")],
}


def cell(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value).lower()
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in columns) + " |",
           "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(cell(r.get(k)) for _, k in columns) + " |")
    return out


def restore_rows(records: list[dict]) -> list[dict]:
    """The restore benchmark's medians per method (its records are per repeat)."""
    by: dict[str, list[dict]] = {}
    for r in records:
        if "read_s" in r:
            by.setdefault(r["method"], []).append(r)
    rows = []
    for method, rs in by.items():
        def med(key: str, rs: list[dict] = rs) -> float:
            return sorted(x[key] for x in rs)[len(rs) // 2]
        rows.append({"method": method, "read_s": med("read_s"),
                     "launch_to_first_step_s": med("launch_to_first_step_s"),
                     "values_ok": all(x["values_ok"] for x in rs)})
    return rows


def summaries(records: list[dict]) -> list[str]:
    lines = []
    for r in records:
        for key in ("ratios", "summary"):
            if isinstance(r.get(key), dict):
                flat = {k: v for k, v in r[key].items() if isinstance(v, (int, float))}
                nested = {k: v for k, v in r[key].items() if isinstance(v, dict)}
                if flat:
                    lines.append(", ".join(f"{k} {cell(v)}" for k, v in flat.items()))
                for name, sub in nested.items():
                    if all(isinstance(v, (int, float, type(None))) for v in sub.values()):
                        lines.append(f"{name}: " + ", ".join(f"{k} {cell(v)}"
                                                            for k, v in sub.items()))
    return lines


def main(path: str) -> None:
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r.get("bench", "?"), []).append(r)
    for bench, rs in by.items():
        print(f"### {bench} ({rs[0].get('run_size', '?')}, {rs[0].get('run_at', '?')})\n")
        if bench == "restore":
            rows = restore_rows(rs)
        elif bench == "async":
            rows = [{"method": f"memcpy ({r['bytes_per_rank'] >> 20} MiB per rank)",
                     "pause_median_s": r["copy_s"]} for r in rs if r.get("limit") == "copy"]
            rows += [r for r in rs if "pause_median_s" in r]
        else:
            labels = {"method", "store", "workload", "framework", "saver"}
            figures = [k for _, k in COLUMNS.get(bench, []) if k not in labels]
            rows = [r for r in rs if ("method" in r or "saver" in r or "mode" in r)
                    and any(k in r for k in figures)]
        print("\n".join(table(rows, COLUMNS.get(bench, [("method", "method")]))))
        lines = summaries(rs) if bench != "async" else []  # its summary repeats its rows
        lines += [f"{r['method']}, one core: plain {r['plain']['MB_s_one_core']} MB/s, ratio "
                  f"{r['plain']['ratio']}; byte planes {r['planes']['MB_s_one_core']} MB/s, "
                  f"ratio {r['planes']['ratio']}" for r in rs if "planes" in r]
        if lines:
            print("\n" + "\n".join(f"- {line}" for line in lines))
        print()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench-out/run_all/results.jsonl")
