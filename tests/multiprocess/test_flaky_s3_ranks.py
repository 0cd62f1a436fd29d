"""Two gloo ranks on an S3 server behind a proxy that resets connections: each rank's
requests fail at other moments, and every save and load still ends the same on both ranks
(the same values, or the same error), and what the repository holds loads bit-equal."""

from __future__ import annotations

import pytest
import torch

import dckpt
from dckpt_testing import FlakyProxy, run_ranks

STEPS = 6


def _state(rank: int, step: int) -> dict:
    return {"w": torch.full((40_000,), float(step)),
            f"rank{rank}.x": torch.full((500,), float(10 * step + rank)), "n": step}


def _blank(rank: int) -> dict:
    return {"w": torch.zeros(40_000), f"rank{rank}.x": torch.zeros(500), "n": 0}


def _saves_and_loads(rank, world, url, options):
    outcomes = []
    for step in range(1, STEPS + 1):
        try:
            if step % 2:
                dckpt.save(_state(rank, step), url, step=step, storage_options=options)
            else:
                dckpt.async_save(_state(rank, step), url, step=step,
                                 storage_options=options).wait(timeout=120)
            outcomes.append(("save", step, "ok"))
        except dckpt.DckptError as e:
            outcomes.append(("save", step, type(e).__name__))
        got = _blank(rank)
        try:
            info = dckpt.load(got, url, storage_options=options)
            want = _state(rank, info.step)
            assert all(torch.equal(got[k], v) if isinstance(v, torch.Tensor) else got[k] == v
                       for k, v in want.items()), f"rank {rank}: step {info.step} differs"
            outcomes.append(("load", step, info.step))
        except dckpt.DckptError as e:
            outcomes.append(("load", step, type(e).__name__))
    return outcomes


def _loads(rank, world, url, options, steps):
    for step in steps:
        got = _blank(rank)
        dckpt.load(got, url, step=step, storage_options=options)
        assert torch.equal(got[f"rank{rank}.x"], _state(rank, step)[f"rank{rank}.x"])
    return True


@pytest.mark.parametrize("seed", [3, 5])
def test_ranks_end_every_call_alike_through_resets(s3_repo, moto_server, seed):
    url, options = s3_repo
    proxy = FlakyProxy(moto_server.port, p=0.8, seed=seed)
    try:
        out = run_ranks(_saves_and_loads, 2, url, proxy.options(), timeout_s=300)
    finally:
        proxy.close()
    assert proxy.resets >= 3
    assert out[0].value == out[1].value  # the same outcome of every call on both ranks
    for _call, _step, result in out[0].value:
        assert result == "ok" or isinstance(result, int) or result in (
            "StorageError", "CommitError", "CheckpointNotFoundError"), result
    listed = [c.step for c in dckpt.list_checkpoints(url, storage_options=options)]
    assert {s for c, s, r in out[0].value if c == "save" and r == "ok"} <= set(listed)
    assert dckpt.verify(url, all_steps=True, storage_options=options).ok
    assert all(o.value for o in run_ranks(_loads, 2, url, options, listed))
