"""CheckpointManager under torchrun: restarts after SIGKILL, SIGTERM to the agent, FSDP2
resharding from 4 ranks to 2, and a two-node rendezvous on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from filelock import FileLock  # torch's own dependency

import dckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = os.path.join(ROOT, "launch")


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *extra, *args]


def run(cmd: list[str], timeout: float = 240, env_extra: dict | None = None, **kw) -> str:
    env = dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=env, **kw)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return proc.stdout


def same_weights(a: str, b: str) -> bool:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def train(ckpt, *args: str) -> list[str]:
    return [os.path.join(LAUNCH, "train_ddp.py"), "--ckpt", str(ckpt), "--step-seconds", "0.02",
            *args]


@pytest.fixture(scope="session")
def reference(tmp_path_factory, worker_id) -> str:
    """The final weights of an uninterrupted 20-step run of launch/train_ddp.py on 2 ranks,
    the reference of the tests that kill, restart or move its ranks (checkpoints do not
    change the training): one run, shared by the tests and the xdist workers."""
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent  # this session's, shared by its workers
    out = root / "reference-20-steps.pt"
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            run(torchrun(*train(root / "reference-ckpt", "--steps", "20", "--save-every", "10",
                                "--out", str(out))))
    return str(out)


def test_max_restarts_resume_bit_exact_from_the_memory_tier(tmp_path, reference):
    """A worker SIGKILLed at step 13 under torchrun --max-restarts: with memory saves every 2
    steps and storage saves every 10, the restart resumes from the newest memory step and ends
    with the uninterrupted run's weights. (A resume from storage after a SIGKILL is the
    README's main job, test_main_job.py; the restart itself is the same torchrun's.)"""
    steps = ("--steps", "20")
    shm = tmp_path / "shm"
    shm.mkdir()
    out = run(["bash", os.path.join(LAUNCH, "restarts.sh"), str(tmp_path / "mem"), *steps,
               "--save-every", "10", "--memory-every", "2", "--memory-dir", str(shm),
               "--step-seconds", "0.02", "--crash-at", "13",
               "--out", str(tmp_path / "got-mem.pt")])
    assert "rank 1: SIGKILL at step 13" in out
    # step 12's memory save may still have been writing at the kill: then 10 (in both
    # tiers, memory preferred) or 8
    found = re.search(r"resumed from step (\d+) \(torchrun restart 1\) in [\d.]+ s from (\w+)",
                      out)
    assert found and int(found[1]) in (8, 10, 12) and found[2] == "memory", out
    assert same_weights(reference, tmp_path / "got-mem.pt")
    assert list(shm.iterdir()) == []  # the clean end removed the memory tier
    assert [c.step for c in dckpt.list_checkpoints(str(tmp_path / "mem"))][-1] == 19


def test_sigterm_to_the_agent_takes_an_emergency_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agent = subprocess.Popen(torchrun(*train(ckpt, "--steps", "2000", "--save-every", "50")),
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        manifest = ckpt / "manifests" / f"{50:012d}.json"
        while not manifest.exists():
            assert agent.poll() is None and time.monotonic() < deadline, agent.communicate()
            time.sleep(0.05)
        time.sleep(0.1)  # a few steps past the periodic checkpoint
        agent.send_signal(signal.SIGTERM)
        out, err = agent.communicate(timeout=60)
    finally:
        agent.kill()
    steps = [c.step for c in dckpt.list_checkpoints(str(ckpt))]
    newest = steps[-1]
    assert newest > 50 and newest % 50 != 0, (steps, out, err[-3000:])
    assert f"checkpoint of step {newest} committed" in out
    assert "got SIGTERM: emergency checkpoint" in err
    resumed = run(torchrun(*train(ckpt, "--steps", str(newest + 3), "--save-every", "50")))
    assert f"resumed from step {newest} " in resumed


def test_fsdp2_saved_on_4_ranks_restores_on_2(tmp_path):
    script = os.path.join(LAUNCH, "train_fsdp2.py")
    ckpt = str(tmp_path / "ckpt")
    out4 = run(torchrun(script, "--ckpt", ckpt, "--steps", "7", "--out", str(tmp_path / "a.pt"),
                        nproc=4))
    assert "4 ranks on cpu: fresh start" in out4
    out2 = run(torchrun(script, "--ckpt", ckpt, "--steps", "7", "--out", str(tmp_path / "b.pt")))
    assert "2 ranks on cpu: resumed step 6 (saved by 4 ranks)" in out2
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("a.pt", "b.pt"))
    assert a["model"].keys() == b["model"].keys() and len(a["model"]) == 6
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["optim"].keys() == b["optim"].keys()
    assert all(torch.equal(a["optim"][k][n], b["optim"][k][n])
               for k in a["optim"] for n in ("exp_avg", "exp_avg_sq"))
    assert [c.world_size for c in dckpt.list_checkpoints(ckpt)] == [4, 4]  # KeepLast(2)


def test_two_node_rendezvous_save_and_restore(tmp_path, reference):
    two_node = ["bash", os.path.join(LAUNCH, "two_node.sh"), str(tmp_path / "ckpt"),
                "--save-every", "5", "--step-seconds", "0"]
    run([*two_node, "--steps", "12"])
    out = run([*two_node, "--steps", "20", "--out", str(tmp_path / "two.pt")])
    assert "resumed from step 11" in out
    assert same_weights(tmp_path / "two.pt", reference)


def test_pipeline_restart_skips_finished_stages(tmp_path):
    script = os.path.join(LAUNCH, "pipeline.py")
    run(torchrun(script, "--ckpt", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.json")))
    env_restarts = ("--max-restarts=1",)
    out = run(torchrun(script, "--ckpt", str(tmp_path / "ckpt"), "--crash-at", "finetune:12",
                       "--out", str(tmp_path / "got.json"), extra=env_restarts),
              env_extra={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert "SIGKILL in finetune at step 12" in out
    assert "pretrain: done before, skipped" in out
    assert re.search(r"finetune: resumed at step (5|10) ", out), out
    assert out.count("pretrain: starting") == 1 and out.count("distill: starting") == 1
    ref, got = (json.loads((tmp_path / f).read_text()) for f in ("ref.json", "got.json"))
    assert got == ref and set(got) == {"pretrain", "finetune", "distill"}
    st = dckpt.status(str(tmp_path / "ckpt"))
    assert st.pipeline["done"] == ["pretrain", "finetune", "distill"]
    assert st.pipeline["results"] == ref


def _agent(ckpt, port: int, memory_dir, log, *args: str) -> subprocess.Popen:
    """One torchrun agent ("node") of a two-node job on 127.0.0.1, with its own memory."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
           f"--rdzv-id=dckpt-{port}", "--local-addr=127.0.0.1",
           *train(ckpt, "--memory-every", "2", "--memory-replicas", "1", "--save-every", "10",
                  *args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DCKPT_MEMORY_DIR=str(memory_dir))
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                            start_new_session=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_lost_node_comes_back_from_its_peers_memory(tmp_path, reference):
    """Two nodes, memory every 2 steps with one replica, storage every 10: one node's agent
    and worker are SIGKILLed and its memory deleted (the machine was replaced); the
    relaunched job restores the newest memory step, the new node's rank from its peer's
    replica, and ends with an uninterrupted run's weights bit for bit."""
    ckpt, mem = tmp_path / "ckpt", {n: tmp_path / f"mem-{n}" for n in "ab"}
    for d in mem.values():
        d.mkdir()
    logs = {n: open(tmp_path / f"first-{n}.log", "w") for n in "ab"}
    port = _free_port()
    agents = {n: _agent(ckpt, port, mem[n], logs[n], "--steps", "20", "--stop-at", "15")
              for n in "ab"}
    deadline = time.monotonic() + 180
    text = ""
    while time.monotonic() < deadline:
        text = "".join((tmp_path / f"first-{n}.log").read_text() for n in "ab")
        if text.count("stopped at step 15") == 2:
            break
        assert all(a.poll() is None for a in agents.values()), text[-3000:]
        time.sleep(0.5)
    assert text.count("stopped at step 15") == 2, text[-3000:]
    os.killpg(agents["b"].pid, signal.SIGKILL)  # node b dies with its memory
    shutil.rmtree(mem["b"])
    mem["b"].mkdir()
    os.killpg(agents["a"].pid, signal.SIGKILL)  # the job is lost; node a's memory stays
    for a in agents.values():
        a.wait()
    port = _free_port()
    logs = {n: open(tmp_path / f"second-{n}.log", "w") for n in "ab"}
    agents = {n: _agent(ckpt, port, mem[n], logs[n], "--steps", "20", "--out",
                        str(tmp_path / "two.pt")) for n in "ab"}
    for a in agents.values():
        a.wait(timeout=240)
    text = "".join((tmp_path / f"second-{n}.log").read_text() for n in "ab")
    assert all(a.returncode == 0 for a in agents.values()), text[-4000:]
    found = re.search(r"resumed from step (\d+) .* ranks read from (\w+),(\w+)", text)
    assert found and int(found[1]) in (13, 14, 15), text[-4000:]
    assert sorted(found.groups()[1:]) == ["memory", "peer"], text[-4000:]
    assert same_weights(tmp_path / "two.pt", reference)
