"""Every code example in the docs runs: the ```python blocks of README.md and docs/*.md, and
the ```bash blocks of the pages written to be run, top to bottom per page, in an empty
folder. (```text blocks are synopses, and commands of the benchmarks page are measured by
benchmarks/run_all, not here.)"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PAGES = sorted([os.path.join(ROOT, "README.md"), *glob.glob(os.path.join(ROOT, "docs", "*.md"))])
SHELL_PAGES = {"getting-started.md", "operations.md"}
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(page: str) -> list[tuple[str, str]]:
    with open(page) as f:
        return [(lang, code) for lang, code in BLOCK.findall(f.read())]


def test_every_page_is_found_and_has_examples():
    names = {os.path.basename(p) for p in PAGES}
    assert {"README.md", "getting-started.md", "operations.md", "manager.md"} <= names
    runnable = [p for p in PAGES if any(lang == "python" for lang, _ in blocks(p))]
    assert len(runnable) >= 4


@pytest.mark.parametrize("page", [p for p in PAGES if any(
    lang == "python" or (lang == "bash" and os.path.basename(p) in SHELL_PAGES)
    for lang, _ in blocks(p))], ids=os.path.basename)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep
               + os.environ.get("PATH", ""))
    namespace: dict = {"__name__": "__doc_example__"}
    for i, (lang, code) in enumerate(blocks(page)):
        where = f"{os.path.basename(page)}, block {i + 1} ({lang})"
        if lang == "python":
            exec(compile(code, where, "exec"), namespace)  # noqa: S102 - our own docs
        elif lang == "bash" and os.path.basename(page) in SHELL_PAGES:
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{where}:\n{code}\n{proc.stdout}\n{proc.stderr}"
    # a page's manager, if any, is closed by the page itself
    mgr = namespace.get("mgr")
    assert mgr is None or mgr._closed, f"{os.path.basename(page)} leaves a manager open"
