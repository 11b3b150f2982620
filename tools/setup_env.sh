#!/usr/bin/env bash
# Create .venv (once) and install the pinned requirements into it; reinstall when
# requirements.txt changes. Sourced by demo.sh and test.sh; safe to run on its own.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
    echo "setting up $venv ..."
    python3 -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # torch is pinned in the same command so pip never pulls another build of it.
    "$venv/bin/python" -m pip install --quiet -r "$root/requirements.txt"
    echo "$want" > "$stamp"
fi
export PATH="$venv/bin:$PATH"
