#!/usr/bin/env bash
# The editors' suites, run by scripts/test.sh after pytest (and by hand: bash editors/test.sh).
#   VS Code: npm ci, build (tsc + esbuild), unit tests against a fake `vscode` module, the .vsix
#            (vsce package), and the integration test that drives the real server.
#   Neovim:  the headless end-to-end test with the real server (.venv/bin/nvim, 0.12).
# Both integration tests use a tiny checkpoint built here with tests/checkpoints.py, unless
# STABLELM_TEST_MODEL names one. Every suite runs; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")"
editors=$(pwd)
repo=$(dirname "$editors")
venv=${STABLELM_LSP_VENV:-$repo/.venv}
case $venv in /*) ;; *) venv=$repo/$venv ;; esac
export npm_config_loglevel=error npm_config_fund=false npm_config_audit=false npm_config_update_notifier=false

failed=()
run() {
    local name=$1
    shift
    echo "== editors: $name"
    local start=$SECONDS
    if "$@"; then
        echo "== editors: $name passed ($((SECONDS - start)) s)"
    else
        echo "== editors: $name FAILED ($((SECONDS - start)) s)" >&2
        failed+=("$name")
    fi
}

if [ -z "${STABLELM_TEST_MODEL:-}" ]; then
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    export STABLELM_TEST_MODEL=$scratch/tiny-starcoder2
    run "tiny checkpoint" "$venv/bin/python" "$repo/tests/checkpoints.py" starcoder2 "$STABLELM_TEST_MODEL"
fi
export STABLELM_TEST_SERVER=${STABLELM_TEST_SERVER:-"$venv/bin/stablelm-lsp --stdio"}

vscode() {
    cd "$editors/vscode" && npm ci && npm run package && npm test && npm run test:integration
}
run "vscode" vscode

nvim=$venv/bin/nvim
run "nvim" "$nvim" --headless --clean -l "$editors/nvim/test/e2e.lua"

if [ ${#failed[@]} -gt 0 ]; then
    echo "editors: failed: ${failed[*]}" >&2
    exit 1
fi
echo "editors: all suites passed"
