"""Fallback on real gloo ranks: every kind of damage, the ranks agreeing, on 4 ranks and
resharded onto 2."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt_testing import run_ranks
from restore_damage import KINDS, damage


def _full(step: int) -> torch.Tensor:
    return torch.randn(16, 4096, generator=torch.Generator().manual_seed(step))


def _sharded(full: torch.Tensor):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    return distribute_tensor(full, mesh, [Shard(0)])


def _save_steps(rank, world, urls):
    for url in urls:
        for step in (1, 2):
            dckpt.save({"w": _sharded(_full(step)), "step": step}, url, step=step)


def _load(rank, world, urls):
    out = []
    for url in urls:
        state = {"w": _sharded(torch.zeros(16, 4096)), "step": 0}
        info = dckpt.load(state, url)
        out.append((info.step, [s for s, _ in info.skipped], state["step"],
                    bool(torch.equal(state["w"].full_tensor(), _full(info.step)))))
    return out


def test_ranks_agree_on_the_fallback_for_every_damage_and_on_another_world_size(tmp_path):
    """One repository per kind of damage (the same ranks save and load them all: a spawn
    of 4 ranks costs seconds)."""
    urls = [str(tmp_path / kind) for kind in KINDS]
    run_ranks(_save_steps, 4, urls)
    for kind in KINDS:
        damage(tmp_path / kind, 2, kind, rank=1)  # only rank 1's data (or the shared manifest)
    want = dict.fromkeys(KINDS, (1, [2], 1, True))
    for world in (4, 2):
        for o in run_ranks(_load, world, urls):
            assert dict(zip(KINDS, o.value)) == want, (world, o.rank)


def _replicated_state(step: int) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    return {f"ddp.layer{i}": torch.randn(64, 1024, generator=g) for i in range(5)}


def _save_replicated(rank, world, url):
    for step in (1, 2):
        state = _replicated_state(step)
        dckpt.save({**state, "w": _sharded(_full(step))}, url, step=step)


def _save_and_load_replicated(rank, world, url):
    """Saved, then loaded by every rank reading it (``read``) and read once and broadcast."""
    _save_replicated(rank, world, url)
    return [_load_replicated(rank, world, url, mode) for mode in ("read", "broadcast")]


def _load_replicated(rank, world, url, mode):
    # parameters that require grad, as named_parameters() gives them: broadcast into too
    state = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in _replicated_state(0).items()}
    state["w"] = _sharded(torch.zeros(16, 4096))
    info = dckpt.load(state, url, config=dckpt.LoadConfig(replicated=mode))
    want = _replicated_state(info.step)
    ok = (all(torch.equal(state[k], v) for k, v in want.items())
          and torch.equal(state["w"].full_tensor(), _full(info.step)))
    return info.step, [s for s, _ in info.skipped], ok, info.bytes_read


def test_replicated_state_read_once_and_broadcast(tmp_path):
    url = str(tmp_path)
    read, once = zip(*(o.value for o in run_ranks(_save_and_load_replicated, 3, url)))
    read, once = list(read), list(once)
    assert all(v[:3] == (2, [], True) for v in read + once), (read, once)
    replicated_bytes = 5 * 64 * 1024 * 4
    # every rank read the 5 replicated tensors, against each read once over all ranks
    assert read[0][3] - once[0][3] == 2 * replicated_bytes
    # onto another world size, and falling back past damage in a replicated tensor
    assert [o.value[:3] for o in run_ranks(_load_replicated, 2, url, "broadcast")] == \
        [(2, [], True)] * 2
    damage(tmp_path, 2, "flipped_byte", rank=0)  # rank 0 wrote the replicated tensors
    assert [o.value[:3] for o in run_ranks(_load_replicated, 3, url, "broadcast")] == \
        [(1, [2], True)] * 3


_GLOO_REFUSES = [torch.float8_e4m3fn, torch.float8_e5m2, torch.int16, torch.uint16,
                 torch.uint32, torch.uint64]  # "Invalid scalar type" from a gloo broadcast


def _replicated_dtypes(fill: float) -> dict:
    out = {str(d).removeprefix("torch."): torch.full((3, 5), fill).to(d) for d in
           [*_GLOO_REFUSES, torch.bool, torch.complex32, torch.bfloat16, torch.float32]}
    out["complex64"] = torch.full((3, 5), fill, dtype=torch.complex64) * (1 + 2j)
    return out


def _broadcast_every_dtype(rank, world, url):
    dckpt.save(_replicated_dtypes(3.0), url, step=1)
    state = {k: torch.zeros_like(v) for k, v in _replicated_dtypes(0.0).items()}
    state["float32"] = torch.zeros(5, 3).t()  # not contiguous: through a host buffer
    state["complex64"] = torch.zeros(3, 5, dtype=torch.complex64).conj()  # a lazy conjugate
    dckpt.load(state, url, config=dckpt.LoadConfig(replicated="broadcast"))
    from dckpt.dtypes import flat_bytes

    def raw(t):  # torch.equal has no kernel for some of these dtypes
        return flat_bytes(t.resolve_conj().contiguous())

    return sorted(k for k, v in _replicated_dtypes(3.0).items()
                  if not torch.equal(raw(state[k]), raw(v)))


def test_replicated_tensors_of_every_dtype_are_broadcast(tmp_path):
    """Read once and broadcast as bytes: gloo refuses float8, int16 and the unsigned
    integers beyond uint8, and a load of a replicated tensor of one failed on every rank
    with an unexpected "RuntimeError: Invalid scalar type"."""
    assert [o.value for o in run_ranks(_broadcast_every_dtype, 2, str(tmp_path))] == [[], []]


def _load_where_rank1_runs_out_of_memory(rank, world, url, step):
    import dckpt.api

    real = dckpt.api.decode_manifest

    def decode(raw, at, where):
        if rank == 1 and at == 2:  # every rank decodes the manifest; here only one fails
            raise MemoryError("no room for the block references")
        return real(raw, at, where)

    dckpt.api.decode_manifest = decode
    state = {"w": _sharded(torch.zeros(16, 4096)), "step": 0}
    try:
        info = dckpt.load(state, url, step=step)
    except dckpt.DckptError as e:
        return type(e).__name__, str(e)
    return (info.step, [(s, r) for s, r in info.skipped], info.tried,
            bool(torch.equal(state["w"].full_tensor(), _full(info.step))))


def test_a_manifest_one_rank_cannot_decode_is_skipped_by_all_or_refused_on_all(tmp_path):
    url = str(tmp_path)
    run_ranks(_save_steps, 3, [url])
    newest = [o.value for o in run_ranks(_load_where_rank1_runs_out_of_memory, 3, url, None)]
    assert newest[0][0] == 1 and newest[0][2] == (1,) and newest[0][3], newest
    assert [s for s, _ in newest[0][1]] == [2] and "rank 1" in newest[0][1][0][1], newest
    assert newest == [newest[0]] * 3  # the same fallback, and the same reason, on every rank
    asked = [o.value for o in run_ranks(_load_where_rank1_runs_out_of_memory, 3, url, 2)]
    assert asked[0][0] == "IntegrityError" and "does not fit in memory" in asked[0][1], asked
    assert asked == [asked[0]] * 3


def _load_and_die(rank, world, url, victim, fault):
    import os
    import signal
    import time

    dckpt.save({"w": _sharded(_full(1)), f"rank{rank}.x": torch.full((4,), float(rank))}, url,
               step=1)
    pids = [None] * world
    torch.distributed.all_gather_object(pids, os.getpid())
    if rank == victim:  # dies (or freezes) in its first read of the checkpoint's data
        read = os.preadv

        def dying_read(fd, buffers, offset):
            os.preadv = read
            os.kill(os.getpid(), signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
            return read(fd, buffers, offset)

        os.preadv = dying_read
    state = {"w": _sharded(torch.zeros(16, 4096)), f"rank{rank}.x": torch.zeros(4)}
    t0 = time.monotonic()
    try:
        dckpt.load(state, url, config=dckpt.LoadConfig(collective_timeout_s=6))
        outcome = "loaded"
    except dckpt.DckptError as e:
        outcome = type(e).__name__
    seconds = time.monotonic() - t0
    if rank != victim and fault == "stop":  # it goes on after the others gave up, and
        os.kill(pids[victim], signal.SIGCONT)  # fails too: its peers are gone
    return outcome, seconds


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_rank_that_dies_or_freezes_mid_load_is_an_error_on_the_others_in_bounded_time(
        tmp_path, fault):
    outcomes = run_ranks(_load_and_die, 2, str(tmp_path), 1, fault, allow_failures=True,
                         timeout_s=90)
    survivor, victim = outcomes
    assert survivor.exitcode == 0 and survivor.value[0] == "DckptError", survivor
    assert survivor.value[1] < 30, survivor  # the collective timeout (6 s), not forever
    if fault == "kill":
        assert victim.exitcode == -9
    else:
        assert victim.value is not None and victim.value[0] == "DckptError", victim
