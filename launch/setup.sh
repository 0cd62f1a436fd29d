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
# find_spec: whether each package is installed, without importing it (importing them all took
# 17 s, paid by every run of the main job)
installed() {
    .venv/bin/python -I -c "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))" "$@" 2>/dev/null
}
if ! installed torch; then
    .venv/bin/pip install -q "torch==2.13.0"
fi
# the frameworks of dckpt.integrations are optional extras of the package; the test suite
# runs their integration tests, so the set-up installs them
if ! installed dckpt pytest xdist moto s3fs zstandard matplotlib hypothesis lightning \
        transformers accelerate torchtitan \
        || [ ! -x .venv/bin/ruff ] || [ ! -x .venv/bin/mypy ]; then
    .venv/bin/pip install -q -e ".[test,bench,integrations]"
fi
