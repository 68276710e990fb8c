#!/usr/bin/env bash
# Run the whole test suite. pytest's "no tests collected" (exit 5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONSAFEPATH=1
.venv/bin/pytest "$@"
rc=$?
if [ "$rc" = 5 ]; then
    echo "test: no tests were collected; failing" >&2
    exit 1
fi
exit "$rc"
