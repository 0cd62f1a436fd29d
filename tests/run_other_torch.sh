#!/usr/bin/env bash
# The test suite on another torch release than CI's 2.13 (the GPU machine runs 2.11):
#
#   bash tests/run_other_torch.sh 2.11.0 [pytest args]
#
# A virtual environment of its own, .venv-torch-VERSION (ignored by git): that torch first,
# then dckpt with its test, benchmark and integration extras held to it. PyPI's builds of
# the older releases are the CUDA ones: the first run downloads about 4 GB.
set -euo pipefail
cd "$(dirname "$0")/.."
V=${1:?usage: bash tests/run_other_torch.sh TORCH_VERSION [pytest args]}
shift
VENV=.venv-torch-$V
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != sys.argv[1])" "$V" 2>/dev/null; then
    "$VENV/bin/pip" install -q "torch==$V"
fi
echo "torch==$V" > "$VENV/constraints.txt"  # the extras may not move torch
"$VENV/bin/pip" install -q -c "$VENV/constraints.txt" -e ".[test,bench,integrations]"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__)"
exec "$VENV/bin/python" -m pytest -n 2 --dist worksteal -q -p no:cacheprovider "$@"
