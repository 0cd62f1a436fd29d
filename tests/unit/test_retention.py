"""Retention policies as tables of steps and metrics."""

from __future__ import annotations

import re

import numpy
import pytest
import torch

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


@pytest.mark.parametrize("policy, said", [
    (lambda cs: 30, "int 30"),
    (lambda cs: None, "NoneType None"),
    (lambda cs: "30", "str '30'"),
    (lambda cs: [30.5], "float 30.5 among the steps"),  # once kept step 30
    (lambda cs: [True], "bool True among the steps"),  # once kept step 1
    (lambda cs: cs[:1], "CheckpointInfo CheckpointInfo(step=0"),
    (dckpt.KeepLast(1) | (lambda cs: 10), "int 10"),  # in a union
])
def test_a_policy_that_returns_anything_but_steps_is_refused_saying_what_it_returned(
        policy, said):
    with pytest.raises(dckpt.ArgumentError, match=re.escape(f"returned {said}")):
        plan(policy, infos(LOSSES))
    assert plan(lambda cs: (numpy.int64(c.step) for c in cs[:1]), infos(LOSSES))[0] == [0, 60]


def test_the_manager_refuses_a_bad_policy_and_deletes_nothing(tmp_path):
    url = str(tmp_path / "repo")
    mgr = dckpt.CheckpointManager(url, save_every_steps=1, retention=lambda cs: 2.0,
                                  async_save=False, handle_signals=False)
    for step in (1, 2, 3):
        mgr.maybe_save(step, {"w": torch.ones(2)})
    with pytest.raises(dckpt.ArgumentError, match="returned float 2.0: a policy returns the "
                                                  "steps to keep"):
        mgr.apply_retention()
    mgr.close()
    assert [c.step for c in dckpt.list_checkpoints(url)] == [1, 2, 3]


# ---------------------------------------------------------------- the upkeep's reuse of manifests


def test_the_upkeep_decodes_each_manifest_once_and_a_step_saved_anew_is_read_anew(
        tmp_path, monkeypatch):
    """Retention and gc after each commit read every manifest; the upkeep keeps what it
    decoded, by the exact bytes. A step deleted and saved again holds other bytes: gc reads
    the new manifest and keeps its blocks (a stale one would take them), and the upkeep
    keeps no manifest of a checkpoint gone."""
    import threading

    import torch

    from dckpt import decoder, upkeep

    monkeypatch.setattr(upkeep, "GC_MARGIN_S", 0.0)  # gc takes whatever nothing references
    decodes = []
    real = decoder._checked
    monkeypatch.setattr(decoder, "_checked", lambda raw, name: decodes.append(name) or
                        real(raw, name))
    url = str(tmp_path / "repo")
    keeper = upkeep.Upkeep(url, None, dckpt.KeepLast(2), True, lambda: ((), ()))

    def state(step: int, salt: int = 0) -> dict:
        return {"w": torch.full((5000,), float(step + 100 * salt)), "n": step}

    for step in range(1, 5):
        dckpt.save(state(step), url, step=step)
        keeper.apply()
    assert [c.step for c in dckpt.list_checkpoints(url)] == [3, 4]
    before = len(decodes)
    keeper.apply()
    assert len(decodes) == before  # nothing new: nothing decoded
    assert len(keeper._decoded) == 2  # the record of step 2, deleted, gone with its use
    dckpt.delete(url, step=4)
    dckpt.gc(url, min_age_s=0)
    dckpt.save(state(4, salt=1), url, step=4)  # the same step, other values, other blocks
    keeper.apply()
    got = {"w": torch.zeros(5000), "n": 0}
    dckpt.load(got, url, step=4)
    assert torch.equal(got["w"], state(4, salt=1)["w"])
    assert dckpt.verify(url).ok and len(keeper._decoded) == 2
    # another thread decodes as ever, during a run and after it
    seen = []
    with decoder.reusing({}, 1 << 20):
        t = threading.Thread(target=lambda: seen.append(decoder.decode(
            open(f"{url}/manifests/000000000004.json", "rb").read())))
        t.start()
        t.join()
    assert seen and len(decodes) > before + 1


def test_reusing_returns_the_same_manifest_for_the_same_bytes_only(tmp_path):
    import json

    import torch

    from dckpt import decoder
    from dckpt_testing import reseal

    url = str(tmp_path / "repo")
    dckpt.save({"w": torch.ones(10)}, url, step=1)
    raw = open(f"{url}/manifests/000000000001.json", "rb").read()
    doc = json.loads(raw)
    doc["metrics"] = {"loss": 1.0}
    other = reseal(doc)
    damaged = raw.replace(b'"step":1', b'"step":2')
    memo: dict = {}
    with decoder.reusing(memo, 1 << 20):
        a, b = decoder.decode(raw), decoder.decode(raw)
        c = decoder.decode(other)
        for _ in range(2):  # a failure is never kept: raised each time
            with pytest.raises(dckpt.IntegrityError):
                decoder.decode(damaged)
    assert a is b and c is not a and c.metrics == {"loss": 1.0} and a.metrics == {}
    assert len(memo) == 2
    with decoder.reusing(memo, 1 << 20):
        assert decoder.decode(other) is c
    assert len(memo) == 1  # what the last run did not ask for goes
    assert decoder.decode(other) is not c  # outside: decoded anew
    with decoder.reusing(memo, len(raw) - 1):  # too many bytes to keep
        assert decoder.decode(raw) is not decoder.decode(raw)
    outer, inner = {}, {}
    with decoder.reusing(outer, 1 << 20):  # a run within another: each keeps its own
        a = decoder.decode(raw)
        with decoder.reusing(inner, 1 << 20):
            assert decoder.decode(other) is decoder.decode(other)
        assert decoder.decode(raw) is a
    assert len(outer) == 1 and len(inner) == 1
