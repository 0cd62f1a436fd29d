"""``dckpt bench`` end to end, as a user runs it: one process and 2 gloo ranks under torchrun,
on local files and on the moto S3 server. The table has every method with numbers, the JSON
lines parse, the restores gave back the saved values, and nothing is left under the URL:
after a full run, after a refused one, and after a Ctrl-C (SIGINT) in the middle."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ("--gib-per-rank", "0.004", "--tensor-mib", "1", "--repeats", "1")
ALL_LOCAL = ("raw", "memcpy", "dckpt", "DCP", "torch-checkpointing")


def bench_cmd(url: str, *args: str, ranks: int = 0) -> list[str]:
    if ranks:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={ranks}", "-m", "dckpt", "bench", url, *args]
    return [sys.executable, "-m", "dckpt", "bench", url, *args]


def env() -> dict:
    """No restarts here: the workers share torchrun's store (the default). With a store of
    their own (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) rank 0 listened on a port the agent had
    found free and let go, and once another test's server took it first (EADDRINUSE)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    return env


def options_args(options: dict | None) -> list[str]:
    return [a for k, v in (options or {}).items()
            for a in ("-o", f"{k}={json.dumps(v) if not isinstance(v, str) else v}")]


def left_under(url: str, options: dict | None) -> list[str]:
    if "://" not in url:
        return sorted(os.listdir(url)) if os.path.exists(url) else []
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(options or {}))
    fs.invalidate_cache()
    return fs.find(root.split("/", 1)[0])  # the whole bucket


def parse_table(stdout: str) -> dict[str, list[str]]:
    rows = {}
    for line in stdout.split("\n\n")[0].splitlines():  # the table, above the ratios
        parts = line.split()
        if parts and parts[0] in ALL_LOCAL:
            rows[parts[0]] = parts[1:]
    return rows


def check_outputs(out_dir, stdout: str, methods: tuple[str, ...], world: int) -> list[dict]:
    rows = parse_table(stdout)
    assert set(rows) == set(methods), stdout
    for name, cells in rows.items():
        numbers = [float(c) for c in cells if c != "-"]
        assert numbers and all(n > 0 for n in numbers), (name, cells)
        assert "WRONG" not in cells
    records = [json.loads(line) for line in (out_dir / "results.jsonl").read_text().splitlines()]
    run = records[0]
    assert run["record"] == "run" and run["world_size"] == world
    results = [r for r in records if r["record"] == "result"]
    assert {r["method"] for r in results} == set(methods)
    assert all(r["seconds"] > 0 for r in results)
    restores = [r for r in results if r["phase"] == "restore"]
    assert restores and all(r["equal"] is True for r in restores)
    assert not [r for r in records if r["record"] == "error"]
    ratios = records[-1]
    assert ratios["record"] == "ratios" and ratios["save / raw write"] > 0
    assert (out_dir / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return records


@pytest.mark.parametrize("ranks", [0, 2])
def test_bench_on_local_files(tmp_path, ranks):
    target = tmp_path / "target"
    target.mkdir()
    proc = subprocess.run(bench_cmd(str(target), *TINY, "--out", str(tmp_path / "out"),
                                    ranks=ranks), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    check_outputs(tmp_path / "out", proc.stdout, ALL_LOCAL, max(ranks, 1))
    assert re.search(r"\[\s*\d+/\d+\] dckpt save 1/1", proc.stderr)  # progress is shown
    assert "dropped from the page cache" in proc.stdout  # how the restores were made cold
    assert "sync saves: O_DIRECT, " in proc.stdout  # how dckpt's saves wrote here
    assert os.listdir(target) == []


@pytest.mark.s3
@pytest.mark.parametrize("ranks", [2])  # one process: test_bench_on_local_files[0]
def test_bench_on_s3(tmp_path, s3_repo, ranks):
    url, options = s3_repo
    proc = subprocess.run(bench_cmd(url, *TINY, "--layout", "dense", "--dtype", "bf16",
                                    *options_args(options), "--out", str(tmp_path),
                                    ranks=ranks), capture_output=True, text=True, timeout=300,
                          env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    records = check_outputs(tmp_path, proc.stdout, ("raw", "memcpy", "dckpt", "DCP"),
                            max(ranks, 1))
    notes = {r["method"]: r["note"] for r in records if r["record"] == "note"}
    assert "local files only" in notes["torch-checkpointing"]
    assert "no local cache" in records[0]["cold_reads"]
    assert records[0]["sync_saves"] == "to the object store"
    assert "testing" not in json.dumps(records[0])  # option keys, never their values
    assert left_under(url, options) == []


def test_a_workload_of_differential_saves_restores_bit_exact(tmp_path):
    proc = subprocess.run(bench_cmd(str(tmp_path / "t"), *TINY, "--workload", "sparse-rows",
                                    "--methods", "dckpt,raw", "--out", str(tmp_path / "o")),
                          capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    check_outputs(tmp_path / "o", proc.stdout, ("raw", "dckpt"), 1)
    assert not (tmp_path / "t").exists() or os.listdir(tmp_path / "t") == []


def _dcp_peer_as_on_torch_2_11(rank: int, world_size: int, url: str) -> tuple:
    from torch.distributed.device_mesh import init_device_mesh

    from dckpt.bench import methods
    from dckpt.bench.workload import Workload

    methods.reusable_default_stager = lambda: False  # as torch 2.11 answers
    w = Workload.build(gib_per_rank=2 / 1024, tensor_mib=0.25, layout="sharded", dtype="fp32",
                       kind="full", device="cpu", mesh=init_device_mesh("cpu", (world_size,)))
    peer = methods.DCP(w, url, None, 2)
    equal = []
    for step in (1, 2, 3):
        w.change(step)
        peer.start(step)()
        w.scramble()
        peer.restore(step)
        equal.append(w.equal())
    peer.close()
    return peer.stager is None, peer.staging.use_async_staging, equal


def test_dcps_async_peer_saves_again_where_its_stager_stages_once(tmp_path):
    """torch 2.11's DefaultStager fails at its second save (``KeyError: <class 'type'>``), and
    staging in a new stager's thread crashed the process at the second save of DTensors:
    there the DCP peer takes a stager per save and stages in the caller's thread. That path,
    forced on this torch: three async saves of DTensors on 2 ranks, each restored bit for
    bit. (On torch 2.11 every ``dckpt bench`` run failed at the peer's second save.)"""
    from dckpt_testing import run_ranks

    out = [o.value for o in run_ranks(_dcp_peer_as_on_torch_2_11, 2, str(tmp_path / "dcp"),
                                      daemon=False, timeout_s=180)]
    assert out == [(True, False, [True, True, True])] * 2


@pytest.mark.parametrize("args, says", [
    (("--methods", "dckpt,nccl"), "--methods"),
    (("--repeats", "0"), "--repeats"),
    (("--gib-per-rank", "-1"), "--gib-per-rank"),
    (("--gib-per-rank", "inf"), "positive and finite"),  # it asked for "inf GiB" of memory
    (("--threads", "100000"), "--threads must be at most 1024"),  # found by the first save
    (("-o", "no_such_option=1"), "storage options ['no_such_option']"),
    # more than the node holds: the run would be killed for memory (and what runs beside it)
    (("--gib-per-rank", "100000"), "GiB of host memory on this node"),
    (("--gib-per-rank", "100000", "--ranks", "2"), "GiB of host memory on this node"),
    # found at the end, it cost the run's measurements
    (("--out", "A_FILE"), "is a file, not a folder; name a folder for the results"),
    (("--out", "A_FILE/sub"), "is a file, not a folder; name a folder for the results"),
    (("--out", "RESULTS_A_FOLDER"), "results.jsonl is there and is not a file"),
    # the permission bits said yes (as root): the run went on, and failed to write at the end
    (("--out", "/proc/dckpt-bench-out"), "cannot write in /proc"),
])
def test_bad_arguments_are_refused_before_anything_is_written(tmp_path, args, says):
    target = tmp_path / "target"
    target.mkdir()
    url = str(target) if args[0] != "-o" else "s3://bucket/x"
    ranks = int(args[-1]) if "--ranks" in args else 0
    args = args[:-2] if ranks else args
    bad_out = args[0] == "--out"
    if bad_out:
        (tmp_path / "a_file").write_text("keep me")
        (tmp_path / "results" / "results.jsonl").mkdir(parents=True)
        places = {"A_FILE": str(tmp_path / "a_file"), "RESULTS_A_FOLDER": str(tmp_path / "results")}
        args = ("--out", places.get(args[1], args[1].replace("A_FILE", places["A_FILE"])))
    else:
        args = (*args, "--out", str(tmp_path / "out"))
    proc = subprocess.run(bench_cmd(url, *args, ranks=ranks),
                          capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == (1 if ranks else 2), proc.stdout + proc.stderr  # torchrun: 1
    assert says in proc.stderr, proc.stderr
    if not ranks:  # (torchrun prints a traceback of its own for a rank that exits 2)
        assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.count(says) == max(ranks, 1)  # every rank refuses, the same way
    assert os.listdir(target) == [] and not (tmp_path / "out").exists()
    if bad_out:
        assert (tmp_path / "a_file").read_text() == "keep me"
        assert os.listdir(tmp_path / "results" / "results.jsonl") == []


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_url_it_cannot_write_under_is_refused(tmp_path, where):
    target = tmp_path / "afile"
    target.write_text("keep me")
    url = str(target) if where == "a file" else str(target / "sub")
    proc = subprocess.run(bench_cmd(url, *TINY, "--out", str(tmp_path / "out")),
                          capture_output=True, text=True, timeout=120, env=env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("is a file" if where == "a file" else "cannot write there") in proc.stderr
    assert "Traceback" not in proc.stderr and target.read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["afile"]


FAIL_MID_RUN = """
import os, sys
import dckpt.bench.run as run
from dckpt.cli import main

def boom(self, methods, w, report):
    path = self.base[len("file://"):] if self.base.startswith("file://") else self.base
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, "half-written"), "wb").write(b"x" * 100)
    raise RuntimeError("the storage went away")

run.Run.measure = boom
sys.exit(main(["bench", sys.argv[1], "--gib-per-rank", "0.004", "--tensor-mib", "1"]))
"""


def test_a_failure_outside_any_method_still_removes_what_the_run_wrote(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    proc = subprocess.run([sys.executable, "-c", FAIL_MID_RUN, str(target)], capture_output=True,
                          text=True, timeout=120, env=env(), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "failed (RuntimeError): removing what the run wrote" in proc.stderr
    assert "the storage went away" in proc.stderr and os.listdir(target) == []


RESULTS_UNWRITABLE = """
import sys
import dckpt.bench.report as report
from dckpt.cli import main

def refuse(self, out_dir):
    raise PermissionError(13, "Permission denied (the folder changed during the run)", out_dir)

report.Report.write = refuse
sys.exit(main(["bench", sys.argv[1], "--gib-per-rank", "0.004", "--tensor-mib", "1",
               "--repeats", "1", "--methods", "raw,dckpt", "--out", sys.argv[2]]))
"""


def test_results_that_cannot_be_written_at_the_end_leave_the_table_on_screen(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    proc = subprocess.run([sys.executable, "-c", RESULTS_UNWRITABLE, str(target),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                          env=env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the results could not be written to" in proc.stderr, proc.stderr
    assert "Permission denied" in proc.stderr and "Traceback" not in proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]
    assert {"raw", "dckpt"} <= set(rows), proc.stdout  # the measurements, printed
    assert os.listdir(target) == []


def _interrupt(cmd: list[str], target, when: str) -> tuple[int, str]:
    """Start ``cmd`` in its own process group, wait for ``when`` in its progress, and send
    SIGINT to the group, as a terminal's Ctrl-C does."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env(), start_new_session=True)
    seen = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if when in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        raise AssertionError(f"the run ended before {when!r}: " + "".join(seen)[-3000:])
    os.killpg(proc.pid, signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("ranks, when", [(0, "DCP save 1/2"), (2, "dckpt cold restore 1/2"),
                                         (0, "torch-checkpointing async set-up")])
def test_ctrl_c_mid_run_leaves_nothing(tmp_path, ranks, when):
    target = tmp_path / "target"
    target.mkdir()
    code, out = _interrupt(bench_cmd(str(target), "--gib-per-rank", "0.03", "--tensor-mib", "2",
                                     "--repeats", "2", "--out", str(tmp_path / "out"),
                                     ranks=ranks), target, when)
    assert code != 0, out
    assert "removing what the run wrote" in out, out[-3000:]
    time.sleep(1)  # a writer that outlived the removal would show now
    assert os.listdir(target) == [], out[-3000:]
    assert not (tmp_path / "out" / "results.jsonl").exists()
