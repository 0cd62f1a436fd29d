"""What a save accepts, a load restores: random nested state dicts (dicts, lists, tuples,
every value type, tensors of every dtype as views, transposes, slices, conjugates and
expansions, odd keys) are saved sync or async; either the save refuses with a DckptError
and commits nothing, or a load into a state of the same structure gives every value back,
bit for bit."""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

import dckpt
from dckpt import memory

EXAMPLES = int(os.environ.get("DCKPT_HYPOTHESIS_EXAMPLES_STATES", "60"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8,
          torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
          torch.float8_e4m3fn]
KEYS = st.text(alphabet="ab_.0-é", max_size=3)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    n = math.prod(shape)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    t = raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype)
    view = draw(st.sampled_from(["plain", "transposed", "sliced", "conjugate", "expanded"]))
    if view == "transposed" and t.dim() >= 2:
        t = t.transpose(0, 1)
    elif view == "sliced" and t.dim() >= 1:
        t = t[::2]
    elif view == "conjugate" and t.is_complex():
        t = t.conj()
    elif view == "expanded" and t.dim() >= 1 and t.shape[0] == 1:
        t = t.expand(3, *t.shape[1:])
    return t


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**63 - 1),
                    st.floats(allow_nan=True), st.text(max_size=4), st.binary(max_size=4))
VALUES = st.recursive(st.one_of(SCALARS, tensors()),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(KEYS, inner, max_size=3),
                                              st.tuples(inner, inner)),
                      max_leaves=6)
STATES = st.dictionaries(KEYS, VALUES, max_size=4)


def _like(v: object) -> object:
    """A destination of the same structure: zeroed tensors, no values."""
    if isinstance(v, torch.Tensor):
        return torch.zeros(v.shape, dtype=v.dtype)
    if isinstance(v, dict):
        return {k: _like(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_like(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_like(x) for x in v)
    return None


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.resolve_conj().reshape(-1).clone(memory_format=torch.contiguous_format).view(torch.uint8)


def _assert_same(want: object, got: object, path: str = "state") -> None:
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), path
        assert (got.shape, got.dtype) == (want.shape, want.dtype), path
        assert torch.equal(_bits(want), _bits(got)), path
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), path
        for k in want:
            _assert_same(want[k], got[k], f"{path}[{k!r}]")
    elif isinstance(want, list | tuple):
        assert type(got) is type(want) and len(got) == len(want), path
        for i, (w, g) in enumerate(zip(want, got)):
            _assert_same(w, g, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert isinstance(got, float) and math.isnan(got), path
    else:
        assert type(got) is type(want) and got == want, path


def test_whatever_a_save_accepts_a_load_restores_bit_for_bit(tmp_path_factory):
    tried = {"saved": 0, "refused": 0}

    @seed(20261202)
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(STATES, st.sampled_from(["sync", "async"]))
    def check(state: dict, mode: str) -> None:
        url = str(tmp_path_factory.mktemp("repo"))
        try:
            if mode == "sync":
                dckpt.save(state, url, step=1)
            else:
                dckpt.async_save(state, url, step=1).wait(timeout=60)
        except dckpt.DckptError:
            tried["refused"] += 1
            assert not os.path.exists(os.path.join(url, "manifests", "000000000001.json"))
            return
        tried["saved"] += 1
        out = _like(state)
        dckpt.load(out, url)  # type: ignore[arg-type]
        _assert_same(state, out)

    check()
    assert tried["saved"] >= EXAMPLES // 2, tried  # the states are mostly savable


MEMORY_EXAMPLES = int(os.environ.get("DCKPT_HYPOTHESIS_EXAMPLES_MEMORY", "20"))


def test_whatever_a_memory_save_accepts_its_restore_and_storage_copy_give_back(tmp_path_factory):
    """The memory tier's own path: tensors staged into /dev/shm-style files, read back
    mapped, and copied from there to storage (a drain): after a crash the restore from
    memory, and after a clean end (memory removed) the one from the storage copy, give
    every value back bit for bit; a refused state commits nothing in either tier."""
    tried = {"memory": 0, "storage": 0, "refused": 0}

    @seed(20261203)
    @settings(max_examples=MEMORY_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(STATES, st.sampled_from(["crash", "clean end"]))
    def check(state: dict, end: str) -> None:
        url, shm = str(tmp_path_factory.mktemp("repo")), str(tmp_path_factory.mktemp("shm"))
        failed: list = []
        mgr = dckpt.CheckpointManager(url, save_every_steps=2, memory_every_steps=1,
                                      memory_dir=shm, handle_signals=False,
                                      on_failure=lambda step, e: failed.append(e))
        mgr.maybe_save(2, state)
        mgr._poll(wait=True)
        mgr._close(remove_memory=end == "clean end")
        if failed:
            assert all(isinstance(e, dckpt.DckptError) for e in failed), failed
            tried["refused"] += 1
            held = memory.held(url, shm)  # (folder, bytes, newest step), or None
            assert dckpt.list_checkpoints(url) == [] and (held is None or held[2] is None)
            return
        out = _like(state)
        with dckpt.CheckpointManager(url, memory_every_steps=1, memory_dir=shm,
                                     handle_signals=False) as again:
            info = again.restore(out)  # type: ignore[arg-type]
        assert (info.step, info.tier) == (2, "memory" if end == "crash" else "storage")
        tried[info.tier] += 1
        _assert_same(state, out)

    check()
    assert tried["memory"] and tried["storage"] and tried["refused"] < MEMORY_EXAMPLES // 2, tried


def test_dcp_save_through_the_writer_with_dcps_planner_commits_only_what_loads(tmp_path):
    """dcp.save with a dckpt Writer and DCP's own planner pickles values unchecked: a value
    that weights_only refuses (a datetime) was committed, and no load could read it."""
    import datetime

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    url = str(tmp_path / "repo")
    with pytest.raises(CheckpointException) as caught:  # DCP's own error, around dckpt's
        dcp.save({"w": torch.ones(2), "when": datetime.datetime(2026, 1, 1)},
                 storage_writer=dckpt.Writer(url, step=1))
    assert "when: its value would be refused by the load" in str(caught.value)
    assert dckpt.list_checkpoints(url) == []
    dcp.save({"w": torch.ones(2), "n": 7}, storage_writer=dckpt.Writer(url, step=2))
    out = {"w": torch.zeros(2), "n": 0}
    dcp.load(out, storage_reader=dckpt.Reader(url, step=2))
    assert out["n"] == 7 and torch.equal(out["w"], torch.ones(2))
