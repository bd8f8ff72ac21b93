#!/usr/bin/env bash
# Run the whole default test suite: tests, lint and type checks, each in its own nox session.
#
#   scripts/test.sh [nox options...]     e.g. scripts/test.sh -s tests -- -k protocol
#
# Needs only Python 3.11+ and access to the package index: nox itself is installed into a
# virtual environment of its own (.nox-runner) on first run.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runner="$root/.nox-runner"
python=${PYTHON:-python3}

if [ ! -x "$runner/bin/nox" ]; then
    "$python" -m venv "$runner"
    "$runner/bin/python" -m pip install --quiet --disable-pip-version-check -c "$root/constraints.txt" nox
fi

cd "$root"
exec "$runner/bin/nox" "$@"
