"""Restore: fallback on every kind of damage, quarantine, partial restore, the recovery report."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch

import dckpt
from dckpt.cli import main as cli
from dckpt.config import LoadConfig
from dckpt_testing import reseal
from restore_damage import KINDS, damage


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)  # no block in common between steps
    return {"model": {"w": torch.randn(300, 200, generator=g), "b": torch.randn(200, generator=g)},
            "optim": {"m": torch.randn(300, 200, generator=g)}, "loader": {"position": step}}


def _empty() -> dict:
    return {"model": {"w": torch.zeros(300, 200), "b": torch.zeros(200)},
            "optim": {"m": torch.zeros(300, 200)}, "loader": {"position": -1}}


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def _three(url: str) -> None:
    for step in (1, 2, 3):
        dckpt.save(_state(step), url, step=step)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_damage_falls_back_to_the_previous_checkpoint(tmp_path, kind):
    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 3, kind)
    out = _empty()
    info = dckpt.load(out, url)
    assert info.step == 2 and _same(out, _state(2))
    assert [s for s, _ in info.skipped] == [3]
    assert info.tried == ((3, 2) if kind != "truncated_manifest" else (2,))
    assert info.data_lost_steps == 1
    with pytest.raises(dckpt.IntegrityError):
        dckpt.load(_empty(), url, step=3)


def test_the_recovery_report_says_what_was_read_and_lost(tmp_path):
    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 3, "flipped_byte")
    info = dckpt.load(_empty(), url)
    m2 = dckpt.inspect(url, step=2)
    m3 = dckpt.inspect(url, step=3)
    assert info.bytes_read >= m2.bytes_logical  # every byte of step 2 (and what 3 read first)
    assert info.data_lost_s == pytest.approx(m3.created_at - m2.created_at)
    for phase in ("find", "plan", "read", "io_thread", "verify_thread", "copy", "total"):
        assert info.phase_s[phase] >= 0, phase
    assert info.phase_s["total"] >= info.phase_s["read"]
    clean = dckpt.load(_empty(), url, step=2)
    assert clean.tried == (2,) and clean.skipped == () and clean.data_lost_steps is None


@pytest.mark.parametrize("failure", [
    ConnectionResetError(104, "Connection reset by peer"),
    PermissionError(13, "Permission denied"),
    TimeoutError("timed out"),
    OSError(5, "Input/output error"),  # a medium error under this manifest: damage
])
def test_a_newest_manifest_the_storage_fails_to_give_is_an_error_not_a_fallback(
        tmp_path, monkeypatch, failure):
    """The storage failing to give the newest manifest (a reset, a refusal, a timeout) said
    nothing about it, yet the load fell back and restored an older step: training since
    then lost, where a retry would have found it. Only a manifest unreadable for a reason
    of its own (EIO, ELOOP) is skipped, as damage."""
    from dckpt.storage import Store

    url = str(tmp_path)
    _three(url)
    real = Store.read_bytes

    def read_bytes(self, name):
        if name.endswith("000000000003.json"):
            raise failure
        return real(self, name)

    monkeypatch.setattr(Store, "read_bytes", read_bytes)
    out = _empty()
    if getattr(failure, "errno", None) == 5:
        info = dckpt.load(out, url)
        assert info.step == 2 and [s for s, _ in info.skipped] == [3]
        return
    with pytest.raises(dckpt.StorageError, match=type(failure).__name__):
        dckpt.load(out, url)
    assert _same(out, _empty())  # nothing loaded
    monkeypatch.undo()
    assert dckpt.load(out, url).step == 3


def test_quarantine_marks_a_damaged_checkpoint_and_restores_skip_it_at_once(tmp_path, capsys):
    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 3, "flipped_byte")
    report = dckpt.verify(url, all_steps=True, quarantine=True)
    assert {p.step for p in report.problems} == {3}
    assert [(i.step, bool(i.quarantined)) for i in dckpt.list_checkpoints(url)] == \
        [(1, False), (2, False), (3, True)]
    info = dckpt.load(_empty(), url)
    assert info.step == 2 and info.tried == (2,)  # step 3 not even read
    assert "quarantined" in info.skipped[0][1]
    assert cli(["ls", url]) == 0
    assert "QUARANTINED" in capsys.readouterr().out
    # repaired (here: saved again elsewhere is not possible; restore the byte) -> mark cleared
    damage(tmp_path, 3, "flipped_byte")  # flips the same byte back
    assert cli(["verify", url, "--step", "3", "--quarantine"]) == 0
    assert all(i.quarantined is None for i in dckpt.list_checkpoints(url))
    assert dckpt.load(_empty(), url).step == 3


def test_a_deleted_quarantined_step_saved_again_is_not_quarantined(tmp_path):
    """The mark named the step alone and outlived its delete: the sound checkpoint saved
    again under that step was skipped by every restore, for an older one."""
    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 3, "flipped_byte")
    assert not dckpt.verify(url, step=3, quarantine=True).ok
    dckpt.delete(url, step=3)
    dckpt.save({"w": torch.full((4,), 7.0)}, url, step=3)
    assert [i.quarantined for i in dckpt.list_checkpoints(url)] == [None, None, None]
    out = {"w": torch.zeros(4)}
    info = dckpt.load(out, url, partial=True)
    assert info.step == 3 and info.skipped == () and torch.equal(out["w"], torch.full((4,), 7.0))


@pytest.mark.parametrize("failure", ["connection reset", "storage refused", "newer format"])
def test_a_storage_failure_during_verify_is_reported_but_quarantines_nothing(
        tmp_path, monkeypatch, capsys, failure):
    """A read the storage failed (a connection reset past its retries, a refusal) or a
    manifest of a newer format says nothing about the data: the report lists it, but a
    quarantine of a sound step made every later restore skip it for an older one."""
    import errno

    from dckpt.storage import Store

    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 1, "flipped_byte")
    dckpt.verify(url, step=1, quarantine=True)  # step 1: really damaged, marked
    manifest = tmp_path / "manifests" / "000000000003.json"
    sound = manifest.read_bytes()

    def read_into(self, name, offset, out):
        if failure == "connection reset":
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        raise dckpt.StorageError(f"{name}: access denied")

    with monkeypatch.context() as m:
        if failure == "newer format":
            manifest.write_bytes(reseal({**json.loads(sound), "version": 99}))
        else:
            m.setattr(Store, "read_into", read_into)
            m.setattr(Store, "read_vectored", lambda self, n, o, outs: read_into(self, n, o, outs[0]))
        report = dckpt.verify(url, all_steps=True, quarantine=True)
        assert {p.step for p in report.problems} >= {3}, report
        # where the reads fail, step 1's damage cannot be seen either
        assert all(p.damage == (failure == "newer format" and p.step == 1)
                   for p in report.problems), report
        if failure != "newer format":
            capsys.readouterr()
            assert cli(["verify", url, "--step", "3"]) == 1
            assert "PROBLEM step 3 (the storage failed; the data may be sound)" in \
                capsys.readouterr().out
    manifest.write_bytes(sound)
    marks = {i.step: bool(i.quarantined) for i in dckpt.list_checkpoints(url)}
    assert marks == {1: True, 2: False, 3: False}  # step 1's mark kept, no new ones
    assert dckpt.load(_empty(), url).step == 3


def test_a_quarantine_mark_that_cannot_be_written_still_reports_the_damage(
        tmp_path, monkeypatch, caplog):
    """A read-only copy of a repository (a mount, a bucket without write rights): the mark
    fails; the verify's findings come back, and the log says which marks it could not set
    (it raised StorageError, the findings lost)."""
    import errno

    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 3, "flipped_byte")

    def read_only(store, step, reason):
        raise OSError(errno.EROFS, "Read-only file system", f"{url}/quarantine")

    monkeypatch.setattr("dckpt.catalog.set_quarantine", read_only)
    with caplog.at_level(logging.WARNING, logger="dckpt"):
        report = dckpt.verify(url, all_steps=True, quarantine=True)
    assert [p.step for p in report.problems] == [3] and report.steps == (1, 2, 3)
    assert "could not update the quarantine marks of 3 step(s)" in caplog.text
    assert "Read-only file system" in caplog.text and "quarantined steps" not in caplog.text
    assert cli(["verify", url, "--all", "--quarantine"]) == 1  # the damage, as without marks
    assert all(i.quarantined is None for i in dckpt.list_checkpoints(url))


def test_partial_restore_loads_only_the_asked_keys(tmp_path):
    url = str(tmp_path)
    dckpt.save(_state(1), url, step=1)
    weights = {"model": {"w": torch.zeros(300, 200), "b": torch.zeros(200)}}
    with pytest.raises(dckpt.StateDictError, match="partial=True"):
        dckpt.load(weights, url)
    info = dckpt.load(weights, url, partial=True)
    assert _same(weights["model"], _state(1)["model"])
    full = dckpt.inspect(url)
    model_bytes = sum(full.items[k].nbytes for k in full.items if k.startswith("model."))
    assert info.bytes_read == model_bytes  # the optimizer's bytes were never read
    no_loader = _empty()
    del no_loader["loader"]
    dckpt.load(no_loader, url, partial=True)
    assert _same(no_loader["optim"], _state(1)["optim"])
    with pytest.raises(dckpt.StateDictError, match="not in the checkpoint"):
        dckpt.load({"nope": torch.zeros(1)}, url, partial=True)


def test_a_read_budget_smaller_than_one_tensor_still_loads(tmp_path):
    url = str(tmp_path)
    state = {"big": torch.randn(1000, 1000)}
    dckpt.save(state, url, step=1)
    out = {"big": torch.zeros(1000, 1000, dtype=torch.float64)}  # a copy: no reading in place
    with pytest.raises(dckpt.StateDictError):
        dckpt.load(out, url)
    out = {"big": torch.zeros(1000, 1000).t()}  # not contiguous: read through a buffer
    info = dckpt.load(out, url, config=LoadConfig(read_buffer_bytes=4096,
                                                  read_request_bytes=4096))
    assert torch.equal(out["big"], state["big"]) and info.phase_s["copy"] > 0


def test_cli_verify_json_lists_quarantine_state(tmp_path, capsys):
    url = str(tmp_path)
    _three(url)
    damage(tmp_path, 2, "truncated_segment")
    assert cli(["verify", url, "--all", "--quarantine", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert {p["step"] for p in out["problems"]} == {2}
    assert dckpt.load(_empty(), url, step=None).step == 3


def test_spans_merge_close_reads_of_one_object_and_nothing_else():
    from dckpt.manifest import BlockRef
    from dckpt.reads import Request, spans

    def req(seg: str, offset: int, length: int) -> Request:
        ref = BlockRef(seg, offset, length, length, "0" * 32)
        return Request(seg, offset, length, offset, ((ref, offset),))

    reqs = [req("a", 0, 10), req("b", 0, 10), req("a", 15, 10), req("a", 100, 10),
            req("a", 26, 4)]
    got = {(s.segment, s.offset, s.length, len(s.parts)) for s in spans(reqs, 1000, 20)}
    assert got == {("a", 0, 30, 3), ("a", 100, 10, 1), ("b", 0, 10, 1)}
    capped = spans(reqs, 20, 20)  # a span never exceeds the request size
    assert all(s.length <= 20 or len(s.parts) == 1 for s in capped)


def _span_fixture(tmp_path):
    """An object of 64 blocks of 100 bytes; a span of 4 requests with gaps and a jump in
    the destination (blocks 0-1, 2, 5, 9-10 of the object into dest at 0, 250, 400, 600)."""
    from dckpt.blocks import digest
    from dckpt.manifest import BlockRef
    from dckpt.reads import Request, Span

    payload = bytes(range(256)) * 25
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.seg").write_bytes(payload)

    def req(blocks: list[int], dest: int) -> Request:
        refs = tuple((BlockRef("data/x.seg", b * 100, 100, 100,
                               digest(payload[b * 100: b * 100 + 100])), dest + i * 100)
                     for i, b in enumerate(blocks))
        return Request("data/x.seg", blocks[0] * 100, 100 * len(blocks), dest, refs)

    parts = (req([0, 1], 0), req([2], 250), req([5], 400), req([9, 10], 600))
    return payload, Span("data/x.seg", 0, 1100, parts)


@pytest.mark.parametrize("vectored", [True, False])
def test_a_span_lands_each_request_in_place_and_reads_no_gap_locally(tmp_path, monkeypatch,
                                                                      vectored):
    from dckpt.reads import Fetcher
    from dckpt.storage import Store

    payload, span = _span_fixture(tmp_path)
    store = Store(str(tmp_path))
    monkeypatch.setattr(Store, "vectored", property(lambda s: vectored))
    dest = bytearray(800)
    with Fetcher(store, 2) as fetcher:
        n = fetcher.fetch_span(span, [(memoryview(dest), "test")] * len(span.parts))
    want = bytearray(800)
    for dst, src in ((0, 0), (250, 200), (400, 500), (600, 900)):
        size = 200 if src in (0, 900) else 100
        want[dst: dst + size] = payload[src: src + size]
    assert dest == want
    # locally only the 600 bytes asked for are read; elsewhere the span, gaps included
    assert n == (600 if vectored else 1100)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_vectored_span_still_verifies_every_block(tmp_path, damage):
    from dckpt.reads import Fetcher
    from dckpt.storage import Store

    payload, span = _span_fixture(tmp_path)
    seg = tmp_path / "data" / "x.seg"
    if damage == "flip":
        seg.write_bytes(payload[:950] + bytes([payload[950] ^ 1]) + payload[951:])
    elif damage == "truncate":
        seg.write_bytes(payload[:1050])
    else:
        seg.unlink()
    match = {"flip": "@900 .* damaged", "truncate": "truncated", "delete": "missing"}[damage]
    with Fetcher(Store(str(tmp_path)), 2) as fetcher:
        with pytest.raises(dckpt.IntegrityError, match=match):
            fetcher.fetch_span(span, [(memoryview(bytearray(800)), "test")] * len(span.parts))


def test_read_vectored_batches_past_iov_max_and_stops_at_the_end(tmp_path, monkeypatch):
    from dckpt import storage

    (tmp_path / "o").write_bytes(bytes(range(250)) * 4)
    store = storage.Store(str(tmp_path))
    monkeypatch.setattr(storage, "IOV_MAX", 3)
    outs = [bytearray(7) for _ in range(10)]
    assert store.read_vectored("o", 5, [memoryview(b) for b in outs]) == 70
    assert b"".join(outs) == (bytes(range(250)) * 4)[5:75]
    tail = [bytearray(8) for _ in range(4)]  # 20 bytes left after offset 980
    assert store.read_vectored("o", 980, [memoryview(b) for b in tail]) == 20
    assert b"".join(tail)[:20] == (bytes(range(250)) * 4)[980:]
    store.close_files()


@pytest.mark.parametrize("bad, says", [
    (torch.zeros(1, 200).expand(300, 200), "share memory"),
    (torch.zeros(300, 200).to_sparse(), "layout torch.sparse_coo"),
    (torch.nested.nested_tensor([torch.zeros(200)] * 300), "a nested tensor"),
])
def test_a_destination_that_cannot_hold_the_values_is_refused_before_any_read(tmp_path, bad,
                                                                              says):
    url = str(tmp_path)
    dckpt.save({"w": torch.randn(300, 200), "b": torch.randn(200)}, url, step=1)
    b = torch.zeros(200)
    with pytest.raises(dckpt.StateDictError, match=says) as e:
        dckpt.load({"w": bad, "b": b}, url)
    assert "w:" in str(e.value) and not b.any()  # refused whole: nothing loaded


def test_meta_tensors_are_materialized_in_one_process_as_with_a_process_group(tmp_path):
    url = str(tmp_path)
    state = {"w": torch.randn(30, 20), "nested": {"b": torch.randn(20)}, "list": [torch.ones(3)]}
    dckpt.save(state, url, step=1)
    out = {"w": torch.empty(30, 20, device="meta"),
           "nested": {"b": torch.empty(20, device="meta")}, "list": [torch.empty(3, device="meta")]}
    dckpt.load(out, url)
    assert out["w"].device.type == "cpu" and torch.equal(out["w"], state["w"])
    assert torch.equal(out["nested"]["b"], state["nested"]["b"])
    assert torch.equal(out["list"][0], state["list"][0])


def test_a_module_on_the_meta_device_is_refused_not_left_unloaded(tmp_path):
    """A module's meta tensors would take nothing from its load_state_dict (torch copies
    into them as a no-op, with a warning): the load reported success and left the module on
    the meta device. Refused now, naming the module and its tensors; nothing else loaded."""
    url = str(tmp_path)
    saved = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    dckpt.save({"model": saved, "step": torch.tensor(7)}, url, step=1)
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    other = torch.zeros((), dtype=torch.int64)
    with pytest.raises(dckpt.StateDictError, match=r"model: 4 tensors of this Sequential are "
                       r"on the meta device \(model\.0\.weight, model\.0\.bias, model\.1\.weight "
                       r"and 1 more\).*module\.to_empty") as e:
        dckpt.load({"model": model, "step": other}, url)
    assert model[0].weight.is_meta and not other.any()
    model.to_empty(device="cpu")
    dckpt.load({"model": model, "step": other}, url)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 saved.state_dict().values()))
    assert other.item() == 7


def _many_small(n: int) -> dict:
    state: dict = {f"layer{i}.w": torch.full((3 + i % 5,), float(i)) for i in range(n)}
    state["tied.a"] = torch.zeros(1000)  # the same bytes twice: stored once, read into both
    state["tied.b"] = torch.zeros(1000)
    state["lr"] = 0.5  # a top-level value, replaced by the load
    return state


@pytest.mark.parametrize("where", ["local", "s3"])
def test_many_small_tensors_are_read_in_a_few_reads_each_into_its_own_place(tmp_path, request,
                                                                             monkeypatch, where):
    """The requests of tensors stored side by side share reads (one request per tensor made a
    load of 20,000 small tensors spend 1.8 s in the read phase, now 0.5 s)."""
    from dckpt.storage import Store

    url, opts = (str(tmp_path), None) if where == "local" else request.getfixturevalue("s3_repo")
    state = _many_small(400)
    dckpt.save(state, url, step=1, storage_options=opts)
    reads = []
    for name in ("read_into", "read_vectored"):
        original = getattr(Store, name)
        monkeypatch.setattr(Store, name, lambda self, *a, _o=original, _n=name:
                            reads.append(_n) or _o(self, *a))
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0.0
           for k, v in state.items()}
    dckpt.load(out, url, storage_options=opts)
    assert out.keys() == state.keys() and _same(out, state)
    assert 0 < len(reads) <= 12, len(reads)  # 4 segments, a value, the manifest's reads


def test_a_damaged_small_tensor_is_named_among_the_many_read_with_it(tmp_path):
    from dckpt_testing import flip_stored_byte

    url = str(tmp_path)
    state = _many_small(200)
    dckpt.save(state, url, step=1)
    flip_stored_byte(url, 1, "layer123.w", at=4)
    out = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0.0
           for k, v in state.items()}
    with pytest.raises(dckpt.IntegrityError, match="'layer123.w'"):
        dckpt.load(out, url, step=1)


def test_a_truncated_segment_names_the_first_tensor_it_cuts_among_many_read_together(tmp_path):
    url = str(tmp_path)
    state = {f"t{i}": torch.full((1024,), float(i)) for i in range(8)}  # 4 KiB each
    dckpt.save(state, url, step=1, config=dckpt.SaveConfig(writer_threads=1))
    entry = dckpt.inspect(url, step=1).items["t5"]
    block = entry.chunks[0].data.blocks[0]
    with open(tmp_path / block.segment, "r+b") as f:  # cut inside t5: t0-t4 whole
        f.truncate(block.offset + 100)
    out = {k: torch.zeros(1024) for k in state}
    with pytest.raises(dckpt.IntegrityError, match="'t5'.*truncated"):
        dckpt.load(out, url, step=1)


def test_buffered_reads_run_one_window_ahead_within_the_budget(tmp_path, monkeypatch):
    """Boxes read through buffers go in windows of at most half the read budget, the next
    window's reads submitted before the last one's copies: two windows held at once."""
    from dckpt.reader import Reader

    url = str(tmp_path)
    g = torch.Generator().manual_seed(5)
    want = {f"t{i}": torch.randn(64, 32, generator=g) for i in range(12)}  # 8 KiB each
    dckpt.save(want, url, step=1)
    events: list[tuple[str, int, int]] = []
    submit, finish = Reader._submit, Reader._finish

    held: set[int] = set()  # windows whose buffers are made and not yet delivered

    def recorded_submit(self, fetcher, window):
        assert all(j.buffer.numel() == 0 for j in window)  # no buffer made before its window
        submitted = submit(self, fetcher, window)
        held.add(id(submitted))
        assert len(held) <= 2
        events.append(("submit", id(submitted), sum(j.buffer.numel() for j in window)))
        return submitted

    def recorded_finish(self, fetcher, reading, planner):
        events.append(("finish", id(reading), 0))
        finish(self, fetcher, reading, planner)
        held.discard(id(reading))

    monkeypatch.setattr(Reader, "_submit", recorded_submit)
    monkeypatch.setattr(Reader, "_finish", recorded_finish)
    got = {k: torch.zeros(32, 64).t() for k in want}  # transposed: read through a buffer
    budget = 40 << 10  # two windows of 2 tensors each
    info = dckpt.load(got, url, config=LoadConfig(read_buffer_bytes=budget))
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    assert info.phase_s["copy"] > 0
    kinds = [e[0] for e in events]
    assert kinds == ["submit"] + ["submit", "finish"] * 5 + ["finish"], kinds
    submitted = [e for e in events if e[0] == "submit"]
    assert all(nbytes <= budget // 2 for _, _, nbytes in submitted)
    assert sum(nbytes for _, _, nbytes in submitted) == 12 * 64 * 32 * 4
    assert [e[1] for e in events if e[0] == "finish"] == [e[1] for e in submitted]  # in order


def test_reads_in_place_go_file_by_file_and_buffered_ones_in_delivery_order(tmp_path,
                                                                             monkeypatch):
    """A window read straight into its destinations submits its reads file by file, each
    front to back; one copied out of buffers, in the order its tensors are delivered. Both
    load the saved values."""
    from dckpt import writer
    from dckpt.reads import Fetcher

    url = str(tmp_path)
    g = torch.Generator().manual_seed(8)
    want = {f"t{i:02d}": torch.randn(128, 128, generator=g) for i in range(12)}  # 64 KiB each
    with monkeypatch.context() as m:  # four segments, as a state of 256 MiB or more makes
        m.setattr(writer, "segments_for", lambda nbytes, threads: threads)
        dckpt.save(want, url, step=1, config=dckpt.SaveConfig(writer_threads=4))
    info = dckpt.inspect(url, step=1)
    where = {k: (e.chunks[0].data.blocks[0].segment, e.chunks[0].data.blocks[0].offset)
             for k, e in info.items.items()}
    assert len({seg for seg, _ in where.values()}) == 4
    assert [where[k] for k in want] != sorted(where.values())  # key order hops files
    key_at = {at: k for k, at in where.items()}
    submitted: list[tuple[str, int]] = []
    submit_span = Fetcher.submit_span

    def recorded(self, span, targets):
        submitted.append((span.segment, span.offset))
        return submit_span(self, span, targets)

    monkeypatch.setattr(Fetcher, "submit_span", recorded)
    config = LoadConfig(read_request_bytes=64 << 10)  # a read per tensor, none joined
    got = {k: torch.zeros(128, 128) for k in want}
    dckpt.load(got, url, step=1, config=config)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert len(submitted) == 12
    files = [seg for seg, _ in submitted]
    assert [seg for seg, _ in itertools.groupby(files)] == list(dict.fromkeys(files))  # once
    for seg in set(files):
        offsets = [off for s, off in submitted if s == seg]
        assert offsets == sorted(offsets)

    submitted.clear()
    got = {k: torch.zeros(128, 128).t() for k in want}  # transposed: read through a buffer
    dckpt.load(got, url, step=1, config=config)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert [key_at[at] for at in submitted] == list(want)


def test_damage_in_a_window_read_ahead_fails_the_load_cleanly(tmp_path):
    """A bad block in the window read ahead, while the one before is copied: the load
    raises the checksum error (no fallback, one checkpoint) and leaves no reader behind."""
    import threading

    url = str(tmp_path)
    g = torch.Generator().manual_seed(6)
    want = {f"t{i}": torch.randn(64, 32, generator=g) for i in range(8)}
    dckpt.save(want, url, step=1)
    from dckpt_testing import flip_stored_byte
    flip_stored_byte(url, 1, "t5")
    got = {k: torch.zeros(32, 64).t() for k in want}
    with pytest.raises(dckpt.IntegrityError, match="t5"):
        dckpt.load(got, url, config=LoadConfig(read_buffer_bytes=20 << 10))
    assert not [t for t in threading.enumerate() if t.name.startswith("dckpt-read")]


@pytest.mark.parametrize("fault", ["eio", "stall"])
def test_a_storage_failing_under_the_window_read_ahead_fails_the_load_in_bounded_time(
        tmp_path, monkeypatch, fault):
    """The reads of a window submitted ahead fail (an I/O error) or stop answering while
    the window before is copied out: the load raises a StorageError naming it, within the
    stall bound, and (for the error) leaves no reader thread behind."""
    import errno
    import threading
    import time

    from dckpt.reads import Fetcher

    url = str(tmp_path)
    g = torch.Generator().manual_seed(7)
    want = {f"t{i}": torch.randn(64, 32, generator=g) for i in range(8)}
    dckpt.save(want, url, step=1)
    read = Fetcher._read
    late = "'t6'"  # windows of one tensor (8 KiB, half the budget 10 KiB): t6's reads are
    # submitted before t5's copies are made

    def failing(self, segment, offset, outs, what, whats=()):
        if late in what or any(late in w for w in whats):
            if fault == "eio":
                raise OSError(errno.EIO, "Input/output error")
            time.sleep(3.0)
        return read(self, segment, offset, outs, what, whats)

    monkeypatch.setattr(Fetcher, "_read", failing)
    got = {k: torch.zeros(32, 64).t() for k in want}
    t0 = time.monotonic()
    with pytest.raises(dckpt.StorageError):
        dckpt.load(got, url, config=LoadConfig(read_buffer_bytes=20 << 10,
                                               io_stall_timeout_s=0.5))
    assert time.monotonic() - t0 < 2.5
    for k in ("t0", "t1", "t2", "t3", "t4", "t5"):  # the windows before it were delivered
        assert torch.equal(got[k], want[k]), k
    if fault == "eio":
        assert not [t for t in threading.enumerate() if t.name.startswith("dckpt-read")]
    else:
        time.sleep(3.0)  # the stalled reader finishes: nothing left for the next test
