"""Save triggers: when the CheckpointManager saves (pure decisions).

A trigger looks at the ``Moment`` of one ``maybe_save`` call and returns why to save, or
None. The manager makes the moment the same on every rank, so every rank decides alike:
step and epoch facts are the same by construction, the watched metrics are rank 0's
(broadcast), and the rank-local facts (seconds since the last save, a preemption signal)
come from the ranks' agreement exchange (``dist.Agreement``).

``EverySteps``, ``EverySeconds``, ``AtEpochEnd``, ``OnImprove`` and ``OnPreemption`` are the
usual ones; ``a | b`` saves when either says so (the first reason wins). A custom trigger
subclasses ``Trigger`` and declares what it needs: ``watches`` (metrics to broadcast) and
``agreed`` (whether it reads the exchanged facts).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from dckpt.errors import ArgumentError

__all__ = ["Moment", "Trigger", "EverySteps", "EverySeconds", "AtEpochEnd", "OnImprove",
           "OnPreemption", "AnyOf"]


@dataclass(frozen=True)
class Moment:
    """One ``maybe_save`` call, as every rank sees it."""

    step: int
    epoch_end: bool = False
    metrics: Mapping[str, object] = field(default_factory=dict)
    """Rank 0's values of the watched metrics this call carries."""
    elapsed_s: float | None = None
    """The most seconds since the last save over the ranks, where an exchange landed at this
    call and started after the latest save; None otherwise."""
    signalled: bool = False
    """A preemption signal reached some rank (agreed)."""
    previous: Sequence[Mapping[str, object]] = ()
    """The watched metrics (rank 0's) of the saves this manager started, oldest first."""


class Trigger:
    """Why to save at a moment (a reason such as ``"steps"``), or None."""

    @property
    def watches(self) -> frozenset[str]:
        """Metrics it reads: rank 0's values are broadcast at the calls carrying them."""
        return frozenset()

    @property
    def agreed(self) -> bool:
        """Whether it reads ``elapsed_s`` or ``signalled``, which need the agreement."""
        return False

    def __call__(self, moment: Moment) -> str | None:
        raise NotImplementedError

    def __or__(self, other: Trigger) -> AnyOf:
        return AnyOf((self, _trigger(other)))

    def __ror__(self, other: Trigger) -> AnyOf:
        return AnyOf((_trigger(other), self))


def _trigger(other: object) -> Trigger:
    if not isinstance(other, Trigger):
        raise ArgumentError(f"a trigger composes with triggers (EverySteps, EverySeconds, "
                            f"AtEpochEnd, OnImprove, OnPreemption), not "
                            f"{type(other).__name__} {other!r}")
    return other


@dataclass(frozen=True)
class AnyOf(Trigger):
    """Saves when any of ``triggers`` says so, with the first one's reason."""

    triggers: tuple[Trigger, ...]

    def __post_init__(self) -> None:
        for t in self.triggers:
            if not isinstance(t, Trigger):
                raise ArgumentError(f"a trigger must be a dckpt.Trigger, got {t!r}")

    @property
    def watches(self) -> frozenset[str]:
        return frozenset().union(*(t.watches for t in self.triggers))

    @property
    def agreed(self) -> bool:
        return any(t.agreed for t in self.triggers)

    def __call__(self, moment: Moment) -> str | None:
        for t in self.triggers:
            reason = t(moment)
            if reason is not None:
                return reason
        return None

    def __or__(self, other: Trigger) -> AnyOf:
        return AnyOf((*self.triggers, _trigger(other)))

    def __repr__(self) -> str:
        return " | ".join(map(repr, self.triggers))


@dataclass(frozen=True)
class EverySteps(Trigger):
    """At the steps where ``step % steps == 0``."""

    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ArgumentError(f"save_every_steps must be an int >= 1, got {self.steps!r}")

    def __call__(self, moment: Moment) -> str | None:
        return "steps" if moment.step % self.steps == 0 else None


@dataclass(frozen=True)
class EverySeconds(Trigger):
    """When ``seconds`` have passed since the last save on some rank (agreed)."""

    seconds: float

    @property
    def agreed(self) -> bool:
        return True

    def __post_init__(self) -> None:
        if (isinstance(self.seconds, bool) or not isinstance(self.seconds, (int, float))
                or not (self.seconds > 0 and math.isfinite(self.seconds))):
            raise ArgumentError(f"save_every_seconds must be a number > 0, got "
                                f"{self.seconds!r}")

    def __call__(self, moment: Moment) -> str | None:
        return ("time" if moment.elapsed_s is not None and moment.elapsed_s >= self.seconds
                else None)


@dataclass(frozen=True)
class AtEpochEnd(Trigger):
    """At calls with ``epoch_end=True``."""

    def __call__(self, moment: Moment) -> str | None:
        return "epoch end" if moment.epoch_end else None


def _finite(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class OnImprove(Trigger):
    """At calls whose ``metric`` (rank 0's) beats its value at every earlier save of this
    manager (``mode="min"``: lower is better); the first value seen saves. Calls without a
    finite number for it do not save."""

    metric: str
    mode: Literal["min", "max"] = "min"

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric or self.mode not in ("min", "max"):
            raise ArgumentError("save_on_improve must be (metric, 'min' | 'max'), got "
                                f"({self.metric!r}, {self.mode!r})")

    @property
    def watches(self) -> frozenset[str]:
        return frozenset({self.metric})

    def __call__(self, moment: Moment) -> str | None:
        value = _finite(moment.metrics.get(self.metric))
        if value is None:
            return None
        seen = [v for p in moment.previous if (v := _finite(p.get(self.metric))) is not None]
        if not seen:
            return "improved"
        best = min(seen) if self.mode == "min" else max(seen)
        return "improved" if (value < best if self.mode == "min" else value > best) else None


@dataclass(frozen=True)
class OnPreemption(Trigger):
    """When a preemption signal (SIGTERM, SIGUSR1) reached some rank: the manager's
    emergency checkpoint."""

    @property
    def agreed(self) -> bool:
        return True

    def __call__(self, moment: Moment) -> str | None:
        return "preemption" if moment.signalled else None


_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def describe(trigger: Trigger | None) -> str:
    """A trigger's text, the same on every rank whose trigger decides alike: its repr (a
    dataclass's fields) without object addresses, and what it reads."""
    if trigger is None:
        return "none"
    watches = f", watches {sorted(trigger.watches)}" if trigger.watches else ""
    return f"{_ADDRESS.sub('', repr(trigger))}{watches}"

