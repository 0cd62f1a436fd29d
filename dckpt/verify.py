"""Checking every stored byte of a checkpoint against its digest, reporting, not raising."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dckpt import watchdog
from dckpt.errors import DckptError
from dckpt.reads import Fetcher, coalesce
from dckpt.repository import manifests, still_committed
from dckpt.storage import Store

__all__ = ["Problem", "VerifyReport", "verify_steps"]


@dataclass(frozen=True)
class Problem:
    step: int
    message: str
    object: str | None = None
    item: str | None = None


@dataclass(frozen=True)
class VerifyReport:
    steps: tuple[int, ...]
    bytes_checked: int
    problems: tuple[Problem, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems


Progress = Callable[[int, int], None]


def verify_steps(store: Store, steps: list[int], *, threads: int = 4,
                 request_bytes: int = 16 << 20, progress: Progress | None = None) -> VerifyReport:
    """Read and check every block of each step; ``progress(done, total)`` after each read.
    A step deleted before or while it is read (a running job's retention, its data
    collected) is left out of the report, not reported as damage.
    Raises Stalled (a StorageError) when no read ends for ``watchdog.STALL_S``: a storage
    that stops answering is not a finding about the data."""
    problems: list[Problem] = []
    checked = 0
    seen = []
    for step, m in manifests(store, steps):
        if isinstance(m, DckptError):
            problems.append(Problem(step, str(m)))
            seen.append(step)
            continue
        found = len(problems)
        datas = list(m.datas())
        total = sum(d.nbytes for _, d in datas)
        done = 0
        with Fetcher(store, threads) as fetcher:
            futures = {}
            for fqn, data in datas:
                positions, pos = [], 0
                for ref in data.blocks:
                    positions.append((ref, pos))
                    pos += ref.raw_length
                what = f"item {fqn!r} of checkpoint step {step}"
                for req in coalesce(positions, request_bytes):
                    futures[fetcher.submit_check(req, what)] = (fqn, req)
            for f in watchdog.as_done(list(futures), watchdog.STALL_S,
                                      f"verify of step {step} in {store.url}"):
                fqn, req = futures[f]
                try:
                    f.result()
                    checked += sum(ref.raw_length for ref, _ in req.blocks)
                except DckptError as e:
                    problems.append(Problem(step, str(e), req.segment, fqn))
                except OSError as e:
                    problems.append(Problem(step, f"reading {req.segment}: {e}", req.segment, fqn))
                done += req.length
                if progress is not None:
                    progress(done, total)
        if len(problems) > found and not still_committed(store, step):
            del problems[found:]
            continue
        seen.append(step)
    return VerifyReport(tuple(seen), checked, tuple(problems))
