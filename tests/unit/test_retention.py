"""Retention policies as tables of steps and metrics."""

from __future__ import annotations

import pytest

import dckpt
from dckpt.retention import best, plan

LOSSES = {0: 5.0, 10: 4.0, 20: 6.0, 30: 3.0, 40: 3.5, 50: None, 60: 7.0}


def infos(losses: dict[int, float | None]) -> list[dckpt.CheckpointInfo]:
    return [dckpt.CheckpointInfo(step=s, url="u", created_at=float(s), world_size=1,
                                 metrics={} if v is None else {"loss": v, "acc": -v},
                                 bytes_logical=1, bytes_written=1)
            for s, v in sorted(losses.items())]


@pytest.mark.parametrize("policy, keep", [
    (dckpt.KeepLast(1), [60]),
    (dckpt.KeepLast(3), [40, 50, 60]),
    (dckpt.KeepLast(100), [0, 10, 20, 30, 40, 50, 60]),
    (dckpt.KeepBest(1, "loss"), [30, 60]),  # + the newest, always
    (dckpt.KeepBest(2, "loss", mode="min"), [30, 40, 60]),
    (dckpt.KeepBest(2, "acc", mode="max"), [30, 40, 60]),
    (dckpt.KeepBest(2, "loss", mode="max"), [20, 60]),
    (dckpt.KeepBest(3, "missing"), [60]),
    (dckpt.KeepEvery(20), [0, 20, 40, 60]),
    (dckpt.KeepEvery(25), [0, 50, 60]),
    (dckpt.KeepLast(2) | dckpt.KeepBest(1, "loss"), [30, 50, 60]),
    (dckpt.KeepLast(1) | dckpt.KeepBest(1, "loss") | dckpt.KeepEvery(40), [0, 30, 40, 60]),
    (dckpt.KeepAll(), [0, 10, 20, 30, 40, 50, 60]),
    (lambda cs: [c.step for c in cs if c.step in (10, 20)], [10, 20, 60]),
    (lambda cs: [], [60]),
    (dckpt.KeepLast(1) | (lambda cs: {0}), [0, 60]),
])
def test_policy_table(policy, keep):
    kept, deleted = plan(policy, infos(LOSSES))
    assert kept == keep
    assert deleted == [s for s in sorted(LOSSES) if s not in keep]


def test_protected_steps_and_the_newest_are_never_deleted():
    kept, deleted = plan(dckpt.KeepLast(1), infos(LOSSES), protect=[10, 999])
    assert kept == [10, 60] and 60 not in deleted and 10 not in deleted
    assert plan(dckpt.KeepLast(1), []) == ([], [])


def test_best_orders_by_metric_and_ties_go_to_the_newer():
    ranked = best(infos({1: 2.0, 2: 1.0, 3: 2.0, 4: float("nan"), 5: None}), "loss")
    assert [c.step for c in ranked] == [2, 3, 1]
    assert [c.step for c in best(infos({1: 2.0, 2: 1.0}), "loss", "max")] == [1, 2]


@pytest.mark.parametrize("bad", [lambda: dckpt.KeepLast(0), lambda: dckpt.KeepBest(1, "x", "low"),
                                 lambda: dckpt.KeepEvery(0), lambda: dckpt.KeepLast(1.5)])
def test_bad_policies_are_refused(bad):
    with pytest.raises(ValueError):
        bad()
