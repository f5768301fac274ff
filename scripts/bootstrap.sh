#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the
# project with its pinned dependencies. Safe to run again: it reinstalls only
# when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(0 if (3, 10) <= sys.version_info[:2] <= (3, 12) else 1)'; then
  echo "error: fracray needs Python 3.10-3.12; $PYTHON is $("$PYTHON" --version 2>&1). Set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "Creating .venv with $("$PYTHON" --version) ..."
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.fracray-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing fracray and its pinned dependencies into .venv (a few minutes the first time) ..."
  # uv unpacks the ~7 GB of wheels (torch's CUDA libraries are most of it) on every core: 55-62 s
  # here against pip's 88-111 s. It reads none of pip's configuration, so it gets the indexes, links,
  # constraints and certificates pip is configured with (scripts/uv_install.py). Where uv cannot
  # be had or fails, pip installs the same pins.
  if .venv/bin/python -m pip install --quiet "uv==0.13.9" 2>/dev/null \
      && .venv/bin/python scripts/uv_install.py --quiet --compile-bytecode -e ".[test]"; then
    :
  else
    echo "uv could not install; installing with pip instead ..." >&2
    # The stock pip 23 backtracks for many minutes on this dependency set; a current pip resolves it at once.
    .venv/bin/python -m pip install --quiet --upgrade "pip>=25"
    .venv/bin/python -m pip install --quiet -e ".[test]"
  fi
  echo "$want" > "$stamp"
fi
