"""CheckpointManager on real gloo ranks: ranks agree on time triggers and on a signal that
reached one rank; TrainState's per-rank random states across a change of world size."""

from __future__ import annotations

import os
import signal
import time

import torch

import dckpt
from dckpt_testing import run_ranks


def _model_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, {"app": dckpt.TrainState(model, opt)}


def _time_trigger(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.05
    model, opt, state = _model_state()
    mgr = dckpt.CheckpointManager(url, save_every_seconds=0.3, async_save=False)
    saved = []
    t0 = time.monotonic()
    for step in range(60):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        if mgr.maybe_save(step, state) is not None:
            saved.append(step)
        time.sleep(0.01 + 0.01 * rank)  # the ranks' clocks run apart between saves
        torch.distributed.barrier()  # ... and the training keeps them in step
    elapsed = time.monotonic() - t0
    mgr.close()
    return saved, elapsed


def test_ranks_agree_on_the_time_trigger(tmp_path):
    url = str(tmp_path / "ckpt")
    (saved, elapsed), (other, _) = [o.value for o in run_ranks(_time_trigger, 2, url)]
    # at least 0.3 s apart (and the first save early): as many as the loop's time allows
    assert saved == other and 2 <= len(saved) <= elapsed / 0.3 + 1, (saved, elapsed)
    assert [c.step for c in dckpt.list_checkpoints(url)] == saved


def _signal_on_one_rank(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.02
    model, opt, state = _model_state()
    mgr = dckpt.CheckpointManager(url, save_every_steps=100, exit_on_preemption=False)
    step = -1
    for step in range(200):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        if rank == world - 1 and step == 10:
            os.kill(os.getpid(), signal.SIGUSR1)
        mgr.maybe_save(step, state)
        if mgr.preempted:
            break
        time.sleep(0.005)
    mgr.close()
    return step


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    url = str(tmp_path / "ckpt")
    steps = [o.value for o in run_ranks(_signal_on_one_rank, 3, url)]
    assert len(set(steps)) == 1 and 10 < steps[0] < 100, steps
    infos = dckpt.list_checkpoints(url)
    assert [c.step for c in infos] == [0, steps[0]] and infos[-1].world_size == 3


def _rng_save(rank, world, url):
    _, _, state = _model_state()
    torch.manual_seed(100 + rank)
    dckpt.save(state, url, step=1)
    return torch.rand(3).tolist()


def _rng_load(rank, world, url):
    _, _, state = _model_state()
    torch.manual_seed(7)
    dckpt.load(state, url)
    return torch.rand(3).tolist()


def test_random_states_per_rank_across_world_sizes(tmp_path):
    url = str(tmp_path / "ckpt")
    after_save = [o.value for o in run_ranks(_rng_save, 3, url)]
    assert after_save[0] != after_save[1]
    shrunk = [o.value for o in run_ranks(_rng_load, 2, url)]
    assert shrunk == after_save[:2]  # each rank continues its own stream
    grown = [o.value for o in run_ranks(_rng_load, 4, url)]
    assert grown[:3] == after_save
    torch.manual_seed(7)
    assert grown[3] == torch.rand(3).tolist()  # no state saved for rank 3: its own kept


def _improve(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.0  # an exchange in flight at every call, beside the broadcasts
    model, opt, state = _model_state()
    mgr = dckpt.CheckpointManager(url, save_on_improve=("val", "min"), async_save=False)
    saved = []
    vals = {3: 5.0, 6: 4.0, 9: 4.5, 12: 1.0}
    for step in range(15):
        opt.step()
        metrics = {"val": vals[step] + rank} if step in vals else None  # rank 0's decides
        if mgr.maybe_save(step, state, metrics) is not None:
            saved.append(step)
    mgr.close()
    return saved


def test_ranks_agree_on_the_metric_trigger(tmp_path):
    url = str(tmp_path / "ckpt")
    saved = [o.value for o in run_ranks(_improve, 2, url)]
    assert saved == [[3, 6, 12]] * 2
    assert [c.metrics["val"] for c in dckpt.list_checkpoints(url)] == [5.0, 4.0, 1.0]


class _EveryOther(dckpt.Trigger):
    """A user's trigger, no dataclass: its repr names its address, which differs per rank."""

    def __call__(self, moment):
        return "mine" if moment.step % 2 == 0 else None


_SHM = "<shm>"  # the test's memory folder
# (what differs, how rank r makes its manager, the line the refusal must hold)
_DIFFERENT = [
    ("steps", lambda r: {"save_every_steps": 3 if r == 1 else 2},
     "triggers: OnPreemption() | EverySteps(steps=2) on ranks 0, 2; "
     "OnPreemption() | EverySteps(steps=3) on rank 1"),
    ("async", lambda r: {"save_every_steps": 2, "async_save": r != 2},
     "async_save: True on ranks 0-1; False on rank 2"),
    ("seconds", lambda r: {"save_every_steps": 2, **({"save_every_seconds": 9.0} if r == 0
                                                    else {})},
     "EverySeconds(seconds=9.0) on rank 0;"),
    ("signals", lambda r: {"save_every_steps": 2, "handle_signals": r != 1},
     "triggers: OnPreemption() | EverySteps(steps=2) on ranks 0, 2; EverySteps(steps=2) on rank 1"),
    ("exit", lambda r: {"exit_on_preemption": r == 0}, "exit_on_preemption: True on rank 0;"),
    ("if_busy", lambda r: {"save_config": dckpt.SaveConfig(if_busy="skip" if r else "wait")},
     "if_busy: 'wait' on rank 0; 'skip' on ranks 1-2"),
    ("memory", lambda r: {"memory_every_steps": 2 if r < 2 else 4},
     "memory_every_steps: EverySteps(steps=2) on ranks 0-1; EverySteps(steps=4) on rank 2"),
    ("replicas", lambda r: {"memory_every_steps": 2, "memory_replicas": r % 2},
     "memory_replicas: 0 on ranks 0, 2; 1 on rank 1"),
    ("memory folder", lambda r: {"memory_every_steps": 2, "memory_dir": _SHM + f"/{r}"},
     "the ranks of node 0 name different memory tier folders"),
]


def _managers_made_apart(rank, world, url, shm):
    state = {"w": torch.arange(4.0)}
    os.makedirs(f"{shm}/{rank}")
    timeout = dckpt.SaveConfig(collective_timeout_s=60.0)
    refused = {}
    for name, spell, _ in _DIFFERENT:
        kwargs = {"save_config": timeout, "memory_dir": shm,
                  "retention": dckpt.KeepLast(1 + rank),
                  **{k: v.replace(_SHM, shm) if isinstance(v, str) else v
                     for k, v in spell(rank).items()}}
        t0 = time.monotonic()
        try:
            dckpt.CheckpointManager(f"{url}-{name}", **kwargs)
            refused[name] = None
        except dckpt.DckptError as e:
            refused[name] = (type(e).__name__, str(e), time.monotonic() - t0)
    # what may differ: retention (rank 0's applies), a user's trigger instance, the staging
    # budget, the timeouts; that manager saves on every rank
    alike = dckpt.CheckpointManager(url, dckpt.ManagerConfig(
        trigger=_EveryOther(), async_save=False, memory_trigger=dckpt.EverySteps(1),
        memory_dir=shm, retention=dckpt.KeepLast(1 + rank),
        save=dckpt.SaveConfig(staging_bytes=(1 + rank) << 20, collective_timeout_s=60.0 + rank),
        load=dckpt.LoadConfig(collective_timeout_s=9.0 + rank)))
    for step in range(1, 5):
        alike.maybe_save(step, state)
    alike.close()
    return refused, alike.failures, alike.memory is not None and alike.memory.step


def test_managers_made_with_different_arguments_are_refused_at_once_on_every_rank(tmp_path):
    url = str(tmp_path / "ckpt")
    ranks = [o.value for o in run_ranks(_managers_made_apart, 3, url, str(tmp_path / "shm"))]
    refused = [r for r, _, _ in ranks]
    assert [(failures, memory_step) for _, failures, memory_step in ranks] == [([], 4)] * 3
    for name, _, line in _DIFFERENT:
        kind, message, seconds = refused[0][name]
        assert kind == "ArgumentError" and line in message, (name, message)
        assert all(r[name][:2] == (kind, message) for r in refused), name  # every rank alike
        assert max(r[name][2] for r in refused) < 30, name  # not after the 60 s timeout
        assert not os.path.exists(f"{url}-{name}"), name  # nothing written
    assert [c.step for c in dckpt.list_checkpoints(url)] == [4]  # KeepLast(1), rank 0's


def _a_peer_dies(rank, world, url):
    from dckpt import manager

    manager.AGREE_INTERVAL_S = 0.0  # an exchange at every call
    state = {"w": torch.arange(4.0)}
    config = dckpt.SaveConfig(collective_timeout_s=5.0)
    if rank == 1:
        mgr = dckpt.CheckpointManager(url, save_every_steps=100, save_config=config)
        for step in range(3):
            mgr.maybe_save(step, state)
        os._exit(0)  # gone, with an exchange in flight
    t0 = time.monotonic()
    try:
        with dckpt.CheckpointManager(url, save_every_steps=100, save_config=config) as mgr:
            for step in range(100):
                mgr.maybe_save(step, state)
    except Exception as e:  # noqa: BLE001 - what the user's code sees
        return type(e).__name__, isinstance(e, dckpt.DckptError), str(e), time.monotonic() - t0
    return None


def test_a_peer_that_dies_between_saves_is_a_dckpt_error_leaving_the_with_block(tmp_path):
    [survivor, dead] = run_ranks(_a_peer_dies, 2, str(tmp_path / "ckpt"), allow_failures=True)
    assert dead.value is None
    name, is_dckpt, message, seconds = survivor.value
    assert is_dckpt and "a collective with the other ranks broke" in message, (name, message)
    assert seconds < 60  # the 5 s timeout, not a hang


def _redo_past_damage(rank, world, url, delete_fails):
    """Restore past a damaged newest step and train it again; rank 0's delete of it fails
    where ``delete_fails``."""
    if delete_fails and rank == 0:
        def failing(*args, **kwargs):
            raise dckpt.StorageError("SlowDown, tries exhausted")

        from dckpt import catalog

        catalog.delete = failing
    state = {"w": torch.zeros(64)}
    mgr = dckpt.CheckpointManager(url, save_every_steps=2, async_save=False,
                                  handle_signals=False)
    info = mgr.restore(state)
    for step in range(info.step + 1, 7):
        state["w"] += 1
        mgr.maybe_save(step, state)
    mgr.close()
    return info.step, [(s, reason.splitlines()[0][-40:]) for s, reason in mgr.failures]


def _first_run(rank, world, url):
    state = {"w": torch.zeros(64)}
    mgr = dckpt.CheckpointManager(url, save_every_steps=2, async_save=False,
                                  handle_signals=False)
    for step in range(5):
        state["w"] += 1
        mgr.maybe_save(step, state)
    mgr.close()


def test_a_step_the_restore_passed_over_is_saved_again_by_every_rank_or_failed_alike(tmp_path):
    from dckpt_testing import flip_stored_byte

    for delete_fails in (True, False):
        url = str(tmp_path / f"ckpt{delete_fails}")
        run_ranks(_first_run, 2, url)
        flip_stored_byte(url, 4, "w", at=3)
        out = [o.value for o in run_ranks(_redo_past_damage, 2, url, delete_fails)]
        assert out[0] == out[1], out
        assert out[0][0] == 2
        if delete_fails:  # the same failure on both ranks, and training went on
            assert out[0][1] == [(4, "SlowDown, tries exhausted")], out
            assert [c.step for c in dckpt.list_checkpoints(url)] == [0, 2, 4, 6]
            assert not dckpt.verify(url, step=4).ok  # still the damaged one
        else:
            assert out[0][1] == []
            assert dckpt.verify(url, all_steps=True).ok


def _one_rank_mistaken(rank, world, url):
    """Each call with a wrong argument on rank 1 alone: what every rank sees, and when."""
    state = {"w": torch.arange(4.0)}
    wrong = rank == 1
    calls = {
        "CheckpointManager": lambda: dckpt.CheckpointManager(
            url, save_every_steps=-2 if wrong else 2),
        "restore": lambda: mgr.restore(state, step="4" if wrong else None),
        "save": lambda: mgr.save(2, state, metrics={"loss": [1.0]} if wrong else None),
        "save after close": lambda: mgr.save(3, state),
    }
    mgr = dckpt.CheckpointManager(url, save_every_steps=2, async_save=False)
    out = {}
    for name, call in calls.items():
        if name == "save after close" and wrong:
            mgr.close()
        t0 = time.monotonic()
        try:
            call()
            out[name] = ("ok",)
        except dckpt.DckptError as e:
            out[name] = (type(e).__name__, str(e), time.monotonic() - t0)
    mgr.close()
    return out, [c.step for c in dckpt.list_checkpoints(url)]


def test_a_wrong_argument_on_one_rank_is_the_same_error_on_every_rank_at_once(tmp_path):
    """A manager made, restored or saved with a wrong argument on one rank: the others
    waited in the call's first collective for its timeout (300 s), to fail as a broken
    collective; now every rank raises the wrong rank's error at once."""
    outcomes = [o.value for o in run_ranks(_one_rank_mistaken, 2, str(tmp_path / "ckpt"),
                                           timeout_s=120)]
    for name, says in [("CheckpointManager", "save_every_steps"), ("restore", "step must be"),
                       ("save", "metrics must"), ("save after close", "after close()")]:
        got = [out[name] for out, _ in outcomes]
        assert got[0][0] == got[1][0] != "ok", (name, got)
        assert got[0][1] == got[1][1] and "refused on rank 1: " in got[0][1], (name, got)
        assert says in got[0][1], (name, got[0][1])
        assert max(g[2] for g in got) < 30, (name, got)
    assert all(steps == [] for _, steps in outcomes)  # nothing committed
