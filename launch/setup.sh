#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install dckpt into it.
# torch is pinned first: this machine kind has a local CPU build of 2.13.0, and an unpinned
# torch would pull gigabytes of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "torch==2.13.0"
fi
# the frameworks of dckpt.integrations are optional extras of the package; the test suite
# runs their integration tests, so the set-up installs them
if ! .venv/bin/python -c "import dckpt, pytest, xdist, moto, s3fs, zstandard, matplotlib, hypothesis, lightning, transformers, accelerate, torchtitan" 2>/dev/null \
        || [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/mypy ]; then
    .venv/bin/pip install -q -e ".[test,bench,integrations]"
fi
