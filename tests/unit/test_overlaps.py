"""Destinations of a load that share memory. A load writes each key's bytes into its
destination and checks them there: two keys whose destinations overlapped wrote into each
other, and a sound checkpoint was reported damaged ("the object is damaged") and skipped
for an older one. Tied weights (one tensor under two keys) load when the checkpoint holds
equal values for them, and are refused, not skipped, when it does not; plain tensors that
overlap in part load where the checkpoint agrees on the elements they share (a save of
them), and are refused, not skipped, where it does not (other partial overlaps: before
anything is read); views that share no element load as any others."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dckpt
from dckpt.overlaps import shared_memory


def _zeros(**kw):
    out = {"a": torch.zeros(3, 4), "b": torch.zeros(4), "c": torch.zeros(6)}
    out.update(kw)
    return out


SAVED = {"a": torch.arange(12.0).reshape(3, 4), "b": torch.arange(4.0) + 100,
         "c": torch.arange(6.0) + 200}


@pytest.mark.parametrize("how", ["dckpt.load", "dcp.load"])
def test_views_that_overlap_in_part_load_what_a_save_of_them_holds(tmp_path, how):
    """A save of views of one buffer that share some elements was committed, and a load
    into the same views was refused (a save that the natural load did not accept)."""
    url = str(tmp_path / "r")
    buf = torch.arange(24.0)
    saved = {"a": buf[:16].view(4, 4), "b": buf[8:].view(4, 4).t(), "c": buf[::3]}
    dckpt.save(saved, url, step=1)
    dckpt.save({"a": torch.ones(4, 4), "b": torch.zeros(4, 4), "c": torch.ones(8)}, url,
               step=2)  # separate tensors: the shared elements differ
    for step in (1, 2):
        dest = torch.full((24,), -1.0)
        out = {"a": dest[:16].view(4, 4), "b": dest[8:].view(4, 4).t(), "c": dest[::3]}
        failure = _load(out, url, step, how)
        if step == 1:
            assert failure is None and torch.equal(dest, buf)
            assert all(out[k].data_ptr() == saved_ptr for k, saved_ptr in
                       (("a", dest.data_ptr()), ("c", dest.data_ptr())))  # in place
        else:
            assert isinstance(failure, dckpt.StateDictError), failure
            assert "its memory overlaps that of" in str(failure)
            assert "holds different values for the elements they share" in str(failure)
            assert "damaged" not in str(failure)


def _load(state, url, step, how):
    """What a load raised (dckpt.load, or dcp.load with dckpt's Reader and DCP's planner)."""
    if how == "dcp.load":
        return _dcp_failure(state, url, step)
    try:
        dckpt.load(state, url, step=step)
    except dckpt.DckptError as e:
        return e
    return None


def test_a_load_into_overlapping_views_falls_back_past_damage_not_past_them(tmp_path):
    url = str(tmp_path / "r")
    buf = torch.arange(8.0)
    dckpt.save({"b": buf[0:4], "c": buf[2:8]}, url, step=1)
    dckpt.save({"b": buf[0:4] + 1, "c": buf[2:8] + 1}, url, step=2)
    seg = next((tmp_path / "r" / "data").glob("s2-*/*.seg"))
    raw = bytearray(seg.read_bytes())
    raw[3] ^= 0xFF
    seg.write_bytes(bytes(raw))
    dest = torch.zeros(8)
    info = dckpt.load({"b": dest[0:4], "c": dest[2:8]}, url)
    assert info.step == 1 and [s for s, _ in info.skipped] == [2] and torch.equal(dest, buf)


@pytest.mark.parametrize("layout", ["columns", "interleaved", "rows"])
def test_views_of_one_buffer_that_share_no_element_load(tmp_path, layout):
    """Their byte ranges intersect (all but rows), their elements do not."""
    url = str(tmp_path / "r")
    saved = {"x": torch.arange(12.0).reshape(4, 3), "y": torch.arange(12.0).reshape(4, 3) + 50}
    dckpt.save(saved, url, step=1)
    buf = torch.zeros(4, 6) if layout != "interleaved" else torch.zeros(24)
    if layout == "columns":
        x, y = buf[:, :3], buf[:, 3:]
    elif layout == "interleaved":
        x, y = buf[0::2].view(4, 3), buf[1::2].view(4, 3)
    else:
        x, y = buf.view(8, 3)[:4], buf.view(8, 3)[4:]
    out = {"x": x, "y": y}
    dckpt.load(out, url)
    assert torch.equal(x, saved["x"]) and torch.equal(y, saved["y"])


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(10, 4)
        self.head = torch.nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight  # tied, as language models tie them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def test_tied_weights_load_into_one_tensor(tmp_path):
    url = str(tmp_path / "r")
    torch.manual_seed(0)
    model = Tied()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.tensor([1, 2])).sum().backward()
    opt.step()
    dckpt.save({"app": dckpt.TrainState(model, opt)}, url, step=1)
    torch.manual_seed(1)
    again = Tied()
    opt2 = torch.optim.AdamW(again.parameters())
    info = dckpt.load({"app": dckpt.TrainState(again, opt2)}, url)
    assert info.step == 1 and not info.skipped
    assert again.head.weight is again.emb.weight
    assert torch.equal(again.emb.weight, model.emb.weight)
    assert torch.equal(opt2.state[again.emb.weight]["exp_avg"],
                       opt.state[model.emb.weight]["exp_avg"])


def test_tied_keys_the_checkpoint_holds_apart_are_refused_not_skipped(tmp_path):
    """An older checkpoint whose values were equal must not be restored in its place."""
    url = str(tmp_path / "r")
    dckpt.save({"a": torch.ones(4), "b": torch.ones(4)}, url, step=1)
    dckpt.save({"a": torch.ones(4), "b": torch.zeros(4)}, url, step=2)
    t = torch.full((4,), 7.0)
    with pytest.raises(dckpt.StateDictError) as e:
        dckpt.load({"a": t, "b": t}, url)
    assert "b: one tensor with a in the state dict (tied weights), but the checkpoint holds " \
           "different values" in str(e.value)
    assert dckpt.load({"a": t, "b": t}, url, step=1).step == 1  # equal there: loads
    assert torch.equal(t, torch.ones(4))


def _overlapping_dtensors(rank, world, url):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh("cpu", (world,))
    dckpt.save({"b": torch.ones(4), "c": torch.ones(6)}, url, step=1)
    buf = torch.full((8,), -1.0)
    out = {k: DTensor.from_local(v, mesh, [Replicate()]) for k, v in
           (("b", buf[0:4]), ("c", buf[2:8]))}
    try:
        dckpt.load(out, url)
    except dckpt.StateDictError as e:
        return str(e), buf.tolist()
    return None, buf.tolist()


def test_dtensors_that_overlap_in_part_are_refused_before_any_read(tmp_path):
    """Only plain tensors are read apart and copied; DTensors that overlap in part are
    refused as before."""
    from dckpt_testing import run_ranks

    (out,) = run_ranks(_overlapping_dtensors, 1, str(tmp_path / "r"))
    said, buf = out.value
    assert "c: its memory overlaps that of b in part" in said and buf == [-1.0] * 8


def _dcp_failure(state, url, step):
    """What ``dcp.load`` with dckpt's Reader and DCP's own planner raised on this rank."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.load(state, storage_reader=dckpt.Reader(url, step=step))
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        return e.failures[0][0]  # type: ignore[attr-defined]
    return None


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "offset"])
def test_dcp_load_with_its_own_planner_reads_tied_keys_apart(tmp_path, layout):
    """DCP's planner reads every key into its destination: where that takes a copy (a
    transposed view), the later key's values landed in both keys, silently; where it reads
    in place, the check of the first key failed ("damaged")."""
    url = str(tmp_path / "r")
    a = torch.arange(16.0).reshape(4, 4)
    dckpt.save({"a": a, "b": a + 100}, url, step=1)
    dckpt.save({"a": a, "b": a.clone()}, url, step=2)

    def tied():
        buf = torch.full((20,), -1.0)
        t = {"contiguous": buf[:16].view(4, 4), "transposed": buf[:16].view(4, 4).t(),
             "offset": buf[4:].view(4, 4)}[layout]
        return {"a": t, "b": t}

    state = tied()
    failure = _dcp_failure(state, url, 1)
    assert isinstance(failure, dckpt.StateDictError), failure
    assert "b: one tensor with a in the state dict (tied weights), but the checkpoint holds " \
           "different values" in str(failure)
    state = tied()
    assert _dcp_failure(state, url, 2) is None
    assert torch.equal(state["a"], a) and state["b"] is state["a"]  # the caller's tensor


def test_three_keys_on_one_tensor_and_a_view_beside_them(tmp_path):
    url = str(tmp_path / "r")
    saved = {"p": torch.arange(4.0), "q": torch.arange(4.0), "r": torch.arange(4.0),
             "s": torch.arange(4.0) + 9}
    dckpt.save(saved, url, step=1)
    buf = torch.zeros(8)
    t = buf[:4]
    out = {"p": t, "q": t, "r": buf[:4], "s": buf[4:]}  # r: another view object, same memory
    dckpt.load(out, url)
    assert torch.equal(buf, torch.cat([torch.arange(4.0), torch.arange(4.0) + 9]))


@st.composite
def _views(draw: st.DrawFn) -> list[tuple[int, tuple[int, ...], tuple[int, ...]]]:
    """Views of a 64-element buffer: (offset, shape, stride), each its own elements once."""
    out = []
    for _ in range(draw(st.integers(2, 4))):
        inner = draw(st.integers(1, 3))
        n1 = draw(st.integers(1, 4))
        if draw(st.booleans()):  # one dimension
            shape, stride = (n1,), (inner,)
        else:
            n0 = draw(st.integers(1, 3))
            shape, stride = (n0, n1), ((n1 - 1) * inner + draw(st.integers(1, 4)), inner)
        span = sum((n - 1) * s for n, s in zip(shape, stride)) + 1
        out.append((draw(st.integers(0, 64 - span)), shape, stride))
    return out


def _elements(offset, shape, stride) -> set[int]:
    index = torch.arange(64).as_strided(shape, stride, offset)
    return set(index.reshape(-1).tolist())


@settings(max_examples=300, deadline=None, database=None)
@given(_views())
def test_overlaps_are_found_exactly_as_the_elements_say(views):
    """Against the elements each view covers: two keys that share one are tied (the later
    to the same view) or both read apart (any other); keys that share none are neither."""
    buf = torch.zeros(64)
    flat = {f"k{i}": buf.as_strided(shape, stride, offset)
            for i, (offset, shape, stride) in enumerate(views)}
    problems, tied = shared_memory(flat)
    assert problems == []
    flagged = {t.key for t in tied}
    want = set()
    for j, b in enumerate(views):
        for i, a in enumerate(views[:j]):
            if a == b:
                want.add(f"k{j}")
            elif _elements(*a) & _elements(*b):  # both, or the view each is tied to
                want |= {f"k{views.index(a)}", f"k{views.index(b)}"}
    assert flagged == want, (views, problems, tied)
    for t in tied:
        if t.overlap:
            assert _elements(*views[int(t.key[1:])]) & _elements(*views[int(t.first[1:])])
        else:
            assert views[int(t.key[1:])] == views[int(t.first[1:])]


@settings(max_examples=60, deadline=None, database=None)
@given(_views(), st.booleans())
def test_random_views_of_one_buffer_load_what_their_save_holds(tmp_path_factory, views, agree):
    """End to end: views saved from one buffer load into the same views of another, bit
    for bit; saved from separate tensors (disagreeing where they share elements), the load
    is refused where two share an element, and loads where none do."""
    url = str(tmp_path_factory.mktemp("r"))
    src = torch.randn(64)
    saved = {f"k{i}": src.as_strided(shape, stride, offset) if agree
             else torch.randn(shape) for i, (offset, shape, stride) in enumerate(views)}
    dckpt.save(saved, url, step=1)
    dest = torch.full((64,), float("nan"))
    out = {f"k{i}": dest.as_strided(shape, stride, offset)
           for i, (offset, shape, stride) in enumerate(views)}
    sharing = any(_elements(*a) & _elements(*b) and a != b
                  for j, b in enumerate(views) for a in views[:j])
    tied_apart = any(a == b for j, b in enumerate(views) for a in views[:j])
    try:
        dckpt.load(out, url)
    except dckpt.StateDictError as e:
        assert not agree and (sharing or tied_apart), (views, str(e))
        return
    assert agree or not (sharing or tied_apart), views
    for key, t in out.items():
        assert torch.equal(t, saved[key]), (views, key)
