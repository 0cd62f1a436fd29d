"""What ``dckpt bench`` shows: a table of GB/s and seconds, the ratios that compare dckpt with
the storage's limit and the peers, ``results.jsonl`` and ``summary.png``."""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field

__all__ = ["Result", "Report"]

PHASES = {"save": "save GB/s", "pause": "pause s", "commit": "commit GB/s",
          "restore": "restore GB/s"}
TARGETS = {  # ratio -> (what it compares, the bound dckpt aims at, higher or lower is better)
    "save / raw write": (">=", 0.9),
    "save / DCP save": (">=", 1.0),
    "commit / DCP async commit": (">=", 1.0),
    "pause / memcpy": ("<=", 1.1),
    "pause / DCP pause": ("<=", 1.0),
    "restore / raw read": (">=", 0.9),
    "restore / DCP restore": (">=", 1.2),
    "save / torch-checkpointing save": (">=", 1.0),
    "commit / torch-checkpointing async commit": (">=", 1.0),
    "pause / torch-checkpointing pause": ("<=", 1.0),
    "restore / torch-checkpointing restore": (">=", 1.0),
}


@dataclass
class Result:
    method: str
    phase: str
    seconds: list[float] = field(default_factory=list)
    bytes: int = 0
    equal: bool | None = None
    first_s: float | None = None
    """An async method's first save (its process or staging set up), not in the median."""

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def gbps(self) -> float:
        return self.bytes / self.median_s / 1e9 if self.median_s > 0 else float("inf")

    def record(self) -> dict:
        out = {"record": "result", "method": self.method, "phase": self.phase,
               "seconds": self.median_s, "seconds_all": self.seconds, "bytes": self.bytes}
        if self.phase != "pause":
            out["gbps"] = self.gbps
        if self.equal is not None:
            out["equal"] = self.equal
        if self.first_s is not None:
            out["first_s"] = self.first_s
        return out


class Report:
    """Results as they come, and what is made of them at the end."""

    def __init__(self, run: dict) -> None:
        self.run = run
        self.results: dict[tuple[str, str], Result] = {}
        self.notes: dict[str, str] = {}
        self.errors: list[dict] = []

    def add(self, result: Result) -> None:
        self.results[(result.method, result.phase)] = result

    def value(self, method: str, phase: str) -> float | None:
        r = self.results.get((method, phase))
        if r is None or not r.seconds:
            return None
        return r.median_s if phase == "pause" else r.gbps

    def ratios(self) -> dict[str, float]:
        out: dict[str, float] = {}
        pairs = [("save", "raw", "save", "raw write"), ("restore", "raw", "restore", "raw read"),
                 ("pause", "memcpy", "pause", "memcpy")]
        for peer in ("DCP", "torch-checkpointing"):
            pairs += [("save", peer, "save", f"{peer} save"),
                      ("commit", peer, "commit", f"{peer} async commit"),
                      ("pause", peer, "pause", f"{peer} pause"),
                      ("restore", peer, "restore", f"{peer} restore")]
        for phase, other, other_phase, label in pairs:
            mine, theirs = self.value("dckpt", phase), self.value(other, other_phase)
            if mine is not None and theirs:
                out[f"{phase} / {label}"] = mine / theirs
        return out

    def table(self) -> str:
        methods = list(dict.fromkeys(m for m, _ in self.results))
        lines = [f"{'method':<22}" + "".join(f"{h:>14}" for h in PHASES.values())]
        for m in methods:
            cells = []
            for phase in PHASES:
                v = self.value(m, phase)
                bad = self.results.get((m, phase), Result(m, phase)).equal is False
                cells.append("-" if v is None else f"{v:.3g}" + (" WRONG" if bad else ""))
            lines.append(f"{m:<22}" + "".join(f"{c:>14}" for c in cells))
        lines.append("")
        for name, ratio in self.ratios().items():
            sign, bound = TARGETS[name]
            ok = ratio >= bound if sign == ">=" else ratio <= bound
            lines.append(f"dckpt {name:<42} {ratio:6.2f}x   (target {sign} {bound}: "
                         f"{'met' if ok else 'MISSED'})")
        if "sync_saves" in self.run:
            lines.append(f"sync saves: {self.run['sync_saves']}")
        if "cold_reads" in self.run:
            lines.append(f"restores: {self.run['cold_reads']}")
        for name, why in self.notes.items():
            lines.append(f"note: {name}: {why}")
        for e in self.errors:
            lines.append(f"error: {e['method']} {e['phase']}: {e['error']}")
        return "\n".join(lines)

    def write(self, out_dir: str) -> list[str]:
        """``results.jsonl`` and ``summary.png`` (when matplotlib is installed) in
        ``out_dir``; returns the paths written."""
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "results.jsonl")
        records = [{"record": "run", **self.run}]
        records += [r.record() for r in self.results.values()]
        records += [{"record": "error", **e} for e in self.errors]
        records += [{"record": "note", "method": m, "note": n} for m, n in self.notes.items()]
        records.append({"record": "ratios", **self.ratios()})
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        written = [path]
        png = self._chart(os.path.join(out_dir, "summary.png"))
        if png:
            written.append(png)
        return written

    def _chart(self, path: str) -> str | None:
        try:
            import matplotlib
        except ImportError:
            self.notes["summary.png"] = "not drawn: matplotlib is not installed " \
                                        "(pip install dckpt[bench])"
            return None
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        phases = [p for p in PHASES if any(ph == p for _, ph in self.results)]
        fig, axes = plt.subplots(1, len(phases), figsize=(4.2 * len(phases), 3.6),
                                 squeeze=False)
        for ax, phase in zip(axes[0], phases):
            rows = [(m, self.value(m, phase)) for m, ph in self.results if ph == phase]
            labels = [m for m, _ in rows][::-1]
            values = [v or 0.0 for _, v in rows][::-1]
            bars = ax.barh(labels, values, color=["#cc6677" if m == "dckpt" else "#4477aa"
                                                  for m in labels])
            ax.bar_label(bars, fmt="%.2f")
            ax.set_title(PHASES[phase] + (" (lower is better)" if phase == "pause" else ""))
        run = self.run
        fig.suptitle(f"dckpt bench: {run['world_size']} ranks x {run['gib_per_rank']} GiB, "
                     f"{run['layout']} {run['dtype']}, {run['workload']}, {run['storage']}")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
