#!/usr/bin/env bash
# The project's test command (README): set-up, the Python suite, then the editors' suites.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
venv=${STABLELM_LSP_VENV:-.venv}
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
[ $rc -eq 5 ] && { echo "test: pytest collected no tests" >&2; exit 1; }
[ $rc -ne 0 ] && exit $rc
if [ -x editors/test.sh ]; then
    bash editors/test.sh || exit 1
fi
exit 0
