"""Damage and bad input: every problem becomes a clear error, and nothing is lost."""

from __future__ import annotations

import gc
import json
import os
import pickle
import signal

import fsspec
import pytest
import torch

import dckpt
from dckpt import layout, prefetch
from dckpt.storage import Store
from dckpt_testing import arm, as_rows, disarm, faulty_s3_class, flip_stored_byte, reseal


def _segment_paths(root: str, step: int) -> list[str]:
    m = json.loads(open(os.path.join(root, layout.manifest_name(step))).read())
    return [os.path.join(root, s) for s in m["segments"]]


def _flip_byte(path: str, offset: int = 100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_flipped_byte_is_reported_refused_and_skipped(tmp_path):
    url = str(tmp_path)
    dckpt.save({"w": torch.full((1000,), 1.0)}, url, step=1)
    dckpt.save({"w": torch.full((1000,), 2.0)}, url, step=2)
    seg = _segment_paths(url, 2)[0]
    _flip_byte(seg)

    report = dckpt.verify(url, step=2)
    assert not report.ok
    assert len(report.problems) == 1
    problem = report.problems[0]
    assert problem.step == 2 and problem.item == "w"
    assert problem.object == os.path.relpath(seg, url)
    assert dckpt.verify(url, step=1).ok
    assert not dckpt.verify(url, all_steps=True).ok

    out = {"w": torch.zeros(1000)}
    with pytest.raises(dckpt.IntegrityError) as e:
        dckpt.load(out, url, step=2)
    assert "'w'" in str(e.value) and os.path.relpath(seg, url) in str(e.value)
    assert "step 2" in str(e.value)

    info = dckpt.load(out, url)
    assert info.step == 1
    assert [s for s, _ in info.skipped] == [2]
    assert "xxh3-128" in info.skipped[0][1]
    assert torch.equal(out["w"], torch.full((1000,), 1.0))


def test_verify_reads_across_items_and_still_names_each_damaged_item(tmp_path):
    """verify reads a step's blocks in reads that run across items (each block once,
    however many items hold it), and a read that fails is read again per item: the report
    names each item hit, a block two items share names both, and the bytes checked are
    every other item's."""
    url = str(tmp_path)
    state = {f"t{i}": torch.full((16,), float(i)) for i in range(40)}
    state["twin_a"] = torch.full((64,), 7.0)  # the same bytes: one block, held by both
    state["twin_b"] = torch.full((64,), 7.0)
    dckpt.save(state, url, step=1)
    seen = []
    report = dckpt.verify(url, step=1, progress=lambda done, total: seen.append((done, total)))
    logical = sum(t.numel() * 4 for t in state.values())
    assert report.ok and report.bytes_checked == logical
    assert seen and seen[-1] == (logical, logical)
    flip_stored_byte(url, 1, "t7", at=5)
    flip_stored_byte(url, 1, "twin_a", at=3)
    report = dckpt.verify(url, step=1)
    assert sorted(p.item for p in report.problems) == ["t7", "twin_a", "twin_b"]
    assert all("xxh3-128" in p.message and p.object and p.object.startswith("data/")
               for p in report.problems)
    assert report.bytes_checked == logical - 64 - 2 * 256


def test_a_damaged_block_an_item_holds_many_times_is_one_problem(tmp_path):
    """A tensor of zeros holds one stored block many times: one problem, not one per use."""
    url = str(tmp_path)
    dckpt.save({"z": torch.zeros(1 << 18), "r": torch.randn(1000)}, url, step=1,
               config=dckpt.SaveConfig(block_size_bytes=64 << 10))
    assert len(dckpt.inspect(url, step=1).items["z"].chunks[0].data.blocks) == 16
    flip_stored_byte(url, 1, "z", at=10)
    report = dckpt.verify(url, step=1)
    assert [p.item for p in report.problems] == ["z"] and report.bytes_checked == 4000


@pytest.mark.parametrize("damage", ["truncate", "garbage", "version", "dotdot", "absolute",
                                    "unknown_field", "unsealed"])
def test_bad_manifest_is_a_clear_error_and_skipped(tmp_path, damage):
    url = str(tmp_path)
    dckpt.save({"w": torch.ones(10)}, url, step=1)
    dckpt.save({"w": torch.full((10,), 2.0)}, url, step=2)
    path = os.path.join(url, layout.manifest_name(2))
    raw = open(path, "rb").read()
    doc = json.loads(raw)
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = b"\x00\xff" * 10
    else:
        if damage == "version":
            doc["version"] = 0  # a newer one is news, not damage: test_manifest
        elif damage == "dotdot":
            doc["segments"][0] = "data/../../etc/passwd"
        elif damage == "absolute":
            doc["segments"][0] = "/etc/passwd"
        elif damage == "unknown_field":
            doc["surprise"] = 1
        if damage == "unsealed":  # a changed digit, the checksum left as it was
            raw = raw.replace(b'"world_size":1', b'"world_size":2')
        else:
            raw = reseal(doc)
    open(path, "wb").write(raw)
    expected = {"truncate": "not valid JSON", "garbage": "not valid JSON",
                "version": "version 0 is not supported", "dotdot": "relative name",
                "absolute": "relative name", "unknown_field": "unknown fields",
                "unsealed": "its checksum says"}[damage]
    out = {"w": torch.zeros(10)}
    with pytest.raises(dckpt.IntegrityError, match=expected):
        dckpt.load(out, url, step=2)
    info = dckpt.load(out, url)
    assert info.step == 1 and info.skipped[0][0] == 2 and expected in info.skipped[0][1]
    listed = dckpt.list_checkpoints(url)
    assert [i.step for i in listed] == [1, 2]
    assert listed[0].problem is None and expected in listed[1].problem
    report = dckpt.verify(url, step=2)
    assert not report.ok and expected in report.problems[0].message


def _objects(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), root)
                  for d, _, names in os.walk(os.path.join(root, layout.DATA_DIR)) for n in names)


def _stand_in(path: str, what: str) -> None:
    """Put ``what`` where the file at ``path`` was."""
    os.unlink(path)
    if what == "folder":
        os.mkdir(path)
    elif what == "symlink loop":  # ELOOP
        os.symlink(path, path)
    elif what == "fifo":  # an open for reading blocked until a writer came: forever
        os.mkfifo(path)
    else:  # a device: a read of /dev/zero never ends
        os.symlink(what, path)


@pytest.mark.parametrize("what", ["folder", "symlink loop", "fifo", "/dev/zero", "/dev/null"])
@pytest.mark.parametrize("swap", ["manifest", "segment"])
def test_what_is_not_a_file_where_a_file_belongs_is_damage_and_skipped(tmp_path, swap, what):
    """A manifest: FormatError everywhere (a symlink loop made list_checkpoints, verify and
    gc raise a StorageError, and a FIFO or /dev/zero hung every one of them); a segment:
    IntegrityError (a FIFO hung the load). ``load(step=None)`` falls back either way."""
    url = str(tmp_path)
    dckpt.save({"w": torch.ones(10)}, url, step=1)
    dckpt.save({"w": torch.full((10,), 2.0)}, url, step=2)
    manifest = os.path.join(url, layout.manifest_name(2))
    path = (manifest if swap == "manifest"
            else os.path.join(url, json.loads(open(manifest, "rb").read())["segments"][0]))
    _stand_in(path, what)
    signal.alarm(60)  # a hang fails the test instead of the suite
    try:
        out = {"w": torch.zeros(10)}
        info = dckpt.load(out, url)
        assert info.step == 1 and info.skipped[0][0] == 2
        assert torch.equal(out["w"], torch.ones(10))
        problems = [(i.step, i.problem) for i in dckpt.list_checkpoints(url)]
        assert problems[0] == (1, None) and problems[1][0] == 2
        assert (problems[1][1] is None) == (swap == "segment")  # a listing reads no segment
        assert not dckpt.verify(url, step=2).ok and dckpt.verify(url, step=1).ok
        assert [p.step for p in dckpt.verify(url, all_steps=True).problems] == [2]
        assert dckpt.status(url).newest.step == (1 if swap == "manifest" else 2)
        if swap == "manifest":  # what step 2 references cannot be told from garbage
            with pytest.raises(dckpt.FormatError, match="gc stopped"):
                dckpt.gc(url, min_age_s=0)
            assert prefetch.plan(url).step == 1
        else:
            assert prefetch.prefetch(url).step == 2  # its note names the segment
    finally:
        signal.alarm(0)


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "another step's"])
def test_gc_stops_at_a_damaged_manifest_and_removes_nothing(tmp_path, damage):
    """gc reads only the block references of each manifest, behind its checksum: damage
    there stops it, as a whole decode did."""
    url = str(tmp_path)
    for step in (1, 2, 3):
        dckpt.save({"w": torch.full((10,), float(step))}, url, step=step)
    dckpt.delete(url, step=1)
    manifest = os.path.join(url, layout.manifest_name(3))
    raw = open(manifest, "rb").read()
    damaged = {"flip": raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], "truncate": raw[:-7],
               "empty": b"",
               "another step's": open(os.path.join(url, layout.manifest_name(2)), "rb").read()}
    open(manifest, "wb").write(damaged[damage])
    before = sorted(os.path.join(d, n) for d, _, names in os.walk(url) for n in names)
    with pytest.raises(dckpt.FormatError, match="gc stopped: the manifest of step 3"):
        dckpt.gc(url, min_age_s=0)
    assert sorted(os.path.join(d, n) for d, _, names in os.walk(url) for n in names) == before
    open(manifest, "wb").write(raw)
    assert dckpt.gc(url, min_age_s=0).live_checkpoints == (2, 3)


@pytest.mark.parametrize("damage", ["the folder is a file", "a mark is a folder",
                                    "a mark is garbage"])
def test_damaged_quarantine_marks_never_stop_a_restore(tmp_path, damage):
    """The marks are advisory (a restore verifies every byte anyway): a file where their
    folder belongs is ignored, a mark that cannot be read still marks its step. A file there
    stopped every load and listing with a StorageError."""
    url = str(tmp_path)
    dckpt.save({"w": torch.ones(10)}, url, step=1)
    dckpt.save({"w": torch.full((10,), 2.0)}, url, step=2)
    marks = tmp_path / layout.QUARANTINE_DIR
    mark = tmp_path / layout.quarantine_name(2)
    if damage == "the folder is a file":
        marks.write_bytes(b"x")
    else:
        marks.mkdir()
        mark.mkdir() if damage == "a mark is a folder" else mark.write_bytes(b"\xff{")
    out = {"w": torch.zeros(10)}
    info = dckpt.load(out, url)
    ignored = damage == "the folder is a file"
    assert info.step == (2 if ignored else 1)
    assert torch.equal(out["w"], torch.full((10,), float(info.step)))
    assert [(i.step, i.problem, i.quarantined) for i in dckpt.list_checkpoints(url)] == [
        (1, None, None),
        (2, None, None if ignored else "quarantined (the marker is unreadable)")]
    assert dckpt.verify(url, all_steps=True).ok


@pytest.mark.parametrize("folder", [layout.MANIFEST_DIR, layout.DATA_DIR])
def test_a_file_where_a_repository_folder_belongs_is_an_error_and_gc_takes_nothing(
        tmp_path, folder):
    """Not an empty repository: gc would take every object no manifest it can list
    references."""
    url = str(tmp_path)
    dckpt.save({"w": torch.ones(10)}, url, step=1)
    objects = _objects(url)
    moved = str(tmp_path / "moved")
    os.rename(os.path.join(url, folder), moved)
    open(os.path.join(url, folder), "wb").write(b"x")
    with pytest.raises(dckpt.StorageError, match="a file where a folder belongs"):
        dckpt.gc(url, min_age_s=0)
    with pytest.raises(dckpt.CommitError, match="Not a directory|a file where a folder"):
        dckpt.save({"w": torch.full((10,), 2.0)}, url, step=2)
    with pytest.raises(dckpt.DckptError):
        dckpt.load({"w": torch.zeros(10)}, url)
    if folder == layout.MANIFEST_DIR:
        with pytest.raises(dckpt.StorageError, match="a file where a folder belongs"):
            dckpt.list_checkpoints(url)
    os.unlink(os.path.join(url, folder))
    os.rename(moved, os.path.join(url, folder))
    assert _objects(url) == objects  # nothing was taken: put back, it loads
    out = {"w": torch.zeros(10)}
    assert dckpt.load(out, url).step == 1 and torch.equal(out["w"], torch.ones(10))


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ["DCKPT_PWNED"],))


def test_pickle_payload_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    url = str(tmp_path / "repo")
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DCKPT_PWNED", str(marker))
    dckpt.save({"w": torch.ones(4), "cfg": {"lr": 0.1}}, url, step=1)
    # Forge a checkpoint whose value object is a hostile pickle, with a valid digest.
    m = as_rows(json.loads(open(os.path.join(url, layout.manifest_name(1))).read()))
    raw = pickle.dumps(_Boom())
    seg = "data/forged/r00000-000.seg"
    os.makedirs(os.path.join(url, "data/forged"))
    open(os.path.join(url, seg), "wb").write(raw)
    m["segments"].append(seg)
    from dckpt.blocks import digest
    old = m["items"]["cfg.lr"]["nbytes"]
    m["items"]["cfg.lr"] = {"kind": "value", "encoding": "torch", "nbytes": len(raw),
                            "blocks": [[len(m["segments"]) - 1, 0, len(raw), len(raw),
                                        digest(raw), "raw"]]}
    m["bytes_logical"] += len(raw) - old
    open(os.path.join(url, layout.manifest_name(1)), "wb").write(reseal(m))
    out = {"w": torch.zeros(4), "cfg": {"lr": 0.0}}
    with pytest.raises(dckpt.UnsafeValueError, match="refused to load"):
        dckpt.load(out, url, step=1)
    assert not marker.exists()
    # DCP's own planner unpickles with weights_only=False: the reader refuses first
    import torch.distributed.checkpoint as dcp

    with pytest.raises(dcp.api.CheckpointException) as caught:
        dcp.load(out, storage_reader=dckpt.Reader(url, step=1))
    failure = caught.value.failures[0]
    assert isinstance(failure[0] if isinstance(failure, tuple) else failure,
                      dckpt.UnsafeValueError), failure
    assert not marker.exists()


def test_mismatched_state_dict_lists_every_problem(tmp_path):
    url = str(tmp_path)
    dckpt.save({"a": torch.ones(2, 3), "b": torch.ones(4), "c": torch.ones(1), "n": 3},
               url, step=1)
    out = {"a": torch.zeros(3, 2), "b": torch.zeros(4, dtype=torch.float64), "d": torch.zeros(1),
           "n": 0}
    with pytest.raises(dckpt.StateDictError) as e:
        dckpt.load(out, url)
    text = str(e.value)
    assert "4 problems" in text
    assert "a: shape [3, 2] in the state dict, [2, 3] in the checkpoint" in text
    assert "b: dtype torch.float64 in the state dict, torch.float32 in the checkpoint" in text
    assert "d: in the state dict but not in the checkpoint" in text
    assert "c: in the checkpoint but no rank's state dict asks for it" in text
    assert "or partial=True" in text
    assert torch.equal(out["a"], torch.zeros(3, 2))  # nothing was read


def test_full_disk_mid_save_is_a_commit_error_and_nothing_is_lost(tmp_path):
    url = f"faultyfile://{tmp_path}"
    dckpt.save({"w": torch.ones(100_000)}, url, step=1)
    arm("enospc", after_bytes=100_000)
    try:
        with pytest.raises(dckpt.CommitError, match="No space left on device"):
            dckpt.save({"w": torch.full((100_000,), 2.0)}, url, step=2)
    finally:
        disarm()
    assert [i.step for i in dckpt.list_checkpoints(url)] == [1]
    out = {"w": torch.zeros(100_000)}
    assert dckpt.load(out, url).step == 1
    assert torch.equal(out["w"], torch.ones(100_000))
    info = dckpt.save({"w": torch.full((100_000,), 3.0)}, url, step=2)  # the next save works
    assert info.step == 2 and dckpt.verify(url, all_steps=True).ok


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_s3_error_mid_save_is_a_commit_error(s3_repo):
    """(And the discarded upload's file is closed: its __del__ printed an AttributeError.)"""
    url, opts = s3_repo
    fsspec.register_implementation("faultys3", faulty_s3_class(), clobber=True)
    faulty_url = url.replace("s3://", "faultys3://")
    opts = {**opts, "default_block_size": 5 << 20}
    first = torch.randn(3 << 20, generator=torch.Generator().manual_seed(1))
    dckpt.save({"w": first}, faulty_url, step=1, storage_options=opts)
    arm("eio", after_bytes=6 << 20)  # after the first multipart part went up
    try:
        with pytest.raises(dckpt.CommitError, match="SlowDown"):  # random: incompressible
            dckpt.save({"w": torch.randn(3 << 20, generator=torch.Generator().manual_seed(2))},
                       faulty_url, step=2, storage_options=opts)
    finally:
        disarm()
    assert [i.step for i in dckpt.list_checkpoints(url, storage_options=opts)] == [1]
    # the upload was aborted, nothing of step 2 is left
    report = dckpt.gc(url, dry_run=True, min_age_s=0, storage_options=opts)
    assert report.deleted == () and report.aborted_uploads == ()
    assert Store(url, opts).incomplete_uploads("data") == []
    out = {"w": torch.zeros(3 << 20)}
    assert dckpt.load(out, url, storage_options=opts).step == 1
    assert torch.equal(out["w"], first)
    assert dckpt.save({"w": torch.zeros(4)}, url, step=2, storage_options=opts).step == 2
    gc.collect()  # the failed save's file objects go now, within the test


_KILLED_MID_UPLOAD = """
import sys
sys.path.insert(0, {tests!r})
import fsspec, torch, dckpt
from dckpt_testing import arm, faulty_s3_class
fsspec.register_implementation("faultys3", faulty_s3_class(), clobber=True)
opts = {opts!r}
arm("kill", after_bytes=12 << 20)  # SIGKILL, two 5 MiB parts up
dckpt.save({{"w": torch.randn(8 << 20)}}, {url!r}, step=2, storage_options=opts)
"""


def test_gc_aborts_the_multipart_upload_of_a_writer_killed_mid_upload(s3_repo):
    """A rank SIGKILLed mid-save (a preemption) leaves its segment's multipart upload
    open: no listing shows it, and S3 stores (and bills) its parts until it is aborted.
    gc aborted none: 10 MB per killed rank here, gigabytes at full size."""
    import subprocess
    import sys

    url, opts = s3_repo
    opts = {**opts, "default_block_size": 5 << 20}
    first = {"w": torch.arange(4.0)}
    dckpt.save(first, url, step=1, storage_options=opts)
    code = _KILLED_MID_UPLOAD.format(tests=os.path.dirname(os.path.dirname(__file__)),
                                     opts=opts, url=url.replace("s3://", "faultys3://"))
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == -9
    store = Store(url, opts)
    [(name, upload_id)] = store.incomplete_uploads("data")
    size = store.upload_bytes(name, upload_id)
    assert name.startswith("data/s2-") and size >= 5 << 20  # the parts sent before the kill
    young = dckpt.gc(url, storage_options=opts)  # a save may still be uploading it
    assert young.aborted_uploads == () and len(store.incomplete_uploads("data")) == 1
    planned = dckpt.gc(url, dry_run=True, min_age_s=0, storage_options=opts)
    assert planned.aborted_uploads == (name,) and len(store.incomplete_uploads("data")) == 1
    done = dckpt.gc(url, min_age_s=0, storage_options=opts)
    assert done.aborted_uploads == (name,) and done.bytes_freed == size
    assert store.incomplete_uploads("data") == []
    out = {"w": torch.zeros(4)}
    assert dckpt.load(out, url, storage_options=opts).step == 1 and torch.equal(out["w"],
                                                                             first["w"])
    assert dckpt.save(first, url, step=2, storage_options=opts).step == 2


def test_s3_server_error_is_a_commit_error(moto_server):
    opts = moto_server.options()
    with pytest.raises(dckpt.CommitError, match="rank 0"):
        dckpt.save({"w": torch.ones(4)}, "s3://no-such-bucket/repo", step=1,
                   storage_options=opts)


def test_no_repository_errors(tmp_path):
    with pytest.raises(dckpt.CheckpointNotFoundError, match="holds no dckpt repository"):
        dckpt.verify(str(tmp_path))
    with pytest.raises(dckpt.CheckpointNotFoundError):
        dckpt.load({"w": torch.zeros(1)}, str(tmp_path))
    dckpt.save({"w": torch.ones(1)}, str(tmp_path), step=1)
    with pytest.raises(dckpt.CheckpointNotFoundError, match="committed steps: \\[1\\]"):
        dckpt.load({"w": torch.zeros(1)}, str(tmp_path), step=7)


def test_unsupported_state_is_refused_before_any_byte(tmp_path):
    sparse = torch.eye(3).to_sparse()
    with pytest.raises(dckpt.CommitError):
        dckpt.save({"s": sparse}, str(tmp_path), step=1)
    assert not os.path.exists(os.path.join(tmp_path, "data"))
