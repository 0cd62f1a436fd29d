"""Operations: dckpt health (exit codes a monitor alerts on) and dckpt diff."""

from __future__ import annotations

import json
import os

import pytest
import torch

import dckpt
from dckpt_testing import flip_stored_byte
from dckpt.cli import main as cli


def own_segment(repo, step: int) -> str:
    doc = json.loads((repo / "manifests" / f"{step:012d}.json").read_text())
    return str(repo / next(s for s in doc["segments"] if doc["attempt"] in s))


def three_saves(repo) -> dict:
    torch.manual_seed(0)
    state = {"w": torch.randn(1024, 256), "b": torch.zeros(256), "frozen": torch.ones(64, 64),
             "epoch": 1}
    dckpt.save(state, str(repo), step=1)
    state["w"][:8] += 1.0  # the first 8 KiB of a 1 MiB tensor: one 256 KiB block of four
    state["b"] += 1.0
    dckpt.save(state, str(repo), step=2)
    state["extra"] = torch.arange(10)
    state["w"] = torch.randn(128, 256)  # another shape
    dckpt.save(state, str(repo), step=3)
    return state


def test_diff_names_what_changed_and_what_is_shared(tmp_path, capsys):
    three_saves(tmp_path)
    d = dckpt.diff(str(tmp_path), 1, 2)
    assert {i.fqn: (i.change, i.changed_bytes) for i in d.items} == {
        "w": ("changed", 256 << 10), "b": ("changed", 1024)}
    assert d.same == 2  # frozen, epoch
    assert 0 < d.bytes_shared < d.bytes_b  # w's three unchanged blocks, frozen, epoch
    d13 = dckpt.diff(str(tmp_path), 1, 3)
    assert {i.fqn: i.change for i in d13.items} == {"w": "layout", "b": "changed",
                                                    "extra": "added"}
    assert cli(["diff", str(tmp_path), "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "2 items differ, 2 equal" in out and "256.0 KiB" in out
    assert cli(["diff", str(tmp_path), "1", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["changed_bytes"] == (256 << 10) + 1024
    assert cli(["diff", str(tmp_path), "1", "9"]) == 2  # no such step: an error, said


def test_health_dates_the_newest_checkpoint_whose_manifest_reads(tmp_path, capsys):
    """A damaged newest manifest has no time: it was reported 56 years old (and an age
    alert fired, and the metrics' last success went to 1970)."""
    repo = tmp_path / "repo"
    three_saves(repo)
    path = repo / "manifests" / f"{3:012d}.json"
    path.write_bytes(path.read_bytes()[:30])
    h = dckpt.health(str(repo), max_age_s=3600)
    assert (h.newest_step, h.recoverable_step) == (2, 2) and 0 <= h.newest_age_s < 600
    assert h.code == 1 and len(h.reasons) == 1 and "not recoverable: [3]" in h.reasons[0]
    assert cli(["health", str(repo)]) == 1
    assert "newest        step 2, " in capsys.readouterr().out


def test_health_codes(tmp_path, capsys):
    repo = tmp_path / "repo"
    three_saves(repo)
    h = dckpt.health(str(repo))
    assert (h.code, h.status, h.recoverable_step, h.newest_step) == (0, "OK", 3, 3)
    assert h.read_bytes_per_s > 0 and h.estimated_read_s > 0 and h.free_bytes > 0
    assert cli(["health", str(repo)]) == 0
    assert cli(["health", str(repo), "--max-age", "0"]) == 1  # stale
    assert "old (limit 0 s)" in capsys.readouterr().out

    # the newest checkpoint's own data truncated: a restart would fall back to step 2
    path = own_segment(repo, 3)
    os.truncate(path, os.path.getsize(path) // 2)
    h = dckpt.health(str(repo))
    assert h.code == 1 and h.recoverable_step == 2 and [s for s, _ in h.unrecoverable] == [3]
    assert cli(["health", str(repo), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["status"] == "WARNING"

    # a flipped byte passes the listing check; the sample read or --verify finds it
    assert flip_stored_byte(str(repo), 2, "w", at=10) == str(own_segment(repo, 2))
    listing_only = dckpt.health(str(repo), sample_bytes=0)
    assert listing_only.recoverable_step == 2 and listing_only.read_bytes_per_s is None
    assert dckpt.health(str(repo)).recoverable_step == 1
    assert dckpt.health(str(repo), verify=True, sample_bytes=0).recoverable_step == 1

    # nothing recoverable: CRITICAL; no repository at all: UNKNOWN
    os.remove(own_segment(repo, 1))
    assert cli(["health", str(repo)]) == 2
    assert "CRITICAL" in capsys.readouterr().out
    assert cli(["health", str(tmp_path / "nowhere")]) == 2  # holds no checkpoint
    assert "holds no committed checkpoint" in capsys.readouterr().out
    assert cli(["health", "nosuchproto://bucket/x"]) == 3


def test_health_and_verify_leave_metrics_for_cron(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    def values(path):
        return {s.name: s.value for f in text_string_to_metric_families(path.read_text())
                for s in f.samples if s.labels.get("job_name") == "cron"}

    repo = tmp_path / "repo"
    three_saves(repo)
    prom = tmp_path / "prom" / "health.prom"
    assert cli(["health", str(repo), "--metrics-textfile", str(prom), "--job", "cron"]) == 0
    v = values(prom)
    assert (v["dckpt_health_status"], v["dckpt_recoverable_step"], v["dckpt_checkpoints"],
            v["dckpt_damaged_checkpoints"], v["dckpt_last_success_step"]) == (0, 3, 3, 0, 3)
    path = own_segment(repo, 3)
    os.truncate(path, 10)
    assert cli(["health", str(repo), "--metrics-textfile", str(prom), "--job", "cron"]) == 1
    v = values(prom)
    assert (v["dckpt_health_status"], v["dckpt_recoverable_step"],
            v["dckpt_damaged_checkpoints"]) == (1, 2, 1)
    vprom = tmp_path / "prom" / "verify.prom"
    assert cli(["verify", str(repo), "--all", "--metrics-textfile", str(vprom),
                "--job", "cron"]) == 1
    v = values(vprom)
    assert v["dckpt_damaged_checkpoints"] == 1
    assert v["dckpt_corrupt_checkpoints_detected_total"] == 1
    assert cli(["health", "nosuchproto://bucket/x", "--metrics-textfile",
                str(prom), "--job", "cron"]) == 3
    assert values(prom)["dckpt_health_status"] == 3


def test_a_storage_that_fails_makes_health_unknown_and_counts_no_damage(tmp_path, monkeypatch,
                                                                        capsys):
    """A read or a manifest the storage failed to give (past its retries) says nothing about
    the checkpoints: health was CRITICAL ("none recoverable") and the metrics counted every
    step damaged, paging someone for a network blip. Now health is UNKNOWN (exit 3) and the
    damaged gauge stays 0; real damage beside it still counts."""
    import errno

    from prometheus_client.parser import text_string_to_metric_families

    from dckpt.storage import Store

    repo = tmp_path / "repo"
    three_saves(repo)
    os.truncate(own_segment(repo, 3), 10)  # step 3: really damaged (its listing says so)

    def reset(*args, **kwargs):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    prom = tmp_path / "verify.prom"
    with monkeypatch.context() as m:
        m.setattr(Store, "read_into", reset)
        m.setattr(Store, "read_vectored", reset)
        assert cli(["health", str(repo), "--verify"]) == 3
        assert "UNKNOWN" in capsys.readouterr().out
        assert cli(["verify", str(repo), "--all", "--metrics-textfile", str(prom),
                    "--job", "cron"]) == 1
    values = {s.name: s.value for f in text_string_to_metric_families(prom.read_text())
              for s in f.samples if s.labels.get("job_name") == "cron"}
    assert values["dckpt_damaged_checkpoints"] == 0  # the reads failed: no finding
    with monkeypatch.context() as m:
        real = Store.read_bytes
        m.setattr(Store, "read_bytes", lambda self, name: reset() if "manifests/" in name
                  else real(self, name))
        assert cli(["health", str(repo)]) == 3
    assert cli(["health", str(repo), "--verify"]) == 1  # the storage answers again: step 3
    assert cli(["verify", str(repo), "--all", "--metrics-textfile", str(prom),
                "--job", "cron"]) == 1
    values = {s.name: s.value for f in text_string_to_metric_families(prom.read_text())
              for s in f.samples if s.labels.get("job_name") == "cron"}
    assert values["dckpt_damaged_checkpoints"] == 1  # step 3


def test_a_listing_the_storage_fails_is_an_error_not_a_damaged_step(tmp_path, monkeypatch,
                                                                     capsys):
    """ls showed a manifest the storage failed to give (an S3 error past its retries) as
    DAMAGED, and a retention policy planned over the rest; now the listing raises, as a
    failed listing of the folder does, and a damaged manifest is still listed as one."""
    from dckpt.storage import Store

    repo = tmp_path / "repo"
    three_saves(repo)
    (repo / "manifests" / "000000000001.json").write_bytes(b"{}")  # damaged
    real = Store.read_bytes

    def failing(self, name):
        if name.endswith("000000000002.json"):
            raise dckpt.StorageError(f"{name}: SlowDown, tries exhausted")
        return real(self, name)

    with monkeypatch.context() as m:
        m.setattr(Store, "read_bytes", failing)
        with pytest.raises(dckpt.StorageError, match="SlowDown"):
            dckpt.list_checkpoints(str(repo))
        capsys.readouterr()
        assert cli(["ls", str(repo)]) == 2
        assert "SlowDown" in capsys.readouterr().err
    infos = dckpt.list_checkpoints(str(repo))
    assert [(i.step, i.problem is not None) for i in infos] == [(1, True), (2, False),
                                                                (3, False)]
    assert cli(["ls", str(repo)]) == 0
    assert "UNREADABLE" in capsys.readouterr().out


def test_health_reads_the_manifests_down_to_the_recoverable_one_only(tmp_path, monkeypatch):
    """A monitor runs health often: it decodes the newest manifests down to the first
    recoverable checkpoint, once each, not every manifest of a repository that keeps many."""
    from dckpt import decoder

    url = str(tmp_path / "repo")
    for step in range(1, 13):
        dckpt.save({"w": torch.full((100,), float(step))}, url, step=step)
    with open(os.path.join(url, "manifests", "000000000012.json"), "r+b") as f:
        f.seek(40)
        f.write(b"#")  # the newest is damaged: the check goes on to step 11
    decoded = []
    real = decoder._checked
    monkeypatch.setattr(decoder, "_checked", lambda raw, name: decoded.append(name) or
                        real(raw, name))
    h = dckpt.health(url)
    assert (h.recoverable_step, h.newest_step, h.checkpoints) == (11, 11, 12)
    assert [s for s, _ in h.unrecoverable] == [12]
    assert sorted(n.rsplit("/", 1)[-1] for n in decoded) == ["000000000011.json",
                                                              "000000000012.json"]
