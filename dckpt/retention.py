"""Retention policies: which committed checkpoints to keep (pure).

A policy is any callable that takes the committed checkpoints (oldest first) and returns the
steps to keep. ``KeepLast``, ``KeepBest`` and ``KeepEvery`` are the usual ones; ``a | b``
keeps what either keeps. ``plan`` turns a policy into the steps to delete, and never names
the newest checkpoint or a protected one (a save in flight, a run's restore point).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from dckpt.errors import ArgumentError
from dckpt.info import CheckpointInfo

__all__ = ["Policy", "KeepLast", "KeepBest", "KeepEvery", "KeepAll", "plan", "gc_min_age_s"]

Policy = Callable[[Sequence[CheckpointInfo]], Iterable[int]]


class _Composable:
    def __or__(self, other: Policy) -> _Union:
        return _Union((self, _policy(other)))  # type: ignore[arg-type]

    def __ror__(self, other: Policy) -> _Union:
        return _Union((_policy(other), self))  # type: ignore[arg-type]


def _policy(other: object) -> Policy:
    if not callable(other):
        raise ArgumentError(f"a retention policy composes with policies (callables), not "
                            f"{type(other).__name__} {other!r}")
    return other  # type: ignore[return-value]


@dataclass(frozen=True)
class _Union(_Composable):
    policies: tuple[Policy, ...]

    def __call__(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return set().union(*(_kept(p, list(checkpoints)) for p in self.policies))

    def __or__(self, other: Policy) -> _Union:
        return _Union((*self.policies, _policy(other)))

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.policies))


@dataclass(frozen=True)
class KeepLast(_Composable):
    """The ``n`` newest checkpoints."""

    n: int

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:  # not a bool
            raise ArgumentError(f"KeepLast(n): n must be an int >= 1, got {self.n!r}")

    def __call__(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in sorted(checkpoints, key=lambda c: c.step)[-self.n:]}


@dataclass(frozen=True)
class KeepBest(_Composable):
    """The ``n`` checkpoints with the best value of ``metric`` (``mode="min"``: lowest).
    Checkpoints without a finite number for it are not candidates; ties go to the newer."""

    n: int
    metric: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if type(self.n) is not int or self.n < 1:  # not a bool
            raise ArgumentError(f"KeepBest(n, ...): n must be an int >= 1, got {self.n!r}")
        if not isinstance(self.metric, str) or not self.metric:
            raise ArgumentError(f"KeepBest metric must be a metric's name, got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ArgumentError(f"KeepBest mode must be 'min' or 'max', got {self.mode!r}")

    def __call__(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in best(checkpoints, self.metric, self.mode)[:self.n]}


@dataclass(frozen=True)
class KeepEvery(_Composable):
    """Checkpoints whose step is a multiple of ``steps`` (milestones kept for good)."""

    steps: int

    def __post_init__(self) -> None:
        if type(self.steps) is not int or self.steps < 1:  # not a bool
            raise ArgumentError(f"KeepEvery(steps): steps must be an int >= 1, got {self.steps!r}")

    def __call__(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints if c.step % self.steps == 0}


@dataclass(frozen=True)
class KeepAll(_Composable):
    """Every checkpoint (no retention)."""

    def __call__(self, checkpoints: Sequence[CheckpointInfo]) -> set[int]:
        return {c.step for c in checkpoints}


def metric_value(info: CheckpointInfo, metric: str) -> float | None:
    v = info.metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def best(checkpoints: Sequence[CheckpointInfo], metric: str,
         mode: Literal["min", "max"] = "min") -> list[CheckpointInfo]:
    """The checkpoints that carry ``metric``, best first (ties: the newer first)."""
    if mode not in ("min", "max"):
        raise ArgumentError(f"mode must be 'min' or 'max', got {mode!r}")
    scored = [(v, c) for c in checkpoints if (v := metric_value(c, metric)) is not None]
    sign = 1.0 if mode == "min" else -1.0
    return [c for _, c in sorted(scored, key=lambda vc: (sign * vc[0], -vc[1].step))]


def plan(policy: Policy, checkpoints: Sequence[CheckpointInfo], *,
         protect: Iterable[int] = ()) -> tuple[list[int], list[int]]:
    """(steps to keep, steps to delete), each ascending. The newest checkpoint and the
    ``protect`` steps are always kept, whatever the policy says."""
    steps = sorted(c.step for c in checkpoints)
    keep = _kept(policy, list(checkpoints)) | set(protect)
    if steps:
        keep.add(steps[-1])
    return [s for s in steps if s in keep], [s for s in steps if s not in keep]


def _kept(policy: Policy, checkpoints: list[CheckpointInfo]) -> set[int]:
    """The steps ``policy`` keeps; anything but an iterable of steps (ints) is refused: a
    3.7 or a True taken as a step would keep a checkpoint nobody named, and delete others."""
    said = policy(checkpoints)
    problem = None
    try:
        steps = None if isinstance(said, (str, bytes)) else list(said)
    except TypeError:
        steps = None
    if steps is None:
        problem = f"{type(said).__name__} {said!r:.60}"
    else:
        bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, numbers.Integral)]
        if bad:
            problem = f"{type(bad[0]).__name__} {bad[0]!r:.60} among the steps"
    if problem is not None:
        raise ArgumentError(f"the retention policy {policy!r:.80} returned {problem}: a policy "
                            "returns the steps to keep, an iterable of ints (the .step of the "
                            "CheckpointInfos it is given)")
    return {int(s) for s in steps}  # type: ignore[union-attr]


def gc_min_age_s(now_s: float, started: Iterable[float], margin_s: float) -> float:
    """How old an attempt must be for the gc after retention to take it: ``margin_s`` (clock
    skew between hosts) beyond the start of the oldest save that may still be writing
    (``started``: their wall-clock start times; none: the margin alone). Attempt names carry
    whole milliseconds, rounded down, hence the rounding."""
    starts = list(started)
    if not starts:
        return margin_s
    since = math.floor(min(starts) * 1000) / 1000 - 0.002
    return margin_s + now_s - since
