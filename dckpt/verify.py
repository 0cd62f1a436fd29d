"""Checking every stored byte of a checkpoint against its digest, reporting, not raising."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from dckpt import watchdog
from dckpt.errors import DckptError, IntegrityError, NewerFormatError
from dckpt.manifest import BlockRef, StoredData
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
    damage: bool = True
    """The stored bytes are wrong or gone (an IntegrityError); False where the storage
    failed to answer (a connection reset, a refusal) or the manifest is of a newer format:
    no finding about the data, and no reason to quarantine the step."""


def _problem(step: int, e: BaseException, message: str | None = None,
             obj: str | None = None, item: str | None = None) -> Problem:
    damage = isinstance(e, IntegrityError) and not isinstance(e, NewerFormatError)
    return Problem(step, message or str(e), obj, item, damage)


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
            problems.append(_problem(step, m))
            seen.append(step)
            continue
        found = len(problems)
        with Fetcher(store, threads) as fetcher:
            checked += _verify_one(fetcher, step, list(m.datas()), request_bytes, problems,
                                   progress)
        if len(problems) > found and not still_committed(store, step):
            del problems[found:]
            continue
        seen.append(step)
    return VerifyReport(tuple(seen), checked, tuple(problems))


def _verify_one(fetcher: Fetcher, step: int, datas: list[tuple[str, StoredData]],
                request_bytes: int, problems: list[Problem],
                progress: Progress | None) -> int:
    """Check every block of one step, each read once however many items reference it, in
    reads that run across items (a checkpoint of 20,000 small tensors took a read each:
    3.2 s; one read of their segment now). A read that fails is checked again item by item
    (``_recheck``), which names the items and the damage as a read per item would.
    Returns the bytes checked, counted per item that holds them (its logical size)."""
    users: dict[BlockRef, list[str]] = {}
    for fqn, data in datas:
        for ref in data.blocks:
            users.setdefault(ref, []).append(fqn)
    positions, pos = [], 0
    for ref in sorted(users, key=lambda r: (r.segment, r.offset)):
        positions.append((ref, pos))
        pos += ref.raw_length
    total = sum(d.nbytes for _, d in datas)
    what = f"checkpoint step {step}"
    futures = {fetcher.submit_check(req, what): req for req in coalesce(positions, request_bytes)}
    checked = done = 0
    for f in watchdog.as_done(list(futures), watchdog.STALL_S,
                              f"verify of step {step} in {fetcher.store.url}"):
        req = futures[f]
        held = sum(ref.raw_length * len(users[ref]) for ref, _ in req.blocks)
        try:
            f.result()
            checked += held
        except (DckptError, OSError):
            holders = {fqn for ref, _ in req.blocks for fqn in users[ref]}
            checked += _recheck(fetcher, step, {ref for ref, _ in req.blocks},
                                [(fqn, data) for fqn, data in datas if fqn in holders],
                                request_bytes, problems)
        done += held
        if progress is not None:
            progress(done, total)
    return checked


def _recheck(fetcher: Fetcher, step: int, suspect: set[BlockRef],
             datas: list[tuple[str, StoredData]], request_bytes: int,
             problems: list[Problem]) -> int:
    """The blocks of a failed read, read again per item that holds them: a problem for
    each item whose read fails, naming it. Returns the bytes that checked."""
    checked = 0
    for fqn, data in datas:
        positions, pos = [], 0
        times: dict[BlockRef, int] = {}
        for ref in data.blocks:
            if ref in suspect:
                if ref not in times:  # a block an item holds several times (zeros): once
                    positions.append((ref, pos))
                times[ref] = times.get(ref, 0) + 1
            pos += ref.raw_length
        what = f"item {fqn!r} of checkpoint step {step}"
        for req in coalesce(positions, request_bytes):
            try:
                fetcher.results([fetcher.submit_check(req, what)])
                checked += sum(ref.raw_length * times[ref] for ref, _ in req.blocks)
            except watchdog.Stalled:
                raise  # the storage stopped answering: not a finding about the data
            except DckptError as e:
                problems.append(_problem(step, e, obj=req.segment, item=fqn))
            except OSError as e:  # not one reads.py takes for damage: the storage's
                problems.append(_problem(step, e, f"reading {req.segment}: {e}", req.segment,
                                         fqn))
    return checked
