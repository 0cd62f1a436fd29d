"""The dckpt command: output and exit codes, in process (``main(argv)``, as the console script
calls it) and once as a user runs it (a subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import torch

import dckpt
from dckpt.cli import main


def _dckpt(*args: str) -> subprocess.CompletedProcess:
    """``dckpt ARGS`` in this process: a subprocess costs an import of torch (seconds) each."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 2
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _dckpt_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dckpt.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_ls_inspect_verify(tmp_path):
    url = str(tmp_path)
    dckpt.save({"w": torch.ones(256, 4), "opt": {"lr": 0.5}}, url, step=5, metrics={"loss": 2.0})
    dckpt.save({"w": torch.zeros(256, 4), "opt": {"lr": 0.25}}, url, step=9,
               metrics={"loss": 1.0, "ppl": 1 / 3, "tokens": 12345678901})

    ls = _dckpt("ls", url)
    assert ls.returncode == 0
    lines = ls.stdout.splitlines()
    assert lines[1].split()[0] == "5" and lines[2].split()[0] == "9"
    assert lines[2].split()[-3:] == ["loss=1.0", "ppl=0.333333", "tokens=12345678901"]
    listed = json.loads(_dckpt("ls", url, "--json").stdout)
    assert [i["step"] for i in listed] == [5, 9]
    typo = _dckpt("ls", url + "x")  # an empty repository, as an absent one is, but said
    assert typo.returncode == 0 and f"{url}x holds no dckpt repository" in typo.stdout
    assert listed[1]["metrics"] == {"loss": 1.0, "ppl": 1 / 3, "tokens": 12345678901}
    value = io.BytesIO()
    torch.save(0.5, value)
    assert listed[0]["bytes_logical"] == 256 * 4 * 4 + len(value.getvalue())

    inspect = _dckpt("inspect", url, "--step", "5")
    assert inspect.returncode == 0 and "step 5" in inspect.stdout
    assert any(line.split()[:4] == ["w", "tensor", "float32", "[256,"] for line in
               inspect.stdout.splitlines())
    doc = json.loads(_dckpt("inspect", url, "--json").stdout)
    assert doc["step"] == 9 and doc["items"]["w"]["size"] == [256, 4]

    clean = _dckpt("verify", url, "--all")
    assert clean.returncode == 0 and "clean" in clean.stdout

    with open(os.path.join(url, "manifests", "000000000009.json")) as f:
        m = json.load(f)
    with open(os.path.join(url, m["segments"][0]), "r+b") as f:
        f.seek(5)
        f.write(b"\x01\x02\x03")
    bad = _dckpt("verify", url, "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert report["ok"] is False and report["steps"] == [9]
    assert report["problems"][0]["object"] == m["segments"][0]
    assert _dckpt("verify", url, "--step", "5").returncode == 0


def test_errors_say_what_is_wrong(tmp_path):
    missing = _dckpt_process("inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "holds no dckpt repository" in missing.stderr
    empty = _dckpt("ls", str(tmp_path / "nothing"))  # an absent repository is an empty one
    assert empty.returncode == 0 and "(no committed checkpoint; " in empty.stdout
    usage = _dckpt("verify", str(tmp_path), "--step", "1", "--all")
    assert usage.returncode == 2 and "not allowed with" in usage.stderr
    version = _dckpt("--version")
    assert version.returncode == 0 and version.stdout == f"dckpt {dckpt.__version__}\n"
    # a storage option without "=" (or without a key) exited 1, which verify's callers read
    # as "a problem found"; "=v" was passed on as the option ""
    option = _dckpt_process("verify", str(tmp_path), "-o", "key")  # the real exit code
    assert option.returncode == 2 and "-o expects KEY=VALUE" in option.stderr, option
    option = _dckpt("verify", str(tmp_path), "-o", "=v")
    assert option.returncode == 2 and "-o expects KEY=VALUE" in option.stderr, option
    sample = _dckpt("health", str(tmp_path), "--sample-mib", "nan")
    assert sample.returncode == 3 and "--sample-mib must be a finite number" in sample.stdout


def test_the_repository_commands_answer_without_importing_torch(tmp_path):
    """ls, inspect, verify, status, health, diff, delete and gc need no torch: its import
    (seconds) would make every cron health check and every ``dckpt ls`` wait for it."""
    url = str(tmp_path / "repo")
    dckpt.save({"w": torch.ones(4), "opt": {"lr": 0.5}}, url, step=1)
    dckpt.save({"w": torch.zeros(4), "opt": {"lr": 0.5}}, url, step=2)
    script = f"""
import sys
from dckpt.cli import main
codes = [main(a) for a in (["ls", {url!r}], ["inspect", {url!r}], ["verify", {url!r}, "--all"],
                           ["status", {url!r}], ["health", {url!r}], ["diff", {url!r}, "1", "2"],
                           ["delete", {url!r}, "--step", "1"], ["gc", {url!r}, "--min-age", "0"])]
print("CODES", codes, "TORCH", sorted(m for m in sys.modules if m.split(".")[0] == "torch"))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "CODES [0, 0, 0, 0, 0, 0, 0, 0] TORCH []"
    assert [c.step for c in dckpt.list_checkpoints(url)] == [2]  # the delete did delete


def test_ls_keeps_its_columns_for_steps_of_any_length(tmp_path):
    url = str(tmp_path)
    for step in (5, 2**63 - 1):
        dckpt.save({"w": torch.ones(2)}, url, step=step)
    out = _dckpt("ls", url)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["step", "5", str(2**63 - 1)]
    starts = [lines[0].index("created")] + [
        re.search(r"\d{4}-\d\d-\d\d ", line).start() for line in lines[1:]]
    assert len(set(starts)) == 1, lines  # the created column starts alike
