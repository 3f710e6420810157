#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with the project installed
# (editable) and its development tools. Idempotent: a second run only checks.
#
# On these CPU machines torch==2.13.0 (CPU build) is installed first; on a GPU machine install the
# CUDA build of torch you want into .venv before running this, and it is kept (pyproject accepts a
# range). Set STABLELM_LSP_VENV to use another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${STABLELM_LSP_VENV:-.venv}
py=${PYTHON:-python3}
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
if ! "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
    "$venv/bin/python" -c "import torch" || { echo "setup: torch did not install" >&2; exit 1; }
fi
# setuptools' build warnings are noise here: keep pip's output in a log, show it on failure.
log=$(mktemp)
if ! pip install -q --disable-pip-version-check -e ".[dev]" >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup: installing the project failed" >&2
    exit 1
fi
rm -f "$log"
"$venv/bin/python" -c "import stablelm_lsp.models, stablelm_lsp.inference, stablelm_lsp.lsp, pygls, transformers" \
    || { echo "setup: the project did not install" >&2; exit 1; }
