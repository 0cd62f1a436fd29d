#!/usr/bin/env bash
# The whole test suite, set-up included: bash tests/run.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# lint first: ruff (rules in pyproject.toml) and mypy (with torch's types) over the package
.venv/bin/ruff check dckpt
.venv/bin/mypy
set +e
# worksteal: an idle worker takes tests queued for the busy one (with the default "load",
# one worker ran the last 12 minutes alone behind the slow kill-and-resume tests)
.venv/bin/python -m pytest -n 2 --dist worksteal -q -p no:cacheprovider --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no test: failing" >&2
    exit 1
fi
exit "$rc"
