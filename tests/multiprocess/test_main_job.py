"""The README's main job end to end: torchrun, SIGKILL mid-run, resume, equal weights."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_killed_ddp_run_resumes_to_the_same_weights(tmp_path):
    env = dict(os.environ, DCKPT_RUN_DIR=str(tmp_path / "run"))
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "main_job.sh"), "24", "10"],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "killed the whole job with SIGKILL" in out
    resumed = [line for line in out.splitlines() if "resumed from step" in line]
    assert len(resumed) == 1 and int(resumed[0].split("resumed from step ")[1].split()[0]) >= 10
    assert "RESULT: final weights EQUAL" in out
