"""Async save in one process: staged values, reused memory, budgets, failures, policies."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp

import dckpt
from dckpt.saver import AsyncSaver
from dckpt_testing import arm, disarm, open_gate


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(256, 128, generator=g), "b": torch.randn(128, generator=g),
                  "t": torch.randn(64, 32, generator=g).t()},  # non-contiguous
        "opt": {"step": torch.tensor(3), "m": torch.randn(256, 128, generator=g).bfloat16()},
        "mask": torch.rand(50, generator=g) > 0.5,
        "epoch": 4,
    }


def _snapshot(state: dict) -> dict:
    return {k: _snapshot(v) if isinstance(v, dict) else
            v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _zeros_like(state: dict) -> dict:
    return {k: _zeros_like(v) if isinstance(v, dict) else
            torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}


def _mutate(state: dict) -> None:
    for v in state.values():
        if isinstance(v, dict):
            _mutate(v)
        elif isinstance(v, torch.Tensor):
            v.copy_(~v if v.dtype == torch.bool else v + 1)


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        if isinstance(want[k], dict):
            _assert_equal(got[k], want[k])
        elif isinstance(want[k], torch.Tensor):
            assert torch.equal(got[k], want[k]), k
        else:
            assert got[k] == want[k], k


def _loaded(url: str, step: int, like: dict) -> dict:
    out = _zeros_like(like)
    dckpt.load(out, url, step=step)
    return out


def test_checkpoint_holds_values_at_the_call_when_state_changes_after_return(tmp_path):
    url = f"faultyfile://{tmp_path}/repo"
    state = _state()
    want = _snapshot(state)
    arm("gate")  # the write surely runs after the changes below
    try:
        handle = dckpt.async_save(state, url, step=5, metrics={"loss": 0.5})
        assert not handle.done()
        _mutate(state)  # training goes on before the write
        open_gate()
        info = handle.wait(timeout=60)
    finally:
        disarm()
    assert handle.done() and handle.error is None and handle.info == info
    assert info.step == 5 and info.metrics == {"loss": 0.5} and info.pause_s > 0
    assert info.overflow_bytes == 0 and "stage" in info.phase_s and "commit" in info.phase_s
    _assert_equal(_loaded(url, 5, want), want)


def test_back_to_back_saves_reuse_one_staging_allocation(tmp_path):
    url = str(tmp_path / "repo")
    saver = AsyncSaver()
    state = _state()
    assert saver.reserve(state) >= 0 and saver._area.allocations == 1
    wants = {}
    handles = []
    for step in range(1, 6):
        wants[step] = _snapshot(state)
        handles.append(saver.async_save(state, url, step=step))  # waits for the one before
        _mutate(state)
    assert [h.wait(timeout=60).step for h in handles] == [1, 2, 3, 4, 5]
    assert saver._area.allocations == 1
    for step, want in wants.items():
        _assert_equal(_loaded(url, step, want), want)
    saver.close()


def test_a_layout_change_allocates_again_and_both_layouts_load(tmp_path):
    url = str(tmp_path / "repo")
    saver = AsyncSaver()
    small = {"w": torch.arange(10.0)}
    big = {"w": torch.arange(1000.0), "extra": torch.ones(3, dtype=torch.int64)}
    saver.async_save(small, url, step=1).wait(timeout=60)
    saver.async_save(big, url, step=2).wait(timeout=60)
    saver.async_save(big, url, step=3).wait(timeout=60)
    assert saver._area.allocations == 2
    _assert_equal(_loaded(url, 1, small), small)
    _assert_equal(_loaded(url, 3, big), big)
    saver.close()


@pytest.mark.parametrize("budget_blocks", [2, 5])
def test_staging_budget_smaller_than_the_state_writes_the_rest_in_the_pause(tmp_path, budget_blocks):
    url = str(tmp_path / "repo")
    block = 64 << 10
    config = dckpt.SaveConfig(block_size_bytes=block, staging_bytes=budget_blocks * block)
    state = {f"t{i}": torch.randn(40_000 + i) for i in range(4)}  # ~160 KiB each, 2.5 blocks
    state["small"] = torch.arange(7)
    want = _snapshot(state)
    saver = AsyncSaver()
    handle = saver.async_save(state, url, step=1, config=config)
    _mutate(state)
    info = handle.wait(timeout=60)
    assert 0 < info.overflow_bytes < info.bytes_logical
    assert saver._area.nbytes <= config.staging_bytes
    _assert_equal(_loaded(url, 1, want), want)
    assert dckpt.verify(url, step=1).ok
    saver.close()


def test_a_background_write_failure_surfaces_on_wait_and_the_next_save_commits(tmp_path):
    url = f"faultyfile://{tmp_path}/repo"
    saver = AsyncSaver()
    state = _state()
    saver.async_save(state, url, step=1).wait(timeout=60)
    _mutate(state)  # new bytes to write: unchanged blocks would be referenced, not written
    arm("enospc", after_bytes=10_000)
    try:
        failed = saver.async_save(state, url, step=2)  # training is not interrupted here
        with pytest.raises(dckpt.CommitError, match="No space left"):
            failed.wait(timeout=60)
    finally:
        disarm()
    assert isinstance(failed.error, dckpt.CommitError) and failed.info is None
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1]
    _mutate(state)
    want = _snapshot(state)
    info = saver.async_save(state, url, step=3).wait(timeout=60)
    assert [s for s, _ in info.previous_failures] == [2]
    assert "No space left" in info.previous_failures[0][1]
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1, 3]
    _assert_equal(_loaded(str(tmp_path / "repo"), 3, want), want)
    saver.close()


def test_skip_policy_skips_while_a_save_is_in_flight_and_says_so(tmp_path, caplog):
    url = f"faultyfile://{tmp_path}/repo"
    saver = AsyncSaver()
    state = _state()
    arm("slow", delay_s=0.3)
    try:
        first = saver.async_save(state, url, step=1)
        with caplog.at_level(logging.INFO, logger="dckpt"):
            skipped = saver.async_save(state, url, step=2,
                                       config=dckpt.SaveConfig(if_busy="skip"))
        assert skipped.skipped and skipped.skipped_for == 1 and skipped.done()
        assert skipped.wait() is None
        assert "skipping the save of step 2" in caplog.text
        with caplog.at_level(logging.INFO, logger="dckpt"):
            waited = saver.async_save(state, url, step=3)  # default policy: wait
        assert first.done()  # waited for before staging step 3
        assert "waits for the save of step 1" in caplog.text
    finally:
        disarm()
    assert waited.wait(timeout=60).step == 3
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1, 3]
    saver.close()


def test_wait_with_a_timeout_raises_timeout_error_while_running(tmp_path):
    url = f"faultyfile://{tmp_path}/repo"
    saver = AsyncSaver()
    arm("slow", delay_s=0.5)
    try:
        handle = saver.async_save({"w": torch.ones(10)}, url, step=1)
        with pytest.raises(TimeoutError, match="step 1 is still running"):
            handle.wait(timeout=0.01)
        assert not handle.done() and handle.error is None
        assert handle.wait(timeout=60).step == 1
    finally:
        disarm()
    saver.close()


def test_overlap_mode_with_the_optimizer_hook_stages_values_before_the_step(tmp_path):
    url = str(tmp_path / "repo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    saver = AsyncSaver()
    hook = saver.install_hook(opt)
    x = torch.randn(32, 64)
    for _ in range(2):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    want = _snapshot({"model": model.state_dict()})
    config = dckpt.SaveConfig(overlap=True)
    handle = saver.async_save({"model": model.state_dict()}, url, step=2, config=config)
    opt.zero_grad()
    model(x).pow(2).mean().backward()  # runs while the copy may still run
    opt.step()  # the hook waits for the copy first
    assert handle.wait(timeout=60).step == 2
    _assert_equal(_loaded(url, 2, want), want)
    changed = not torch.equal(model.state_dict()["0.weight"], want["model"]["0.weight"])
    assert changed
    hook.remove()
    saver.close()


def test_stager_serves_dcp_async_save(tmp_path):
    url = str(tmp_path / "repo")
    stager = dckpt.Stager()
    state = _state()
    wants = {}
    for step in (1, 2):
        wants[step] = _snapshot(state)
        future = dcp.async_save(state, storage_writer=dckpt.Writer(url, step=step),
                                async_stager=stager)
        _mutate(state)
        future.result(timeout=60)
    stager.close()
    for step, want in wants.items():
        _assert_equal(_loaded(url, step, want), want)


def test_async_save_refuses_bad_arguments_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="step must be an int"):
        dckpt.async_save({"w": torch.ones(1)}, str(tmp_path), step=-1)
    with pytest.raises(ValueError, match="if_busy"):
        dckpt.SaveConfig(if_busy="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="staging_bytes"):
        dckpt.SaveConfig(staging_bytes=4096)
    with pytest.raises(dckpt.ArgumentError, match="metrics"):
        dckpt.async_save({"w": torch.ones(1)}, str(tmp_path), step=1, metrics={"x": [1]})


def test_saving_a_committed_step_again_fails_in_the_background(tmp_path):
    url = str(tmp_path / "repo")
    dckpt.async_save({"w": torch.ones(3)}, url, step=1).wait(timeout=60)
    handle = dckpt.async_save({"w": torch.zeros(3)}, url, step=1)
    with pytest.raises(dckpt.CheckpointExistsError, match="already committed"):
        handle.wait(timeout=60)
    _assert_equal(_loaded(url, 1, {"w": torch.ones(3)}), {"w": torch.ones(3)})


def test_the_local_plan_is_reused_only_while_its_key_holds(tmp_path):
    from dckpt.planner import plan_key as _plan_key

    base = {"a": torch.zeros(4, 2), "v": 3}
    assert _plan_key(base) == _plan_key({"a": torch.ones(4, 2), "v": 9})  # values do not count
    for changed in ({"a": torch.zeros(2, 4), "v": 3}, {"a": torch.zeros(4, 2).double(), "v": 3},
                    {"b": torch.zeros(4, 2), "v": 3}, {"a": torch.zeros(4, 2, requires_grad=True),
                                                       "v": 3}):
        assert _plan_key(changed) != _plan_key(base)

    class Odd(torch.Tensor):
        pass

    assert _plan_key({"a": torch.zeros(2).as_subclass(Odd)}) is None
    url = str(tmp_path / "repo")
    saver = AsyncSaver()
    saver.async_save({"a": torch.ones(4, 2)}, url, step=1).wait(timeout=60)
    saver.async_save({"a": torch.ones(2, 4)}, url, step=2).wait(timeout=60)  # new plan
    out = {"a": torch.zeros(2, 4)}
    dckpt.load(out, url, step=2)
    assert torch.equal(out["a"], torch.ones(2, 4))
    saver.close()


@pytest.mark.parametrize("end", ["sys.exit(0)", "raise RuntimeError('the training crashed')"])
def test_a_process_that_exits_with_a_save_in_flight_commits_it_first(tmp_path, end):
    """The script drops the handle and exits (or dies of an exception) while the save's
    writes are still going (each write sleeps): the exit waits, and the step is committed
    (before, the save failed at the interpreter's shutdown, without a word)."""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    url = f"faultyfile://{tmp_path}"
    script = "\n".join([
        f"import sys; sys.path.insert(0, {tests!r})",
        "import torch, dckpt",
        "from dckpt_testing import arm",
        f"dckpt.save({{'w': torch.zeros(1000)}}, {url!r}, step=1)",
        "arm('slow', delay_s=0.5)",
        f"dckpt.async_save({{'w': torch.ones(1000)}}, {url!r}, step=2)",
        end])
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == (0 if end.startswith("sys.exit") else 1), done.stderr
    assert "waiting for the save of step 2 to end" in done.stderr
    out = {"w": torch.zeros(1000)}
    assert dckpt.load(out, str(tmp_path)).step == 2 and torch.equal(out["w"], torch.ones(1000))


def test_staging_reuses_its_typed_slots_while_the_layout_holds(tmp_path):
    """The slots keep the tensors' dtypes and shapes between saves of one layout; a layout
    that changes (a dtype, a shape) gets new memory; every save holds its own values."""
    saver = AsyncSaver()
    url = str(tmp_path)
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(1000, generator=g), "b": torch.randn(10, 20, generator=g)}
              for _ in range(3)]
    states.append({"a": states[2]["a"].double(), "b": states[2]["b"]})  # a's dtype changes
    states.append({"a": states[3]["a"], "b": states[2]["b"].reshape(20, 10)})  # b's shape
    allocations = []
    for step, state in enumerate(states):
        saver.async_save(state, url, step=step).wait(timeout=60)
        allocations.append(saver._area.allocations)
    assert allocations == [1, 1, 1, 2, 3]
    for step, state in enumerate(states):
        out = {k: torch.zeros_like(v) for k, v in state.items()}
        dckpt.load(out, url, step=step)
        assert all(torch.equal(out[k], v) for k, v in state.items()), step
    saver.close()


def test_every_kind_of_host_source_is_staged_by_value_in_one_batched_copy(tmp_path):
    """The pause copies host tensors in one batch: mixed dtypes, strided and transposed
    views, an expanded view, a lazily conjugated one, empty and 0-dim tensors each land as
    their values, at the first save (fresh slots) and the next (the slots as typed)."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(8, 6, generator=g)
    z = torch.randn(50, dtype=torch.complex64, generator=g)

    def state(k: int) -> dict:
        return {"strided": base[::2, 1::2] + k, "transposed": base.t() * k,
                "expanded": torch.full((1,), float(k)).expand(40),
                "conj": (z * k).conj(), "bf16": (base * k).bfloat16(),
                "ints": torch.arange(7, dtype=torch.int16) * k, "bool": base > k,
                "empty": torch.empty(0, 3), "scalar": torch.tensor(k * 1.5)}

    saver = AsyncSaver()
    for step in (1, 2):
        saver.async_save(state(step), str(tmp_path), step=step).wait(timeout=60)
    for step in (1, 2):
        want = state(step)
        out = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in want.items()}
        dckpt.load(out, str(tmp_path), step=step)
        assert all(torch.equal(out[k], v.resolve_conj()) for k, v in want.items()), step
    saver.close()


def test_an_async_save_of_a_list_after_one_of_a_dict_exports_as_a_list(tmp_path):
    """Both flatten to "b.0"; the async save's reused local plan carried the dict's mappings
    into the manifest, and the export built a dict."""
    url = str(tmp_path / "repo")
    dckpt.async_save({"b": {"0": torch.ones(3)}}, url, step=1).wait()
    dckpt.async_save({"b": [torch.full((3,), 2.0)]}, url, step=2).wait()
    dckpt.export(url, step=2, to=str(tmp_path / "out.pt"), format="torch")
    back = torch.load(tmp_path / "out.pt", weights_only=True)
    assert isinstance(back["b"], list) and torch.equal(back["b"][0], torch.full((3,), 2.0))


@pytest.mark.parametrize("mode", ["async", "sync and async", "one saver"])
def test_threads_saving_at_once_each_commit_their_own_values(tmp_path, mode):
    """Threads of one process saving at once (the model and its EMA, each to its own
    repository) take turns: a second async save staged into the memory the first one's write
    was still reading, and the checkpoints held each other's values."""
    import threading

    saver = AsyncSaver() if mode == "one saver" else None
    errors: list[BaseException] = []

    def state(thread: int, step: int) -> dict:  # two layouts: the slots move, or stay
        return {"w": torch.full((50_000 + 1000 * (thread % 2),), float(100 * thread + step)),
                "b": torch.arange(thread + 1) + step}

    def run(thread: int) -> None:
        try:
            url = str(tmp_path / f"repo{thread}")
            for step in range(6):
                sync = mode == "sync and async" and (thread + step) % 2 == 0
                if saver is not None:
                    saver.async_save(state(thread, step), url, step=step)
                elif sync:
                    dckpt.save(state(thread, step), url, step=step)
                else:
                    dckpt.async_save(state(thread, step), url, step=step)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    (saver or dckpt.saver.default_saver()).wait_idle()
    assert not errors and not any(t.is_alive() for t in threads), errors
    for thread in range(4):
        for step in range(6):
            want = state(thread, step)
            got = {k: torch.zeros_like(v) for k, v in want.items()}
            dckpt.load(got, str(tmp_path / f"repo{thread}"), step=step)
            assert all(torch.equal(got[k], want[k]) for k in want), (thread, step)
