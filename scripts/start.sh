#!/usr/bin/env bash
# Start trio-chat in the foreground on 0.0.0.0:PORT, installing it on first run.
#
#   scripts/start.sh PORT [trio-chat serve options...]
#
# Works from any directory. The first run creates .venv inside the project and installs the
# package into it (editable, so later changes to the code take effect); later runs reuse it
# and reinstall only when pyproject.toml or the version (in trio_chat/__init__.py) changed.
# The server replaces this script's process, so a signal sent to the script (Ctrl-C, kill)
# reaches the server directly.
set -euo pipefail

if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
    echo "usage: $0 PORT [trio-chat serve options...]" >&2
    exit 2
fi
port=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
stamp="$venv/.trio-chat-installed"
python=${PYTHON:-python3}

# What the installed metadata depends on: the project's settings and its version.
fingerprint() { cat "$root/pyproject.toml" "$root/trio_chat/__init__.py"; }

install() {
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "trio-chat needs Python 3.11 or newer as '$python' (set PYTHON=...)" >&2
        exit 1
    fi
    echo "trio-chat: installing into $venv (first run only)" >&2
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$root[redis]" >&2
    fingerprint >"$stamp"
}

# One installer at a time: two servers started at once on a fresh clone share one venv.
exec 9>"$root/.venv.lock"
flock 9
if [ ! -x "$venv/bin/trio-chat" ] || ! fingerprint | cmp -s - "$stamp"; then
    install
fi
exec 9>&-

exec "$venv/bin/trio-chat" serve --host 0.0.0.0 --port "$port" "$@"
