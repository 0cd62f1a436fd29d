"""Save triggers (dckpt/triggers.py) and the manager's config (dckpt.ManagerConfig): pure
decisions, tested with tables."""

from __future__ import annotations

import math

import pytest

import dckpt
from dckpt.triggers import AnyOf, AtEpochEnd, EverySeconds, EverySteps, Moment, OnImprove, OnPreemption


@pytest.mark.parametrize("trigger, moment, reason", [
    (EverySteps(5), Moment(10), "steps"),
    (EverySteps(5), Moment(0), "steps"),
    (EverySteps(5), Moment(11), None),
    (EverySeconds(2.0), Moment(3, elapsed_s=2.0), "time"),
    (EverySeconds(2.0), Moment(3, elapsed_s=1.9), None),
    (EverySeconds(2.0), Moment(3), None),  # no agreement landed at this call
    (AtEpochEnd(), Moment(3, epoch_end=True), "epoch end"),
    (AtEpochEnd(), Moment(3), None),
    (OnPreemption(), Moment(3, signalled=True), "preemption"),
    (OnPreemption(), Moment(3), None),
    # OnImprove: the first value saves; then only a better one than every earlier save's
    (OnImprove("loss"), Moment(3, metrics={"loss": 1.0}), "improved"),
    (OnImprove("loss"), Moment(3, metrics={"loss": 1.0}, previous=[{"loss": 2.0}]), "improved"),
    (OnImprove("loss"), Moment(3, metrics={"loss": 2.0}, previous=[{"loss": 2.0}]), None),
    (OnImprove("loss"), Moment(3, metrics={"loss": 1.5},
                               previous=[{"loss": 2.0}, {"loss": 1.0}]), None),
    (OnImprove("acc", "max"), Moment(3, metrics={"acc": 0.9}, previous=[{"acc": 0.8}]),
     "improved"),
    (OnImprove("acc", "max"), Moment(3, metrics={"acc": 0.7}, previous=[{"acc": 0.8}]), None),
    (OnImprove("loss"), Moment(3, metrics={"loss": math.nan}), None),
    (OnImprove("loss"), Moment(3, metrics={"loss": "low"}), None),
    (OnImprove("loss"), Moment(3, metrics={"loss": True}), None),
    (OnImprove("loss"), Moment(3, metrics={"other": 1.0}), None),
    # earlier saves without the metric, or with a non-number, do not count
    (OnImprove("loss"), Moment(3, metrics={"loss": 9.0}, previous=[{}, {"loss": None}]),
     "improved"),
])
def test_each_trigger_decides_from_the_moment(trigger, moment, reason):
    assert trigger(moment) == reason


def test_composed_triggers_save_when_any_does_with_the_first_reason():
    both = EverySteps(10) | AtEpochEnd() | OnImprove("loss")
    assert isinstance(both, AnyOf) and len(both.triggers) == 3
    assert both(Moment(10, epoch_end=True)) == "steps"
    assert both(Moment(11, epoch_end=True)) == "epoch end"
    assert both(Moment(11, metrics={"loss": 1.0})) == "improved"
    assert both(Moment(11)) is None
    assert both.watches == frozenset({"loss"}) and not both.agreed
    assert (both | EverySeconds(1.0)).agreed and (OnPreemption() | both).agreed
    assert repr(EverySteps(2) | AtEpochEnd()) == "EverySteps(steps=2) | AtEpochEnd()"


class EveryOther(dckpt.Trigger):
    """A custom trigger: every other call that carries ``"val"`` and improves it."""

    @property
    def watches(self):
        return frozenset({"val"})

    def __call__(self, moment):
        return "custom" if "val" in moment.metrics and moment.step % 2 else None


def test_a_custom_trigger_composes_and_declares_what_it_reads():
    t = EverySteps(100) | EveryOther()
    assert t.watches == {"val"}
    assert t(Moment(3, metrics={"val": 1})) == "custom" and t(Moment(4, metrics={"val": 1})) is None


@pytest.mark.parametrize("make", [
    lambda: EverySteps(0), lambda: EverySteps(True), lambda: EverySteps(2.0),
    lambda: EverySeconds(0.0), lambda: EverySeconds(math.inf), lambda: EverySeconds("1"),
    lambda: OnImprove("loss", "lowest"), lambda: OnImprove(3),
    lambda: AnyOf((EverySteps(1), lambda m: "x")),
    lambda: dckpt.ManagerConfig(trigger=lambda m: "x"),
    lambda: dckpt.ManagerConfig(retention=3), lambda: dckpt.ManagerConfig(gc="yes"),
    lambda: dckpt.ManagerConfig(save=dckpt.LoadConfig()),
    lambda: dckpt.ManagerConfig(storage_options=[1]),
    lambda: dckpt.ManagerConfig.of(save_on_improve="loss"),
    lambda: dckpt.ManagerConfig.of(retention_policy=dckpt.KeepLast(1)),
])
def test_bad_triggers_and_configs_are_refused(make):
    with pytest.raises(dckpt.ArgumentError):
        make()


def test_the_keyword_spelling_builds_the_same_config():
    config = dckpt.ManagerConfig.of(save_every_steps=50, save_every_seconds=60.0,
                                    save_at_epoch_end=True, save_on_improve=("val", "min"),
                                    retention=dckpt.KeepLast(2), async_save=False)
    assert config.trigger == (EverySteps(50) | AtEpochEnd() | EverySeconds(60.0)
                              | OnImprove("val", "min"))
    assert config.retention == dckpt.KeepLast(2) and not config.async_save
    assert config.save == dckpt.SaveConfig() and config.load == dckpt.LoadConfig()
    assert dckpt.ManagerConfig.of() == dckpt.ManagerConfig()
    with pytest.raises(AttributeError):
        config.gc = False  # type: ignore[misc]  # frozen


def test_the_manager_takes_a_config_or_its_keywords_not_both(tmp_path):
    config = dckpt.ManagerConfig(trigger=EverySteps(2), handle_signals=False)
    mgr = dckpt.CheckpointManager(str(tmp_path), config)
    assert mgr.config is config and mgr.trigger == EverySteps(2)
    mgr.close()
    with pytest.raises(dckpt.ArgumentError, match="not both"):
        dckpt.CheckpointManager(str(tmp_path), config, save_every_steps=3)
    with pytest.raises(dckpt.ArgumentError, match="not both"):
        dckpt.CheckpointManager(str(tmp_path), {"trigger": None})  # type: ignore[arg-type]
    signals = dckpt.CheckpointManager(str(tmp_path), save_every_steps=2)
    assert signals.trigger == OnPreemption() | EverySteps(2)  # preemption decides first
    signals.close()
