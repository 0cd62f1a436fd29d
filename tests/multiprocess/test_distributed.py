"""Real gloo ranks: sharded save, resharded load, and failures on one rank."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

import dckpt
from dckpt_testing import arm, leftovers, run_ranks

FULL = torch.arange(12 * 10, dtype=torch.float32).reshape(12, 10)


def _dtensor_state(placement: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    dim = 0 if placement == "rows" else 1
    return {"w": distribute_tensor(FULL.clone(), mesh, [Shard(dim)]),
            "bias": torch.full((5,), 3.0), "epoch": 7}


def _save_dtensor(rank, world, url):
    state = _dtensor_state("rows")
    info = dckpt.save(state, url, step=10)
    return info.world_size, info.bytes_logical


def _load_dtensor(rank, world, url, placement):
    from torch.distributed.tensor import DTensor

    state = _dtensor_state(placement)
    state["w"] = DTensor.from_local(torch.zeros_like(state["w"].to_local()),
                                    state["w"].device_mesh, state["w"].placements)
    state["bias"] = torch.zeros(5)
    state["epoch"] = 0
    info = dckpt.load(state, url)
    return info.step, torch.equal(state["w"].full_tensor(), FULL), state["bias"].tolist(), \
        state["epoch"]


def test_dtensor_saved_on_4_ranks_loads_on_2_and_3_with_other_sharding(tmp_path):
    url = str(tmp_path)
    outcomes = run_ranks(_save_dtensor, 4, url)
    assert {o.value for o in outcomes} == {(4, FULL.numel() * 4 + 5 * 4 + _pickled_int_size())}
    for world, placement in [(2, "cols"), (3, "rows")]:
        results = [o.value for o in run_ranks(_load_dtensor, world, url, placement)]
        assert results == [(10, True, [3.0] * 5, 7)] * world


def _mesh_state(shape: tuple[int, ...], placements: dict[str, str], zero: bool = False):
    """Three tensors over a mesh of ``shape``, each placed as spelled per mesh dimension:
    R (replicated), S0 or S1 (sharded on that tensor dimension)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", shape)
    named = {"R": Replicate(), "S0": Shard(0), "S1": Shard(1)}
    return {k: distribute_tensor(torch.zeros_like(full) if zero else full.clone(), mesh,
                                 [named[p] for p in placements[k].split()])
            for k, full in _MESH_FULL.items()}


_MESH_FULL = {"a": FULL[:8, :6].clone(), "b": FULL.double()[:10, :4] * 0.5,
              "c": FULL[:7, :3] - 3}


def _save_on_a_mesh(rank, world, url, shape, placements):
    state = _mesh_state(shape, placements)
    written = dckpt.save(state, url, step=1).bytes_written
    dckpt.async_save(state, url, step=2).wait()
    return written


def _load_on_a_mesh(rank, world, url, shape, placements, step):
    state = _mesh_state(shape, placements, zero=True)
    dckpt.load(state, url, step=step)
    return all(torch.equal(v.full_tensor(), _MESH_FULL[k]) for k, v in state.items())


def test_a_2d_mesh_saves_replicas_once_and_loads_on_other_meshes_and_placements(tmp_path):
    """HSDP and 2-D sharding: a (2, 2) mesh with a tensor replicated over one dimension,
    one sharded over both, one sharded then replicated."""
    url = str(tmp_path)
    hsdp = {"a": "R S0", "b": "S0 S1", "c": "S1 R"}
    stored = sum(t.numel() * t.element_size() for t in _MESH_FULL.values())
    # bytes_written counts all ranks: each replicated shard stored once
    assert [o.value for o in run_ranks(_save_on_a_mesh, 4, url, (2, 2), hsdp)] == [stored] * 4
    for world, shape, placements, step in [
            (4, (2, 2), {"a": "S1 S0", "b": "R R", "c": "S0 S0"}, 1),
            (3, (3,), {"a": "S1", "b": "S0", "c": "R"}, 2)]:
        assert [o.value for o in run_ranks(_load_on_a_mesh, world, url, shape, placements,
                                           step)] == [True] * world


def _pickled_int_size() -> int:
    import io

    buf = io.BytesIO()
    torch.save(7, buf)
    return len(buf.getvalue())


def _save_twice(rank, world, urls):
    """For each fail_rank, into its own repository: step 1, then step 2 failing there."""
    from dckpt_testing import disarm

    out = []
    for fail_rank, url in enumerate(urls):
        dckpt.save({"w": _sharded(torch.full((4, 64), 1.0))}, url, step=1)
        if rank == fail_rank:
            arm("eio", after_bytes=0)
        try:
            dckpt.save({"w": _sharded(torch.full((4, 64), 2.0))}, url, step=2)
            out.append("committed")
        except dckpt.CommitError as e:
            out.append((type(e).__name__, str(e), sorted(e.failures)))
        finally:
            disarm()
    return out


def test_failure_on_one_rank_is_the_same_commit_error_everywhere(tmp_path):
    """Rank 0 (the coordinator) fails, then rank 1, each in a repository of its own; the
    rank that did not fail removes what it wrote too."""
    roots = [tmp_path / "fail0", tmp_path / "fail1"]
    outcomes = run_ranks(_save_twice, 2, [f"faultyfile://{r}" for r in roots])
    values = [o.value for o in outcomes]
    assert values[0] == values[1]
    for fail_rank, (kind, message, failing) in enumerate(values[0]):
        assert kind == "CommitError" and failing == [fail_rank]
        assert f"failed on rank {fail_rank}" in message and "SlowDown" in message
        assert [i.step for i in dckpt.list_checkpoints(str(roots[fail_rank]))] == [1]
        assert leftovers(str(roots[fail_rank])) == []
    # the next save works, from fresh ranks
    run_ranks(_save_step, 2, str(roots[1]), 2)
    assert [i.step for i in dckpt.list_checkpoints(str(roots[1]))] == [1, 2]


def _manifest_reply_lost(rank, world, url):
    from dckpt import layout
    from dckpt.storage import Store

    full = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64)
    if rank == 0:  # the coordinator's create arrives, its reply does not
        create = Store.create_exclusive

        def lost_reply(self, name, data):
            create(self, name, data)
            if name.startswith(f"{layout.MANIFEST_DIR}/"):
                raise TimeoutError("Read timeout on endpoint URL (injected)")

        Store.create_exclusive = lost_reply
    try:
        dckpt.save({"w": _sharded(full.clone())}, url, step=2)
        outcome = "no error"
    except dckpt.CommitError as e:
        outcome = str(e).splitlines()[0]
    finally:
        if rank == 0:
            Store.create_exclusive = create
    out = {"w": _sharded(torch.zeros(4, 64))}
    dckpt.load(out, url)
    return outcome, torch.equal(out["w"].full_tensor(), full)


def test_a_failure_after_the_manifest_was_sent_keeps_every_ranks_data(tmp_path):
    """The step may be committed (here it is): no rank removes its segments, and it loads."""
    values = [o.value for o in run_ranks(_manifest_reply_lost, 2, str(tmp_path))]
    assert values[0] == values[1] and values[0][1] is True
    assert "Read timeout" in values[0][0]
    assert leftovers(str(tmp_path)) == [] and dckpt.verify(str(tmp_path)).ok


def _steps_that_differ(rank, world, url):
    out = []
    for call in (lambda: dckpt.save({f"r{rank}": torch.ones(4)}, url, step=5 + rank),
                 lambda: dckpt.async_save({f"r{rank}": torch.ones(4)}, url,
                                          step=10 + rank).wait(),
                 lambda: dckpt.load({"r0": torch.zeros(4), "r1": torch.zeros(4)}, url,
                                    step=1 + rank),
                 lambda: dckpt.load({"r0": torch.zeros(4), "r1": torch.zeros(4)}, url,
                                    partial=rank == 1)):
        try:
            call()
            out.append("no error")
        except dckpt.ArgumentError as e:
            out.append(str(e).split(": ", 1)[-1] if "failed on rank" in str(e) else str(e))
    out.append(dckpt.save({f"r{rank}": torch.full((4,), 2.0)}, url, step=2).step)  # in step
    return out


def test_ranks_that_pass_different_steps_are_refused_alike(tmp_path):
    """Rank 0's step decided for every rank: a save committed under it, and a load with
    another step on rank 1 read rank 0's step without a word."""
    url = str(tmp_path)
    run_ranks(_save_step, 2, url, 1)
    values = [o.value for o in run_ranks(_steps_that_differ, 2, url)]
    assert values[0] == values[1]
    save, async_save, load, partial, committed = values[0]
    assert save.startswith("the ranks asked to save different steps (5 on rank 0; 6 on rank "
                           "1); every rank must pass the same step")
    assert async_save.startswith("the ranks asked to save different steps (10 on rank 0; 11 on")
    assert load.startswith("the ranks asked to load different things (step=1, partial=False "
                           "on rank 0; step=2, partial=False on rank 1)")
    assert "step=None, partial=True on rank 1" in partial and committed == 2
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1, 2]
    assert leftovers(url) == []


def _save_while_the_other_loads(rank, world, url):
    from dckpt.config import LoadConfig, SaveConfig

    t0 = time.monotonic()
    try:
        if rank == 0:
            dckpt.save({"w": torch.full((64,), 2.0)}, url, step=2,
                       config=SaveConfig(collective_timeout_s=30))
        else:
            dckpt.load({"w": torch.zeros(64)}, url, config=LoadConfig(collective_timeout_s=30))
        return "no error", time.monotonic() - t0
    except dckpt.DckptError as e:
        return f"{type(e).__name__}: {e}", time.monotonic() - t0


def test_a_rank_that_loads_while_the_other_saves_fails_both_saying_so(tmp_path):
    """One rank's load met the other's save in the same collectives: the load's broken
    collective was an "unexpected RuntimeError", then both said a collective broke after
    the timeout; now both say which calls the ranks made, at once, and nothing is
    committed."""
    url = str(tmp_path)
    run_ranks(_save_step, 2, url, 1)
    (save, save_s), (load, load_s) = [o.value for o in run_ranks(
        _save_while_the_other_loads, 2, url)]
    assert save == load == ("ArgumentError: the ranks made different dckpt calls at once "
                            "(dckpt.save on rank 0; dckpt.load on rank 1); every rank calls "
                            "the same collective function at the same point, with the same "
                            "arguments where they must be alike"), (save, load)
    assert save_s < 15 and load_s < 15  # at once, not after the 30 s timeout
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1] and leftovers(url) == []


def _load_from_urls_of_their_own(rank, world, root):
    url = os.path.join(root, f"repo{rank}")
    dckpt.save({"w": torch.full((8,), float(rank))}, os.path.join(root, "repo0"), step=1)
    try:
        dckpt.load({"w": torch.zeros(8)}, url)
        return "loaded"
    except dckpt.DckptError as e:
        return f"{type(e).__name__}: {e}"


def test_ranks_that_load_from_different_urls_are_told_so(tmp_path):
    """Rank 1's URL holds no checkpoint: the error said only that no checkpoint loads
    cleanly, and to run verify, which finds rank 0's repository clean."""
    outcomes = [o.value for o in run_ranks(_load_from_urls_of_their_own, 2, str(tmp_path))]
    for message in outcomes:
        assert message.startswith("IntegrityError: no committed checkpoint"), message
        assert (f"The ranks passed different URLs (rank 0: {tmp_path}/repo0, rank 1: "
                f"{tmp_path}/repo1)") in message, message


def _node_local(rank, world, root):
    try:  # each rank its own folder, as with a path on each node's own disk
        dckpt.save({f"r{rank}": torch.ones(4)}, os.path.join(root, f"node{rank}"), step=1)
        return "committed"
    except dckpt.CommitError as e:
        return str(e).split(": ", 1)[1].splitlines()[0]


def test_ranks_that_write_where_the_coordinator_cannot_see_commit_nothing(tmp_path):
    """The manifest would reference rank 1's segment, which rank 0's store lacks: a
    checkpoint no load could read was committed."""
    values = [o.value for o in run_ranks(_node_local, 2, str(tmp_path))]
    assert values[0] == values[1] and "every rank must save to the same shared storage" in \
        values[0] and "data/s1-" in values[0] and "/r00001-000.seg" in values[0], values
    for rank in (0, 1):  # no manifest, and each rank took its segment back
        folder = str(tmp_path / f"node{rank}")
        assert dckpt.list_checkpoints(folder) == []
        assert [f for _, _, files in os.walk(folder) for f in files] == (
            ["dckpt.json"] if rank == 0 else [])


def _replicas_that_differ(rank, world, url):
    state = {"w": torch.ones(4 + rank), "d": torch.ones(4, dtype=[torch.float32,
                                                                  torch.float64][rank]),
             "same": torch.ones(3), "v": rank,
             "t": [torch.ones(2), 2.0][rank]}  # a tensor on one rank, a float on the other
    out = []
    for save in (lambda: dckpt.save(state, url, step=1),
                 lambda: dckpt.async_save(state, url, step=1).wait()):
        try:
            save()
            out.append("committed")
        except dckpt.CommitError as e:
            out.append(str(e).split("\n", 1)[1])
    return out


def test_a_key_that_ranks_hold_differently_is_refused_before_any_byte(tmp_path):
    """DCP keeps one rank's copy of a key that several ranks hold: the checkpoint committed
    and then refused the other rank's load (shape and dtype not its own)."""
    values = [o.value for o in run_ranks(_replicas_that_differ, 2, str(tmp_path))]
    assert values[0] == values[1] and values[0][0] == values[0][1]
    problems = values[0][0]
    assert "- w: shape [4] torch.float32 on rank 0, shape [5] torch.float32 on rank 1" in problems
    assert "- d: shape [4] torch.float32 on rank 0, shape [4] torch.float64 on rank 1" in problems
    # this one failed inside DCP's plan merge: "AssertionError: item.index.fqn not in md"
    assert "- t: shape [2] torch.float32 on rank 0, a value that is not a tensor on rank 1" \
        in problems
    assert "same:" not in problems and "v:" not in problems
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())
    assert dckpt.list_checkpoints(str(tmp_path)) == []


def _save_step(rank, world, url, step):
    return dckpt.save({"w": torch.full((64,), float(step))}, url, step=step).step


def _save_then_die(rank, world, url, victim):
    from dckpt_testing import arm

    own = {"w": _sharded(torch.full((4, 1 << 18), 1.0))}
    dckpt.save(own, url, step=1, config=dckpt.SaveConfig(collective_timeout_s=20))
    if rank == victim:
        arm("kill", after_bytes=1 << 20)  # SIGKILL this rank after 1 MiB of step 2
    # random: every block new (a constant tensor would be one block, written once)
    changed = torch.randn(4, 1 << 18, generator=torch.Generator().manual_seed(2))
    try:
        dckpt.save({"w": _sharded(changed)}, url, step=2,
                   config=dckpt.SaveConfig(collective_timeout_s=20))
    except dckpt.CommitError as e:
        return "CommitError", str(e)
    return "committed"


def _sharded(full):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return distribute_tensor(full, mesh, [Shard(0)])


def _load_full(rank, world, url):
    state = {"w": _sharded(torch.zeros(4, 1 << 18))}
    info = dckpt.load(state, url)
    return info.step, bool(torch.equal(state["w"].full_tensor(), torch.full((4, 1 << 18), 1.0)))


@pytest.mark.parametrize("victim", [0, 1])
def test_sigkill_of_one_rank_mid_save_leaves_the_previous_checkpoint(tmp_path, victim):
    url = f"faultyfile://{tmp_path}"
    outcomes = run_ranks(_save_then_die, 2, url, victim, allow_failures=True, timeout_s=90)
    assert outcomes[victim].killed
    survivor = outcomes[1 - victim]
    assert survivor.exitcode == 0 and survivor.value[0] == "CommitError", survivor
    assert not os.path.exists(tmp_path / "manifests" / "000000000002.json")
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]
    assert [o.value for o in run_ranks(_load_full, 2, str(tmp_path))] == [(1, True)] * 2


def _save_then_stop(rank, world, url, victim):
    from dckpt_testing import arm

    pids = [None] * world
    torch.distributed.all_gather_object(pids, os.getpid())
    config = dckpt.SaveConfig(collective_timeout_s=8)
    dckpt.save({"w": _sharded(torch.full((4, 1 << 18), 1.0))}, url, step=1, config=config)
    if rank == victim:
        arm("stop", after_bytes=1 << 20)  # SIGSTOP: frozen mid-write, sockets open
    changed = torch.randn(4, 1 << 18, generator=torch.Generator().manual_seed(2))
    t0 = time.monotonic()
    try:
        dckpt.save({"w": _sharded(changed)}, url, step=2, config=config)
        outcome = "committed"
    except dckpt.DckptError as e:
        outcome = type(e).__name__
    seconds = time.monotonic() - t0
    if rank != victim:  # the frozen rank goes on only after the others gave up
        os.kill(pids[victim], signal.SIGCONT)
    return outcome, seconds


@pytest.mark.parametrize("victim", [1])  # the coordinator frozen: the async test below
def test_a_rank_frozen_mid_save_is_an_error_in_bounded_time_and_commits_nothing(tmp_path,
                                                                                victim):
    """A rank stopped (SIGSTOP: alive, its sockets open, answering nothing) in its writes:
    the others raise CommitError once the collective timeout passes; resumed afterwards, the
    frozen rank fails too, and nothing is committed."""
    url = f"faultyfile://{tmp_path}"
    outcomes = run_ranks(_save_then_stop, 2, url, victim, allow_failures=True, timeout_s=120)
    survivor, frozen = outcomes[1 - victim], outcomes[victim]
    assert survivor.exitcode == 0 and survivor.value[0] == "CommitError", survivor
    assert 8 <= survivor.value[1] < 60, survivor  # the collective timeout, not forever
    assert frozen.value is not None and frozen.value[0] == "CommitError", frozen
    assert not os.path.exists(tmp_path / "manifests" / "000000000002.json")
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]
    assert [o.value for o in run_ranks(_load_full, 2, str(tmp_path))] == [(1, True)] * 2


def _save_on_a_hung_mount(rank, world, url, victim):
    from dckpt_testing import arm, disarm

    config = dckpt.SaveConfig(collective_timeout_s=60, io_stall_timeout_s=1)
    dckpt.save({"w": _sharded(torch.full((4, 1 << 18), 1.0))}, url, step=1, config=config)
    if rank == victim:
        arm("hang", after_bytes=1 << 20, delay_s=8)  # its writes block: a hung mount
    changed = torch.randn(4, 1 << 18, generator=torch.Generator().manual_seed(2))
    t0 = time.monotonic()
    try:
        dckpt.save({"w": _sharded(changed)}, url, step=2, config=config)
        outcome = "committed", ""
    except dckpt.DckptError as e:
        outcome = type(e).__name__, str(e)
    disarm()
    return (*outcome, time.monotonic() - t0)


@pytest.mark.parametrize("victim", [0])  # the coordinator: the others wait on it
def test_one_ranks_hung_mount_fails_the_save_on_every_rank_long_before_the_timeout(tmp_path,
                                                                                   victim):
    url = f"faultyfile://{tmp_path}"
    outcomes = run_ranks(_save_on_a_hung_mount, 2, url, victim, timeout_s=90)
    for o in outcomes:
        kind, message, seconds = o.value
        assert kind == "CommitError" and f"failed on rank {victim}" in message, o.value
        assert "stopped answering" in message and seconds < 8, o.value  # not 60 s
    assert [i.step for i in dckpt.list_checkpoints(str(tmp_path))] == [1]


def _load_with_fallback(rank, world, url):
    state = {"w": _sharded(torch.zeros(4, 1 << 18))}
    info = dckpt.load(state, url)
    return info.step, [s for s, _ in info.skipped], \
        bool(torch.equal(state["w"].full_tensor(), torch.full((4, 1 << 18), 1.0)))


def _save_two(rank, world, url):
    for step in (1, 2):
        dckpt.save({"w": _sharded(torch.full((4, 1 << 18), float(step)))}, url, step=step)


def test_ranks_agree_to_fall_back_when_one_rank_reads_a_bad_block(tmp_path):
    import json

    url = str(tmp_path)
    run_ranks(_save_two, 2, url)
    m = json.loads((tmp_path / "manifests" / "000000000002.json").read_text())
    rank1_segment = [s for s in m["segments"] if "/r00001-" in s][0]
    first = min(b.offset for e in dckpt.inspect(url, step=2).items.values()
                for c in getattr(e, "chunks", ()) for b in c.data.blocks
                if b.segment == rank1_segment)  # large items start past a few bytes of padding
    with open(tmp_path / rank1_segment, "r+b") as f:  # only rank 1's shard is damaged
        f.seek(first + 10)
        f.write(b"\x55\xaa")
    assert [o.value for o in run_ranks(_load_with_fallback, 2, url)] == [(1, [2], True)] * 2


class _PickyOnRank1:
    def state_dict(self) -> dict:
        return {"n": 1}

    def load_state_dict(self, sd: dict) -> None:
        if torch.distributed.get_rank() == 1:
            raise ValueError("rank 1 wants n=2")


def _load_where_one_stateful_refuses(rank, world, url):
    dckpt.save({"w": torch.ones(2), "thing": _PickyOnRank1()}, url, step=1)
    try:
        dckpt.load({"w": torch.zeros(2), "thing": _PickyOnRank1()}, url)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    return "loaded", ""


def test_a_stateful_that_refuses_on_one_rank_is_the_same_error_on_every_rank(tmp_path):
    """Only rank 1 raised (as a broken collective), rank 0 returned as if loaded."""
    values = [o.value for o in run_ranks(_load_where_one_stateful_refuses, 2, str(tmp_path))]
    assert values[0] == values[1], values
    kind, text = values[0]
    assert kind == "StateDictError" and "rank 1: thing: _PickyOnRank1.load_state_dict raised " \
        "ValueError: rank 1 wants n=2" in text


def _fsdp2_optimizer_restarted(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))

    def made():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
        fully_shard(model, mesh=mesh)
        return model, torch.optim.Adam(model.parameters())

    def train(model, opt, steps):
        for i in range(steps):
            model(torch.full((2, 8), float(i))).sum().backward()
            opt.step()
            opt.zero_grad()

    model, opt = made()
    train(model, opt, 2)
    dckpt.save({"model": model, "optim": opt}, url, step=1)
    out = {}
    model2, opt2 = made()  # the optimizer's state dict: not made (no parameters to place by)
    try:
        dckpt.load({"model": model2.state_dict(), "optim": opt2.state_dict()}, url)
    except dckpt.StateDictError as e:
        out["dicts"] = (str(e), opt2.state_dict()["state"])
    dckpt.load({"model": model2, "optim": opt2}, url)  # the optimizer itself: made, placed
    train(model, opt, 2)
    train(model2, opt2, 2)
    out["objects"] = all(torch.equal(a.full_tensor(), b.full_tensor())
                         for a, b in zip(model.parameters(), model2.parameters(), strict=True))
    return out


def test_a_restarted_fsdp2_optimizer_loads_its_sharded_state_given_the_optimizer(tmp_path):
    """State stored whole is made before a load (test_roundtrip); FSDP2's sharded state is
    made placed as its parameter where the load is given the optimizer itself, and training
    goes on bit-equal. Given its state dict (ids, no parameters), none of that optimizer's
    is made (its step counts alone would load as if they were all), and the refusal names
    the way."""
    out = [o.value for o in run_ranks(_fsdp2_optimizer_restarted, 2, str(tmp_path))]
    assert [o["objects"] for o in out] == [True, True]
    message = out[0]["dicts"][0]
    assert message == out[1]["dicts"][0] and "dckpt.TrainState(model, optimizer)" in message
    assert "optim.state.0.step: in the checkpoint but no rank's" in message
    assert [o["dicts"][1] for o in out] == [{}, {}]


def _load_into_a_meta_module_on_rank_1(rank, world, url):
    model = torch.nn.Linear(2, 2)
    dckpt.save({"model": model}, url, step=1)
    if rank == 1:
        model = torch.nn.Linear(2, 2, device="meta")
    try:
        dckpt.load({"model": model}, url)
    except dckpt.StateDictError as e:
        return str(e)
    return f"loaded onto {model.weight.device.type}"


def test_a_module_on_the_meta_device_on_one_rank_is_refused_on_every_rank(tmp_path):
    """It loaded nothing on that rank, and every rank reported success."""
    outcomes = run_ranks(_load_into_a_meta_module_on_rank_1, 2, str(tmp_path))
    assert outcomes[0].value == outcomes[1].value
    assert "rank 1: model: 2 tensors of this Linear are on the meta device" in outcomes[0].value


def _large_full() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"noise": torch.randn(512, 1024, generator=g),  # 1 MiB per rank
            "ramp": torch.arange(512 * 256, dtype=torch.float32).reshape(512, 256),
            "rand8": torch.randint(0, 256, (512, 1024), dtype=torch.uint8, generator=g)}


def _large_items(rank, world, url):
    """Items of hundreds of blocks (the commit's gather carries them as block tables),
    compressed and raw, a differential save over them, sync then async."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = {k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in _large_full().items()}
    state["own"] = torch.full((70 * 1024,), float(rank))  # 70 blocks of this rank's own
    config = dckpt.SaveConfig(block_size_bytes=4096, compression="on",
                              sparse_block_size_bytes=None, min_read_run_bytes=None)
    first = dckpt.save(state, url, step=1, config=config)
    state["noise"].to_local()[:8] += 1  # two blocks of each rank's shard change
    second = dckpt.async_save(state, url, step=2, config=config).wait(timeout=60)
    return first.bytes_written, second.bytes_written


def _load_large_items(rank, world, url):
    expected = _large_full()
    for start in (0, 256):  # the rows each of the 2 saving ranks changed
        expected["noise"][start:start + 8] += 1
    out = {k: torch.zeros_like(v) for k, v in expected.items()}
    info = dckpt.load(out, url, partial=True)  # another world size: the ranks' own keys left
    return (info.step, *(torch.equal(out[k], expected[k]) for k in sorted(expected)))


def test_items_of_many_blocks_cross_the_gather_as_tables_and_load_back(tmp_path):
    url = str(tmp_path / "repo")
    saved = run_ranks(_large_items, 2, url)
    first, second = saved[0].value
    assert saved[1].value == (first, second) and second < first / 10  # differential
    m = dckpt.inspect(url, step=2)
    assert max(len(c.data.blocks) for e in m.items.values()
               for c in getattr(e, "chunks", ())) >= 64
    assert {b.codec for b in m.refs()} >= {"raw", "zstd-planes-4"}  # rand8's, the floats'
    assert dckpt.inspect(url, step=2).items["rand8"].chunks[0].data.blocks[0].codec == "raw"
    assert dckpt.verify(url, all_steps=True).ok
    for world in (1, 2):
        outcomes = run_ranks(_load_large_items, world, url)
        assert [o.value for o in outcomes] == [(2, True, True, True)] * world


def _tied_dtensors(rank, world, url, differ, via_dcp=False):
    """One DTensor under two keys (FSDP2's tied embedding and output projection); through
    dckpt.load, or dcp.load with dckpt's Reader and DCP's own planner."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(24.0).reshape(6, 4)
    saved = {"emb": distribute_tensor(full, mesh, [Shard(0)]),
             "head": distribute_tensor(full + 1 if differ else full, mesh, [Shard(0)])}
    dckpt.save(saved, url, step=1)
    t = distribute_tensor(torch.zeros(6, 4), mesh, [Shard(1)])  # resharded on load
    try:
        if via_dcp:
            dcp.load({"emb": t, "head": t}, storage_reader=dckpt.Reader(url))
        else:
            dckpt.load({"emb": t, "head": t}, url)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e).splitlines()[1].strip()
    except BaseException as e:  # DCP's CheckpointException: each rank's failure
        if not hasattr(e, "failures"):
            raise
        first = e.failures[min(e.failures)][0]
        return type(first).__name__, str(first).splitlines()[1].strip()
    return 1, torch.equal(t.full_tensor(), full)


@pytest.mark.parametrize("via_dcp", [False, True], ids=["dckpt.load", "dcp.load"])
def test_a_dtensor_under_two_keys_loads_once_or_is_refused_alike(tmp_path, via_dcp):
    assert [o.value for o in run_ranks(_tied_dtensors, 2, str(tmp_path / "same"), False,
                                       via_dcp)] == [(1, True), (1, True)]
    out = [o.value for o in run_ranks(_tied_dtensors, 2, str(tmp_path / "apart"), True,
                                      via_dcp)]
    assert out[0] == out[1] and out[0][0] == "StateDictError", out
    assert "head: one tensor with emb in the state dict (tied weights)" in out[0][1], out
