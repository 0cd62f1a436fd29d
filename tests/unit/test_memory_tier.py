"""The memory tier (dckpt.memory, dckpt.tiers) in one process: restores from the newest
tier, falls back to storage past a damaged memory checkpoint, holds one checkpoint, leaves
nothing after a clean end, reuses a crashed run's memory, refuses a folder without room."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch

import dckpt
from dckpt import memory
from dckpt_testing import flip_stored_byte


def _train(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, {"app": dckpt.TrainState(model, opt)}


def _step(model, opt, step):
    torch.manual_seed(1000 + step)
    model(torch.randn(4, 16)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()


def _run(url, shm, steps, **kw):
    """Train ``steps`` steps with a manager and return it open (a crash leaves it so)."""
    model, opt, state = _train()
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm), **kw)
    weights = {}
    for step in range(steps):
        _step(model, opt, step)
        mgr.maybe_save(step, state)
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
    mgr._poll(wait=True)
    return mgr, weights


def _restore(url, shm, **kw):
    model, _, state = _train(seed=99)
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm), **kw)
    return mgr, mgr.restore(state), model.state_dict()


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_restore_takes_the_newest_tier_and_holds_one_checkpoint(tmp_path):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    crashed, weights = _run(url, shm, 15, save_every_steps=10, memory_every_steps=2)
    folder = memory.memory_folder(url, str(shm))
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
    assert os.listdir(os.path.join(folder, "manifests")) == ["000000000014.json"]
    assert len(os.listdir(os.path.join(folder, "data"))) == 1  # the older ones pruned
    mgr, info, restored = _restore(url, shm, save_every_steps=10, memory_every_steps=2)
    assert (info.step, info.tier) == (14, "memory") and _same(restored, weights[14])
    status = dckpt.status(url, memory_dir=str(shm))
    assert status.memory[0] == folder and status.memory[1] > 16 * 16 * 4 and status.memory[2] == 14
    mgr.close()
    assert not os.path.exists(folder) and dckpt.status(url, memory_dir=str(shm)).memory is None
    crashed.close()  # the abandoned manager of the "crashed" run


def test_storage_newer_than_memory_restores_from_storage(tmp_path):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    crashed, weights = _run(url, shm, 13, save_every_steps=12, memory_every_steps=5)
    # the storage save of step 12 was a copy of the memory checkpoint of step 12
    assert memory.held(url, str(shm))[2] == 12 and crashed.memory.step == 12
    model, opt, state = _train(seed=5)  # another job's save, storage only, newer
    with dckpt.CheckpointManager(url, handle_signals=False) as other:
        other.save(20, state)
    mgr, info, restored = _restore(url, shm, memory_every_steps=5)
    assert (info.step, info.tier) == (20, "storage") and _same(restored, model.state_dict())
    mgr.close()
    crashed.close()


def test_a_storage_save_is_a_copy_of_the_memory_checkpoint(tmp_path):
    """With the memory tier, storage saves copy the memory checkpoint (no second device
    copy): both hold the same bytes, storage's own dedup still applies, and the storage
    copy loads bit-equal after the memory tier is gone."""
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    mgr, weights = _run(url, shm, 21, save_every_steps=10, memory_every_steps=4)
    infos = dckpt.list_checkpoints(url)
    assert [c.step for c in infos] == [0, 10, 20]
    assert infos[2].bytes_written < infos[0].bytes_written  # dedup against step 10
    mgr.close()
    assert memory.held(url, str(shm)) is None
    for step in (0, 10, 20):
        model, _, state = _train(seed=7)
        dckpt.load(state, url, step=step)
        assert _same(model.state_dict(), weights[step])


def test_a_damaged_memory_checkpoint_falls_back_to_storage(tmp_path):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    crashed, weights = _run(url, shm, 13, save_every_steps=5, memory_every_steps=3)
    folder = memory.memory_folder(url, str(shm))
    flip_stored_byte(folder, 12, "app.model.weight", at=5)
    mgr, info, restored = _restore(url, shm, memory_every_steps=3)
    assert (info.step, info.tier) == (10, "storage") and _same(restored, weights[10])
    assert memory.held(url, str(shm))[2] is None  # the damaged one is gone from memory
    mgr.close()
    crashed.close()


@pytest.mark.parametrize("storage", [False, True])
def test_a_state_dict_that_does_not_fit_is_refused_and_the_memory_checkpoint_kept(
        tmp_path, storage):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    kw = {"memory_every_steps": 3, **({"save_every_steps": 5} if storage else {})}
    crashed, weights = _run(url, shm, 13, **kw)
    model, opt, _ = _train(seed=99)  # a restart whose state dict does not fit the checkpoint
    grown = {"app": dckpt.TrainState(model, opt, extra={"epoch": 0}), "new": torch.zeros(3)}
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm), **kw)
    with pytest.raises(dckpt.StateDictError, match="new: in the state dict but not in the "):
        mgr.restore(grown)  # as from storage alone; not a fresh start
    assert memory.held(url, str(shm))[2] == 12  # nothing dropped for the caller's mistake
    mgr.close()
    mgr, info, restored = _restore(url, shm, **kw)
    assert (info.step, info.tier) == (12, "memory") and _same(restored, weights[12])
    mgr.close()
    crashed.close()


@pytest.mark.parametrize("unsavable", ["lambda", "lazy module"])
def test_a_first_save_of_an_unsavable_state_fails_and_training_goes_on(tmp_path, unsavable,
                                                                        caplog):
    """The memory tier's first save, refused for its state dict before any plan, failed the
    storage save beside it with an AssertionError that left maybe_save."""
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    model, opt, state = _train()
    bad = {"app": state["app"],
           "x": (lambda: 0) if unsavable == "lambda" else torch.nn.LazyLinear(3)}
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                  memory_every_steps=1, save_every_steps=1)
    mgr.maybe_save(0, bad)  # fails in the background: logged, not raised
    mgr._poll(wait=True)
    assert "the state dict cannot be saved" in caplog.text
    assert ("x.weight: an uninitialized parameter" if unsavable == "lazy module"
            else "x: ") in caplog.text
    mgr.maybe_save(1, state)
    mgr.close()
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1]
    _, info, restored = _restore(url, shm, memory_every_steps=1)
    assert info.step == 1 and _same(restored, model.state_dict())


def _replace_with_a_file(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
    open(path, "wb").write(b"x")


def _symlink_loop(path: str) -> None:
    os.unlink(path)
    os.symlink(path, path)


def _fifo(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path)  # an open for reading blocked until a writer came: forever


@pytest.mark.parametrize("damage", ["data is a file", "manifests is a file",
                                    "a segment is a symlink loop", "a segment is a FIFO",
                                    "a segment is short",
                                    "the manifest is a FIFO", "the folder is a file",
                                    "spare is a file"])
def test_a_memory_folder_damaged_past_reading_means_storage_then_memory_again(tmp_path, damage):
    """The memory tier is the node's scratch: what it cannot read is memory lost, not a
    reason to stop the job. Each of these failed the restore (StorageError), failed the
    manager's creation, or failed every memory save after; a FIFO hung the restore; a
    short segment (as a FIFO's) left its checkpoint, passed over, to fail the memory save
    redoing its step ("already committed")."""
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    crashed, weights = _run(url, shm, 13, save_every_steps=5, memory_every_steps=3)
    folder = memory.memory_folder(url, str(shm))
    segment = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, "data"))
                   for f in fs)
    manifest = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, "manifests"))
                    for f in fs)
    {"data is a file": lambda: _replace_with_a_file(os.path.join(folder, "data")),
     "a segment is a FIFO": lambda: _fifo(segment),
     "a segment is short": lambda: os.truncate(segment, os.path.getsize(segment) - 1),
     "the manifest is a FIFO": lambda: _fifo(manifest),
     "manifests is a file": lambda: _replace_with_a_file(os.path.join(folder, "manifests")),
     "a segment is a symlink loop": lambda: _symlink_loop(segment),
     "the folder is a file": lambda: _replace_with_a_file(folder),
     "spare is a file": lambda: _replace_with_a_file(os.path.join(folder, "spare"))}[damage]()
    model, opt, state = _train(seed=99)
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                  save_every_steps=5, memory_every_steps=3)
    signal.alarm(60)  # a hang fails the test instead of the suite
    try:
        info = mgr.restore(state)
    finally:
        signal.alarm(0)
    want = (12, "memory") if damage == "spare is a file" else (10, "storage")
    assert (info.step, info.tier) == want and _same(model.state_dict(), weights[info.step])
    for step in range(info.step + 1, info.step + 10):
        _step(model, opt, step)
        mgr.maybe_save(step, state)
    mgr._poll(wait=True)
    newest = max(s for s in range(info.step + 1, info.step + 10) if s % 3 == 0)
    assert mgr.failures == [] and memory.held(url, str(shm))[2] == newest
    mgr.close()
    crashed.close()
    assert not os.path.exists(folder)


def test_a_crashed_runs_memory_is_reused_then_removed_by_a_clean_end(tmp_path):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    crashed, _ = _run(url, shm, 5, memory_every_steps=2)
    folder = memory.memory_folder(url, str(shm))
    stray = os.path.join(folder, "data", "s6-t1-0badc0de")  # a save the crash cut short
    os.makedirs(stray)
    open(os.path.join(stray, "r00000-000.seg"), "wb").write(b"x" * 100)
    mgr, info, _ = _restore(url, shm, memory_every_steps=2)
    assert (info.step, info.tier) == (4, "memory") and not os.path.exists(stray)
    with mgr:  # a with-block that ends cleanly removes it too
        pass
    assert not os.path.exists(folder)
    with pytest.raises(RuntimeError):  # one that ends in an exception keeps it for a restart
        with dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                     memory_every_steps=1) as kept:
            kept.maybe_save(0, _train()[2])
            raise RuntimeError("crash")
    assert memory.held(url, str(shm))[2] == 0
    crashed.close()


def test_a_run_that_did_not_restore_keeps_its_own_memory_checkpoints(tmp_path):
    """A relaunch that starts afresh without restore: the crashed run's newer memory
    checkpoint (step 10) outlived every memory save of the new run (each pruned as older:
    the tier held none of its own, and reported no failure), so a restart after a crash at
    step 6 restored the other run's step 10."""
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    first, _ = _run(url, shm, 11, memory_every_steps=2, save_every_steps=100)
    assert memory.held(url, str(shm))[2] == 10
    second, weights = _run(url, shm, 7, memory_every_steps=2, save_every_steps=100)
    # storage's step 0 is the first run's (never overwritten: that save fails, and says so)
    assert [s for s, _ in second.failures] == [0] and memory.held(url, str(shm))[2] == 6
    mgr, info, restored = _restore(url, shm, memory_every_steps=2, save_every_steps=100)
    assert (info.step, info.tier) == (6, "memory") and _same(restored, weights[6])
    for m in (mgr, second, first):
        m.close()


def test_a_memory_folder_without_room_is_refused(tmp_path, monkeypatch):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(memory.MemoryTier, "free_bytes", lambda self: 1000)
    model, opt, state = _train()
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                  memory_every_steps=1)
    assert mgr.restore(state) is None  # a fresh start: checked at the first memory save
    with pytest.raises(dckpt.StorageError,
                       match=r"needs \d+ bytes \(the checkpoints .* has 1000;.*memory_dir= or DCKPT"):
        mgr.maybe_save(0, state)
    assert memory.held(url, str(shm))[1] == 0  # nothing written
    mgr.close()


def test_a_fresh_start_leaves_the_optimizer_as_it_was(tmp_path):
    """DCP's get_state_dict steps an optimizer without state once (lr 0) to create it, and
    its step count then changes every later update: a restore that finds nothing must not
    call it, memory tier or not."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = dckpt.CheckpointManager(str(tmp_path / "ckpt"), handle_signals=False,
                                  memory_dir=str(tmp_path), memory_every_steps=1)
    assert mgr.restore({"app": dckpt.TrainState(model, opt)}) is None
    assert len(opt.state) == 0
    mgr.close()


@pytest.mark.parametrize("kwargs", [{"memory_every_steps": 0}, {"memory_every_steps": 1.5},
                                    {"memory_replicas": -1}, {"memory_replicas": 1.0},
                                    {"memory_every_steps": 2, "memory_replicas": 1},
                                    {"memory_replicas": 1},  # replicas of no memory tier
                                    {"memory_dir": 3},
                                    {"memory_every_steps": 2, "memory_dir": "/no/such/dir"}])
def test_bad_memory_arguments_are_refused(tmp_path, kwargs, monkeypatch):
    monkeypatch.setenv("DCKPT_MEMORY_DIR", str(tmp_path / "shm"))
    (tmp_path / "shm").mkdir()
    with pytest.raises(dckpt.ArgumentError):
        dckpt.CheckpointManager(str(tmp_path / "ckpt"), handle_signals=False, **kwargs)
    assert not os.listdir(tmp_path / "shm")  # nothing made on refusal


def test_the_default_folder_is_under_dev_shm_or_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("DCKPT_MEMORY_DIR", raising=False)
    a = memory.memory_folder(str(tmp_path / "x"))
    assert a.startswith("/dev/shm/dckpt-") and a == memory.memory_folder(f"file://{tmp_path}/x")
    assert a != memory.memory_folder(str(tmp_path / "y"))
    monkeypatch.setenv("DCKPT_MEMORY_DIR", str(tmp_path))
    assert memory.memory_folder("s3://b/run").startswith(f"{tmp_path}/dckpt-")
    # "~" is expanded, as fsspec expands it in the repository's own path
    monkeypatch.setenv("HOME", str(tmp_path))
    assert memory.memory_folder("~/ckpt", "~") == memory.memory_folder(str(tmp_path / "ckpt"),
                                                                       str(tmp_path))


@pytest.mark.parametrize("where", ["absent", "a file"])
def test_a_memory_folder_that_is_not_one_is_refused_saying_what_it_is(tmp_path, where):
    parent = tmp_path / "shm"
    if where == "a file":
        parent.write_bytes(b"x")
    with pytest.raises(dckpt.ArgumentError) as e:
        dckpt.CheckpointManager(str(tmp_path / "ckpt"), memory_every_steps=2,
                                memory_dir=str(parent), handle_signals=False)
    assert ("is a file, not a folder" if where == "a file" else "does not exist") in str(e.value)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("placed", ["a link to a folder of the user's", "another user's folder"])
def test_a_tier_folder_someone_else_placed_is_refused_and_left_as_it_is(tmp_path, monkeypatch,
                                                                         placed):
    """In a shared folder (/dev/shm) another user can create the tier's name first: as a link
    to a folder of the user's, which the tier would chmod, fill and prune, or as a folder of
    their own, which they could read."""
    url, shm, target = str(tmp_path / "ckpt"), tmp_path / "shm", tmp_path / "elsewhere"
    shm.mkdir()
    target.mkdir(mode=0o755)
    (target / "data").mkdir()
    (target / "data" / "notes.seg").write_bytes(b"the user's")
    if placed.startswith("a link"):
        os.symlink(target, memory.memory_folder(url, str(shm)))
    else:  # the folder is the real user's; the tier runs as someone else
        monkeypatch.setattr(os, "getuid", lambda real=os.getuid(): real + 1)
        target = shutil.copytree(target, memory.memory_folder(url, str(shm)))
    before = sorted(os.walk(target)), stat.S_IMODE(os.stat(target).st_mode)
    with pytest.raises(dckpt.StorageError, match="symbolic link|belongs to user") as e:
        dckpt.CheckpointManager(url, memory_every_steps=1, memory_dir=str(shm),
                                handle_signals=False)
    assert "memory_dir= or DCKPT_MEMORY_DIR" in str(e.value)
    assert (sorted(os.walk(target)), stat.S_IMODE(os.stat(target).st_mode)) == before
    assert not os.path.exists(url)


HOLDER = r"""
import os, sys, time, torch, dckpt
url, shm, then = sys.argv[1:4]
mgr = dckpt.CheckpointManager(url, memory_every_steps=1, memory_dir=shm, handle_signals=False)
state = {"w": torch.arange(64.0)}
mgr.restore(state)
mgr.maybe_save(1, state)
mgr._poll(wait=True)
if then == "fork":  # a data loader's worker, forked after the manager was made
    if os.fork() == 0:
        time.sleep(600)
        os._exit(0)
print("holding", flush=True)
if then == "fork":
    os.kill(os.getpid(), 9)  # the job crashes; its forked worker lives on
time.sleep(600)
"""


@pytest.mark.parametrize("then", ["sleep", "fork"])
def test_a_second_job_on_the_same_memory_tier_is_refused_while_the_first_lives(tmp_path, then):
    """Two jobs on one repository and node (launched twice, or a requeue whose first run
    still lives) would prune each other's memory checkpoints: the second is refused, naming
    the first, and changes nothing. Once the first is gone (killed: no clean end), a restart
    takes the tier and restores from it, even if a process it forked still lives."""
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    first = subprocess.Popen([sys.executable, "-c", HOLDER, url, str(shm), then],
                             stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert first.stdout is not None and first.stdout.readline() == "holding\n"
        folder = memory.memory_folder(url, str(shm))
        if then == "sleep":
            before = sorted((d, sorted(f)) for d, _, f in os.walk(folder))
            with pytest.raises(dckpt.StorageError, match=rf"in use by another job \(process "
                               rf"{first.pid} on .*memory_dir"):
                dckpt.CheckpointManager(url, memory_every_steps=1, memory_dir=str(shm),
                                        handle_signals=False)
            assert sorted((d, sorted(f)) for d, _, f in os.walk(folder)) == before
            os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        state = {"w": torch.zeros(64)}
        with dckpt.CheckpointManager(url, memory_every_steps=1, memory_dir=str(shm),
                                     handle_signals=False) as again:
            info = again.restore(state)
            assert (info.step, info.tier) == (1, "memory")
            assert torch.equal(state["w"], torch.arange(64.0))
        assert not os.path.exists(folder)  # the clean end removed it, lock and all
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGKILL)  # the forked worker too
        first.wait(timeout=60)


def test_a_copy_to_storage_checks_every_memory_block_first(tmp_path):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    mgr, _ = _run(url, shm, 5, memory_every_steps=2)
    folder, step = memory.memory_folder(url, str(shm)), mgr.memory.step
    staged, close = mgr.memory.tier.staged(step, mgr.memory._plan)
    bias = staged[next(i for i in staged if i.fqn == "app.model.bias")]
    assert torch.equal(bias, _bias(url, shm, step))  # mapped from the memory file
    close()
    flip_stored_byte(folder, step, "app.model.bias", mask=0x08)
    with pytest.raises(dckpt.IntegrityError, match="app.model.bias"):
        mgr.memory.tier.staged(step, mgr.memory._plan)
    mgr.close()


def _bias(url, shm, step):
    model, _, state = _train(seed=3)
    dckpt.load(state, memory.memory_folder(url, str(shm)), step=step)
    return model.bias.detach()


def test_back_to_back_memory_saves_hold_at_most_two_checkpoints(tmp_path):
    """Each save finds the one before still writing or just done: the prune after each
    spares only the attempt in flight, however fast the saves come."""
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    model, opt, state = _train()
    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                  memory_every_steps=1)
    data = os.path.join(memory.memory_folder(url, str(shm)), "data")
    held = []
    for step in range(12):
        _step(model, opt, step)
        mgr.maybe_save(step, state)
        held.append(len(os.listdir(data)) if os.path.isdir(data) else 0)
    mgr.wait()
    assert max(held) <= 2 and len(os.listdir(data)) == 1, held
    mgr.close()


def test_a_pruned_checkpoints_memory_is_written_over_by_the_next(tmp_path):
    url, shm = str(tmp_path / "ckpt"), tmp_path / "shm"
    shm.mkdir()
    folder = memory.memory_folder(url, str(shm))

    def segment():
        (path,) = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(folder, "data"))
                   for f in files]
        return path

    mgr = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                  memory_every_steps=1)
    first = None
    for step, n in enumerate((3000, 4000, 3500, 4000)):  # sizes change: spares are cut to fit
        mgr.maybe_save(step, {"w": torch.arange(n, dtype=torch.float32) * step})
        mgr.wait()
        if step == 0:  # held open, its inode cannot be a new file's
            first = os.open(segment(), os.O_RDONLY)
        if step == 2:  # step 0's file, pruned at step 1, now holds step 2
            assert os.fstat(first).st_nlink == 1
            assert os.fstat(first).st_ino == os.stat(segment()).st_ino
            assert os.fstat(first).st_size == os.stat(segment()).st_size
    os.close(first)
    out = {"w": torch.zeros(4000)}
    mgr2 = dckpt.CheckpointManager(url, handle_signals=False, memory_dir=str(shm),
                                   memory_every_steps=1)
    info = mgr2.restore(out)
    assert (info.step, info.tier) == (3, "memory")
    assert torch.equal(out["w"], torch.arange(4000, dtype=torch.float32) * 3)
    mgr2.close()
    mgr.close()
    assert not os.path.exists(folder)
