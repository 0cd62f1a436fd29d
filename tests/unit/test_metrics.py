"""Metrics scraped over HTTP, written as a textfile and pushed to an HTTP server on
127.0.0.1; structured JSON logs."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import dckpt
from dckpt_testing import free_port


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                      if k != "job_name")))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def make_state():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, {"app": dckpt.TrainState(model, opt, rng=False)}


def test_manager_metrics_over_http_and_textfile(tmp_path):
    url = str(tmp_path / "ckpt")
    dckpt.save(make_state()[2], url, step=6)  # a step the manager will fail to save again
    metrics = dckpt.Metrics(job="unit", textfile=str(tmp_path / "prom" / "dckpt.prom"))
    port = metrics.serve(free_port(), addr="127.0.0.1")
    infos = []
    model, opt, state = make_state()
    mgr = dckpt.CheckpointManager(url, save_every_steps=3, retention=dckpt.KeepLast(2),
                                  metrics=metrics, handle_signals=False,
                                  save_config=dckpt.SaveConfig(compression="on"),
                                  on_save=infos.append)
    for step in range(10):
        with torch.no_grad():
            model.weight.mul_(0.5)  # halves: compresses (exponent planes)
        mgr.maybe_save(step, state)
    mgr.close()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        scraped = r.read().decode()
    metrics.close()
    assert [i.step for i in infos] == [0, 3, 9]
    assert value(scraped, "dckpt_saves_total") == 3
    assert value(scraped, "dckpt_last_success_step") == 9
    assert value(scraped, "dckpt_last_success_timestamp_seconds") == infos[-1].created_at
    assert value(scraped, "dckpt_bytes_written_total") == sum(i.bytes_written for i in infos)
    assert value(scraped, "dckpt_bytes_logical_total") == sum(i.bytes_logical for i in infos)
    assert value(scraped, "dckpt_save_failures_total", reason="CheckpointExistsError") == 1
    assert value(scraped, "dckpt_checkpoints") == 2
    assert value(scraped, "dckpt_storage_free_bytes") > 0
    assert value(scraped, "dckpt_compression_ratio") > 1.0
    assert value(scraped, "dckpt_training_pause_seconds_count") == 4  # 3 saves + the failed
    assert value(scraped, "dckpt_save_phase_seconds", phase="total") == \
        infos[-1].phase_s["total"]
    # the textfile holds the same figures for node_exporter
    text = (tmp_path / "prom" / "dckpt.prom").read_text()
    assert value(text, "dckpt_saves_total") == 3 and 'job_name="unit"' in text

    # a restore that skips a damaged checkpoint counts it
    doc = json.loads((tmp_path / "ckpt" / "manifests" / f"{9:012d}.json").read_text())
    own = [seg for seg in doc["segments"] if doc["attempt"] in seg]  # what step 9 wrote
    with open(tmp_path / "ckpt" / own[0], "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 0xFF]))
    fresh = dckpt.Metrics(job="unit")
    m2 = dckpt.CheckpointManager(url, metrics=fresh, handle_signals=False)
    assert m2.restore(make_state()[2]).step == 6
    m2.close()
    text = fresh.exposition()
    assert value(text, "dckpt_corrupt_checkpoints_detected_total") == 1
    assert value(text, "dckpt_data_lost_steps") == 3
    assert value(text, "dckpt_recoveries") >= 1 and value(text, "dckpt_restore_seconds") > 0


class _Gateway(BaseHTTPRequestHandler):
    received: list[tuple[str, str, bytes]] = []

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append(("PUT", self.path, body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_push_to_a_gateway_on_localhost():
    server = HTTPServer(("127.0.0.1", 0), _Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        metrics = dckpt.Metrics(job="pushed")
        metrics.observe_failure("CommitError")
        metrics.push(f"127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    method, path, body = _Gateway.received[-1]
    assert method == "PUT" and path == "/metrics/job/pushed"
    assert value(body.decode(), "dckpt_save_failures_total", reason="CommitError") == 1


@pytest.mark.parametrize("call", [
    lambda m: m.serve("9400"), lambda m: m.serve(-1), lambda m: m.serve(65536),
    lambda m: m.serve(True), lambda m: m.serve(0, addr=5), lambda m: m.write_textfile(None),
    lambda m: m.write_textfile(""), lambda m: m.push(5), lambda m: m.push(""),
    lambda m: m.push("127.0.0.1:1", timeout=-1), lambda m: m.push("127.0.0.1:1", timeout=0),
    lambda m: m.push("127.0.0.1:1", timeout=float("inf")), lambda m: m.push("h:1", timeout="1"),
])
def test_bad_arguments_to_the_ways_out_are_refused(call):
    with pytest.raises(dckpt.ArgumentError):
        call(dckpt.Metrics())


@pytest.mark.parametrize("call", [
    lambda m: m.observe_pause("x"), lambda m: m.observe_memory(None),
    lambda m: m.observe_corrupt(-1), lambda m: m.observe_save({"step": 1}),
    lambda m: m.observe_restore(None, 1), lambda m: m.observe_health(5),
    lambda m: m.observe_verify([]), lambda m: m.observe_repository(5, 1),
    lambda m: m.observe_pause(),
])
def test_a_record_of_a_wrong_value_is_a_dckpt_error(call):
    """Each left as a TypeError, ValueError or AttributeError of prometheus_client."""
    with pytest.raises(dckpt.DckptError):
        call(dckpt.Metrics())


def test_a_way_out_that_fails_is_a_dckpt_error_in_bounded_time():
    metrics = dckpt.Metrics()
    port = metrics.serve(0, addr="127.0.0.1")  # the port the system chose, served
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert "dckpt_saves_total" in r.read().decode()
    with pytest.raises(dckpt.DckptError, match=f"cannot serve on 127.0.0.1:{port}"):
        dckpt.Metrics().serve(port, addr="127.0.0.1")  # taken
    closed = free_port()
    with pytest.raises(dckpt.DckptError, match="not pushed .*refused"):
        metrics.push(f"127.0.0.1:{closed}")
    silent = socket.socket()  # accepts connections and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    t0 = time.monotonic()
    with pytest.raises(dckpt.DckptError, match="not pushed .*timed out"):
        metrics.push(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
    assert time.monotonic() - t0 < 10
    silent.close()
    metrics.close()


def test_an_unwritable_textfile_is_logged_once_and_never_fails_a_save(tmp_path, caplog):
    prom = tmp_path / "dckpt.prom"
    metrics = dckpt.Metrics("job", textfile=prom)  # a PathLike is a path
    url = str(tmp_path / "ckpt")
    mgr = dckpt.CheckpointManager(url, save_every_steps=1, async_save=False,
                                  handle_signals=False, metrics=metrics)
    state = {"w": torch.ones(4)}
    mgr.maybe_save(0, state)
    assert "dckpt_saves_total" in prom.read_text()
    mgr.wait()  # the retention run after the save records too: not between the next two lines
    prom.unlink()
    prom.mkdir()  # the path turned into a folder: the textfile cannot be written
    with caplog.at_level(logging.WARNING, logger="dckpt"):
        for step in (1, 2):
            mgr.maybe_save(step, state)  # a StorageError "the storage failed" after the commit
    assert [c.step for c in dckpt.list_checkpoints(url)] == [0, 1, 2] and mgr.failures == []
    said = [r.getMessage() for r in caplog.records if "metrics textfile" in r.getMessage()]
    assert len(said) == 1 and "not written" in said[0] and "not affected" in said[0]
    mgr.close()
    for bad in (5, "", None):
        with pytest.raises(dckpt.ArgumentError):
            dckpt.Metrics(bad)  # type: ignore[arg-type]
    with pytest.raises(dckpt.ArgumentError, match="is a folder"):
        dckpt.Metrics("job", textfile=str(tmp_path))
    with pytest.raises(dckpt.ArgumentError):
        dckpt.Metrics("job", textfile=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket"])
def test_a_textfile_that_is_no_regular_file_is_never_replaced(tmp_path, kind, caplog):
    """The textfile is written beside its path and renamed over it: /dev/null (as root), a
    FIFO, or a link to one, named as the textfile was replaced by a file of metrics. (A
    device is the same check; no test makes one, since a slip would replace it.)"""
    import os

    path = tmp_path / "dckpt.prom"
    target = tmp_path / "elsewhere.prom"
    target.write_text("keep")
    server = None
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        os.mkfifo(target.with_suffix(".pipe"))
        path.symlink_to(target.with_suffix(".pipe"))
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(path))
    says = {"fifo": "a FIFO", "symlink": "a link to a FIFO", "socket": "a socket"}[kind]
    with pytest.raises(dckpt.ArgumentError, match=f"is {says}, which writing it would replace"):
        dckpt.Metrics("job", textfile=path)
    metrics = dckpt.Metrics("job")
    with pytest.raises(dckpt.StorageError, match="not written: it is a"):
        metrics.write_textfile(path)  # `dckpt health --metrics-textfile` writes this way
    prom = tmp_path / "ok.prom"  # a textfile that turns into a FIFO while the job runs
    metrics = dckpt.Metrics("job", textfile=prom)
    mgr = dckpt.CheckpointManager(str(tmp_path / "ckpt"), save_every_steps=1, async_save=False,
                                  handle_signals=False, metrics=metrics)
    mgr.maybe_save(0, {"w": torch.ones(4)})
    mgr.wait()
    prom.unlink()
    os.mkfifo(prom)
    with caplog.at_level(logging.WARNING, logger="dckpt"):
        mgr.maybe_save(1, {"w": torch.ones(4)})
    mgr.close()
    assert any("not written: it is a FIFO" in r.getMessage() for r in caplog.records)
    assert [c.step for c in dckpt.list_checkpoints(str(tmp_path / "ckpt"))] == [0, 1]
    import stat as st

    assert st.S_ISFIFO(os.lstat(prom).st_mode)  # still the FIFO
    assert os.path.islink(path) or not os.path.isfile(path)  # still what it was
    assert target.read_text() == "keep"
    if server is not None:
        server.close()


def test_only_rank_0_records_by_default():
    m = dckpt.Metrics(job="x")
    assert m.enabled  # one process: rank 0


def test_json_logs_carry_the_events(tmp_path):
    stream = io.StringIO()
    handler = dckpt.configure_logging(json_lines=True, stream=stream, run="run-1")
    try:
        _, _, state = make_state()
        mgr = dckpt.CheckpointManager(str(tmp_path), save_every_steps=1, async_save=False,
                                      handle_signals=False)
        mgr.maybe_save(0, state)
        mgr.close()
    finally:
        logging.getLogger("dckpt").removeHandler(handler)
    docs = [json.loads(line) for line in stream.getvalue().splitlines()]
    events = {d.get("event"): d for d in docs}
    assert all(d["run_id"] == "run-1" and d["rank"] == 0 for d in docs)
    assert events["save_start"]["step"] == 0 and events["save_start"]["reason"] == "steps"
    commit = events["save_commit"]
    assert commit["step"] == 0 and commit["bytes"] > 0 and commit["seconds"] > 0


def test_grafana_dashboard_uses_only_metrics_that_exist():
    import os
    import re

    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "grafana", "dckpt.json")
    with open(path) as f:
        dash = json.load(f)
    exported = set()
    for family in text_string_to_metric_families(dckpt.Metrics(job="x").exposition()):
        exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket",
                     f"{family.name}_count", f"{family.name}_sum"}
    used = {name for p in dash["panels"] for t in p["targets"]
            for name in re.findall(r"\b(dckpt_[a-z_]+)", t["expr"])}
    assert len(dash["panels"]) >= 10 and used
    assert used <= exported, used - exported
