"""CheckpointManager and TrainState in one process: triggers, retention, preemption, restore."""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest
import torch

import dckpt
from dckpt import upkeep as upkeep_module


def make_train(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    extra = {"epoch": 0, "tag": "", "seen": []}
    return model, opt, sched, extra, {"app": dckpt.TrainState(model, opt, scheduler=sched,
                                                              extra=extra)}


def train_step(model, opt, sched) -> float:
    loss = model(torch.randn(3, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def steps_of(url) -> list[int]:
    return [c.step for c in dckpt.list_checkpoints(url)]


def test_train_state_round_trip_with_random_states(tmp_path):
    model, opt, sched, extra, state = make_train()
    for _ in range(3):
        train_step(model, opt, sched)
    extra.update(epoch=3, tag="warm", seen=[1.5, 2.5])
    dckpt.save(state, str(tmp_path), step=3)
    expected = (torch.rand(4), np.random.rand(4), random.random(),
                {k: v.clone() for k, v in model.state_dict().items()},
                opt.state_dict()["state"][0]["exp_avg"].clone(), sched.last_epoch)

    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    model2, opt2, sched2, extra2, state2 = make_train(seed=5)
    dckpt.load(state2, str(tmp_path))
    assert torch.equal(torch.rand(4), expected[0])  # the random streams continue
    assert np.array_equal(np.random.rand(4), expected[1])
    assert random.random() == expected[2]
    assert all(torch.equal(v, expected[3][k]) for k, v in model2.state_dict().items())
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], expected[4])
    assert sched2.last_epoch == expected[5] == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert extra2 == {"epoch": 3, "tag": "warm", "seen": [1.5, 2.5]}


def test_train_state_with_a_list_of_models_and_optimizers(tmp_path):
    """A GAN's two models and two optimizers: one TrainState, keys 0. and 1., all restored."""
    def pair(seed: int):
        torch.manual_seed(seed)
        models = [torch.nn.Linear(4, 3), torch.nn.Linear(3, 4)]
        return models, [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]

    models, opts = pair(0)
    for m, o in zip(models, opts):
        m(torch.randn(2, m.in_features)).sum().backward()
        o.step()
    dckpt.save({"app": dckpt.TrainState(models, opts, rng=False)}, str(tmp_path), step=1)
    assert {k.split(".")[2] for k in dckpt.inspect(str(tmp_path)).items
            if k.startswith("app.model.")} == {"0", "1"}
    models2, opts2 = pair(1)
    dckpt.load({"app": dckpt.TrainState(models2, opts2, rng=False)}, str(tmp_path))
    for a, b in zip(models + opts, models2 + opts2):
        sa, sb = a.state_dict(), b.state_dict()
        if isinstance(a, torch.nn.Module):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
        else:
            assert all(torch.equal(sa["state"][0][k], sb["state"][0][k]) for k in sa["state"][0])


def test_train_state_without_rng_and_bad_parts():
    model, opt, *_ = make_train()
    sd = dckpt.TrainState(model, opt, rng=False).state_dict()
    assert "rng" not in sd and set(sd) == {"model", "optim"}
    with pytest.raises(TypeError, match="scheduler"):
        dckpt.TrainState(model, opt, scheduler=object())
    with pytest.raises(TypeError, match="extra"):
        dckpt.TrainState(model, extra=[1])


@pytest.mark.parametrize("kind", [float, torch.tensor, np.float32])
def test_step_epoch_and_improve_triggers(tmp_path, kind):
    """The metric as a number, a one-element tensor (``loss``, not ``loss.item()``), or a
    numpy number: the same saves, stored as Python numbers."""
    model, opt, sched, _, state = make_train()
    seen = []
    mgr = dckpt.CheckpointManager(str(tmp_path), save_every_steps=4, save_at_epoch_end=True,
                                  save_on_improve=("val", "min"), async_save=False,
                                  on_save=lambda info: seen.append(info.step))
    val = {5: 3.0, 6: 2.0, 7: 2.5, 9: 1.0, 10: 1.0}
    for step in range(12):
        train_step(model, opt, sched)
        metrics = {"val": kind(val[step])} if step in val else None
        mgr.maybe_save(step, state, metrics, epoch_end=step == 10)
    mgr.close()
    # steps 0, 4, 8; improvements at 5 (first), 6, 9; epoch end at 10; 7 and 10's val no better
    assert steps_of(str(tmp_path)) == [0, 4, 5, 6, 8, 9, 10] == seen
    infos = {c.step: c for c in dckpt.list_checkpoints(str(tmp_path))}
    assert infos[9].metrics == {"val": 1.0} and type(infos[9].metrics["val"]) is float


def test_time_trigger(tmp_path):
    model, opt, sched, _, state = make_train()
    mgr = dckpt.CheckpointManager(str(tmp_path), save_every_seconds=0.25, async_save=False)
    saved_at = []
    t0 = time.monotonic()
    for step in range(30):
        train_step(model, opt, sched)
        called = time.monotonic() - t0
        if mgr.maybe_save(step, state) is not None:
            saved_at.append(called)
        time.sleep(0.03)
    elapsed = time.monotonic() - t0
    mgr.close()
    steps = steps_of(str(tmp_path))
    # ~0.9 s of training on an idle machine (longer on a loaded one), one save per 0.25 s
    # at most
    assert 2 <= len(steps) <= int(elapsed / 0.25) + 1, (steps, elapsed)
    # the period runs from the start of one save to the start of the next (the manager's
    # clock starts before the save, the test's just before the call; 5 ms covers the gap)
    gaps = np.diff([0.0, *saved_at])
    assert all(g >= 0.245 for g in gaps), gaps


def test_async_saves_retention_and_gc(tmp_path, monkeypatch):
    monkeypatch.setattr(upkeep_module, "GC_MARGIN_S", 0.0)
    url = str(tmp_path)
    model, opt, sched, _, state = make_train()
    written = []
    mgr = dckpt.CheckpointManager(url, save_every_steps=2, retention=dckpt.KeepLast(2),
                                  handle_signals=False,
                                  on_save=lambda info: written.append(info.bytes_written))
    handles = []
    for step in range(9):
        train_step(model, opt, sched)
        h = mgr.maybe_save(step, state)
        if h is not None:
            assert isinstance(h, dckpt.SaveHandle)
            handles.append(h.step)
    mgr.close()
    assert handles == [0, 2, 4, 6, 8] and mgr.saves == 5
    assert steps_of(url) == [6, 8]
    report = mgr.apply_retention(dry_run=True)
    assert report.kept == (6, 8) and report.deleted == () and report.gc.deleted == ()
    assert dckpt.verify(url, all_steps=True).ok
    # gc removed the deleted checkpoints' segments that the kept ones do not reference
    data = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "data") for f in fs]
    assert len(written) == 5 and len(data) < 5
    assert sum(os.path.getsize(f) for f in data) < sum(written)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    model2, opt2, sched2, _, state2 = make_train(seed=3)
    mgr2 = dckpt.CheckpointManager(url, handle_signals=False)
    info = mgr2.restore(state2)
    mgr2.close()
    assert info.step == 8 and mgr2.recoveries >= 1
    assert all(torch.equal(v, final[k]) for k, v in model2.state_dict().items())


def test_restore_fresh_chosen_and_best(tmp_path):
    url = str(tmp_path)
    model, opt, sched, _, state = make_train()
    mgr = dckpt.CheckpointManager(url, save_every_steps=1, async_save=False, handle_signals=False)
    assert mgr.restore(state) is None
    weights = {}
    for step, loss in enumerate([3.0, 1.0, 2.0]):
        train_step(model, opt, sched)
        mgr.maybe_save(step, state, {"loss": loss})
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    mgr.close()
    assert mgr.best("loss").step == 1 and mgr.best("loss", "max").step == 0
    for kwargs, expect in (({}, 2), ({"step": 0}, 0), ({"best_metric": ("loss", "min")}, 1)):
        model2, opt2, sched2, _, state2 = make_train(seed=9)
        m = dckpt.CheckpointManager(url, handle_signals=False)
        restored = []
        m.on_restore = lambda info: restored.append(info.step)
        assert m.restore(state2, **kwargs).step == expect == restored[0]
        assert all(torch.equal(v, weights[expect][k]) for k, v in model2.state_dict().items())
        m.close()
    with pytest.raises(dckpt.CheckpointNotFoundError):
        dckpt.CheckpointManager(url, handle_signals=False).restore(state, step=7)
    with pytest.raises(dckpt.CheckpointNotFoundError, match="metric"):
        dckpt.CheckpointManager(url, handle_signals=False).restore(
            state, best_metric=("nope", "min"))


def test_failed_save_is_reported_and_training_goes_on(tmp_path):
    url = str(tmp_path)
    model, opt, sched, _, state = make_train()
    dckpt.save(state, url, step=4)  # a step the manager will try to save again
    failures = []
    mgr = dckpt.CheckpointManager(url, save_every_steps=4, handle_signals=False,
                                  on_failure=lambda step, e: failures.append((step, type(e))))
    for step in range(9):
        train_step(model, opt, sched)
        mgr.maybe_save(step, state)
    mgr.close()
    assert failures == [(4, dckpt.CheckpointExistsError)]
    assert [s for s, _ in mgr.failures] == [4]
    assert steps_of(url) == [0, 4, 8]


@pytest.mark.parametrize("how", ["damaged", "quarantined"])
@pytest.mark.parametrize("async_save", [False, True])
def test_a_step_the_restore_passed_over_is_saved_again_when_the_run_redoes_it(tmp_path, how,
                                                                             async_save):
    """The restore falls back past a damaged newest checkpoint, and the run trains those
    steps again: its save of that step met the committed (damaged) one and failed, and the
    run had no checkpoint of it. Now the restore's skipped step is deleted first (only it:
    a sound checkpoint the run meets again still fails, test above)."""
    from dckpt_testing import flip_stored_byte

    url = str(tmp_path)

    def run(upto: int) -> tuple[dckpt.CheckpointManager, dict]:
        mgr = dckpt.CheckpointManager(url, save_every_steps=2, async_save=async_save,
                                      handle_signals=False)
        state = {"w": torch.zeros(1024)}
        info = mgr.restore(state)
        for step in range(info.step + 1 if info else 0, upto + 1):
            state["w"] += step
            mgr.maybe_save(step, state)
        mgr.close()
        return mgr, state

    _, at6 = run(6)
    flip_stored_byte(url, 6, "w", at=10)
    if how == "quarantined":  # the restore skips it at once, for the mark
        assert not dckpt.verify(url, step=6, quarantine=True).ok
    mgr, _ = run(8)
    assert mgr.restored.step == 4 and [s for s, _ in mgr.restored.skipped] == [6]
    assert ("quarantined by verify" in mgr.restored.skipped[0][1]) is (how == "quarantined")
    assert mgr.failures == []
    assert steps_of(url) == [0, 2, 4, 6, 8]
    assert [c.quarantined for c in dckpt.list_checkpoints(url)] == [None] * 5  # mark gone
    assert dckpt.verify(url, all_steps=True).ok
    again = {"w": torch.zeros(1024)}
    dckpt.load(again, url, step=6)
    assert torch.equal(again["w"], at6["w"])  # the run redid steps 5 and 6 alike


def test_a_failed_saves_reason_names_the_problem(tmp_path):
    mgr = dckpt.CheckpointManager(str(tmp_path), save_every_steps=1, async_save=False,
                                  handle_signals=False)
    mgr.maybe_save(1, {"w": torch.eye(3).to_sparse()})
    mgr.close()
    [(step, reason)] = mgr.failures
    assert step == 1 and reason.endswith(
        "the state dict cannot be saved (1 problem): - w: layout torch.sparse_coo is not "
        "supported; convert it to a dense (strided) tensor")


@pytest.mark.parametrize("async_save", [False, True])
def test_a_relaunch_that_never_restored_is_told_to(tmp_path, async_save):
    """A relaunch that trains from step 0 again over its checkpoints: every save meets a
    committed step, and the reason says what was forgotten (not so once restore ran)."""
    url = str(tmp_path)
    state = {"w": torch.ones(2)}
    dckpt.save(state, url, step=0)
    for restore in (False, True):
        mgr = dckpt.CheckpointManager(url, save_every_steps=1, async_save=async_save,
                                      handle_signals=False)
        if restore:
            mgr.restore(state)
            dckpt.save(state, url, step=1)  # another writer took the step: no hint then
        mgr.maybe_save(1 if restore else 0, state)
        mgr.close()
        [(step, reason)] = mgr.failures
        assert "is already committed" in reason
        assert ("mgr.restore(state) before its first maybe_save" in reason) is not restore


def test_preemption_signal_without_exit(tmp_path):
    url = str(tmp_path)
    model, opt, sched, _, state = make_train()
    mgr = dckpt.CheckpointManager(url, save_every_steps=10, exit_on_preemption=False)
    try:
        for step in range(30):
            train_step(model, opt, sched)
            if step == 13:
                os.kill(os.getpid(), signal.SIGUSR1)
            mgr.maybe_save(step, state)
            if mgr.preempted:
                break
    finally:
        mgr.close()
    assert step == 13 and steps_of(url) == [0, 10, 13]
    assert signal.getsignal(signal.SIGUSR1) is not mgr._signals.on_signal  # handlers put back
    # closed: no save starts that nothing would wait for (save() went on, async, before)
    for call in (mgr.maybe_save, mgr.save):
        with pytest.raises(dckpt.DckptError, match=rf"\.{call.__name__} at step 14 after close"):
            call(14, state)
    assert steps_of(url) == [0, 10, 13]


def test_a_preemptions_exit_does_not_wait_for_retention_and_gc(tmp_path, monkeypatch):
    """The grace period is for the emergency checkpoint. The exit waited for a whole pass of
    retention and gc (on a slow store, minutes: one request per delete and per data
    folder), past the grace period; now the pass stops at its next step, and the next run
    resumes it."""
    from dckpt import catalog

    url = str(tmp_path)
    state = {"w": torch.zeros(64)}
    for step in range(6):  # old checkpoints for the retention to delete
        dckpt.save(state, url, step=step)
    slow = catalog.delete

    def delete(*args, **kwargs):
        time.sleep(1.0)  # a store that answers slowly
        return slow(*args, **kwargs)

    monkeypatch.setattr(catalog, "delete", delete)
    mgr = dckpt.CheckpointManager(url, save_every_steps=10, async_save=False,
                                  retention=dckpt.KeepLast(1), handle_signals=True)
    mgr.restore(state)
    mgr.maybe_save(10, state)  # its retention starts: 6 deletes, 1 s each
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)
    begin = time.monotonic()
    with pytest.raises(SystemExit):
        mgr.maybe_save(11, state)  # the emergency checkpoint, then the exit
    took = time.monotonic() - begin
    assert took < 3.0, took  # the delete in progress, not the rest (6 s and more)
    steps = steps_of(url)
    assert 11 in steps and 10 in steps and len(steps) > 2  # retention stopped part way
    monkeypatch.setattr(catalog, "delete", slow)
    mgr = dckpt.CheckpointManager(url, save_every_steps=1, async_save=False,
                                  retention=dckpt.KeepLast(1), handle_signals=False)
    assert mgr.restore(state).step == 11
    mgr.maybe_save(12, state)
    mgr.close()  # a clean end waits for its retention
    assert steps_of(url) == [12]


def test_preemption_saves_then_chains_to_the_previous_handler(tmp_path):
    url = str(tmp_path)
    model, opt, sched, _, state = make_train()
    calls = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(
        (signum, steps_of(url))))
    try:
        mgr = dckpt.CheckpointManager(url, save_every_steps=5)
        with pytest.raises(SystemExit) as exc:
            for step in range(20):
                train_step(model, opt, sched)
                if step == 7:
                    os.kill(os.getpid(), signal.SIGTERM)
                mgr.maybe_save(step, state)
        assert exc.value.code == 128 + signal.SIGTERM
        # the previous handler ran after the emergency checkpoint of step 7 committed
        assert calls == [(signal.SIGTERM, [0, 5, 7])] and mgr.preempted
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.parametrize("kwargs", [{"save_every_steps": 0}, {"save_every_seconds": -1.0},
                                    {"save_on_improve": ("loss", "lowest")},
                                    {"save_on_improve": "loss"}])
def test_bad_arguments_are_refused(tmp_path, kwargs):
    with pytest.raises(dckpt.ArgumentError):
        dckpt.CheckpointManager(str(tmp_path), **kwargs)
    with pytest.raises(dckpt.ArgumentError, match="retention must be a policy"):
        dckpt.CheckpointManager(str(tmp_path), retention=3)


def test_pipeline_progress_round_trip_and_status(tmp_path, capsys):
    from dckpt.cli import main as cli

    url = str(tmp_path)
    pipe = dckpt.Pipeline(["a", "b", "c"])
    stages = iter(pipe)
    assert next(stages) == "a" and pipe.current == "a" and not pipe.resuming
    pipe.finish("a", loss=0.5)
    assert next(stages) == "b"
    pipe.step = 7
    model, opt, sched, _, state = make_train()
    dckpt.save({"pipeline": pipe, **state}, url, step=107)

    again = dckpt.Pipeline(["a", "b", "c"])
    dckpt.load({"pipeline": again}, url, partial=True)
    assert again.done == ["a"] and again.results == {"a": {"loss": 0.5}}
    order = []
    for stage in again:
        order.append((stage, again.resuming, again.step))
        if stage == "b":
            again.finish("b", loss=0.25)
    assert order == [("b", True, 7), ("c", False, -1)]
    assert again.done == ["a", "b", "c"] and again.results["b"] == {"loss": 0.25}

    st = dckpt.status(url)
    assert st.newest.step == 107 and st.checkpoints == 1 and 0 <= st.newest_age_s < 60
    assert st.pipeline["done"] == ["a"] and st.pipeline["current"] == "b"
    assert cli(["status", url]) == 0
    out = capsys.readouterr().out
    assert "1 of 3 stages done" in out and "running   b  at step 7" in out
    assert "done      a  loss=0.5" in out and "pending   c" in out


def test_status_exit_code_without_a_usable_checkpoint(tmp_path, capsys):
    from dckpt.cli import main as cli

    url = str(tmp_path)
    _, _, _, _, state = make_train()
    dckpt.save(state, url, step=1)
    dckpt.delete(url, step=1)
    assert cli(["status", url, "--json"]) == 1
    assert '"healthy": false' in capsys.readouterr().out
    assert cli(["status", str(tmp_path / "nothing")]) == 1  # empty: nothing to restart from
    assert "checkpoints 0" in capsys.readouterr().out


def test_pipeline_refuses_bad_stages():
    with pytest.raises(ValueError):
        dckpt.Pipeline([])
    with pytest.raises(ValueError):
        dckpt.Pipeline(["a", "a"])
    with pytest.raises(ValueError, match="unknown stage"):
        dckpt.Pipeline(["a"]).finish("b")


def test_gc_after_retention_spares_every_save_that_may_still_be_writing(tmp_path, monkeypatch):
    from dckpt import layout

    monkeypatch.setattr(upkeep_module, "GC_MARGIN_S", 0.0)
    url = str(tmp_path)
    _, _, _, _, state = make_train()
    mgr = dckpt.CheckpointManager(url, retention=dckpt.KeepLast(1), handle_signals=False)
    mgr.save(0, state)
    mgr.wait()
    # two saves not yet committed: one writing, one queued behind it (started later)
    mgr._started = {5: time.time(), 7: time.time() + 0.5}
    writing = tmp_path / "data" / layout.new_attempt(5) / "r00000-000.seg"
    writing.parent.mkdir(parents=True)
    writing.write_bytes(b"x" * 100)
    report = mgr.apply_retention()
    assert writing.exists() and report.gc.deleted == ()
    mgr._started = {}  # the save ended without a commit: its data is garbage now
    report = mgr.apply_retention()
    assert not writing.exists() and len(report.gc.deleted) == 1
    mgr.close()
    assert dckpt.verify(url).ok
