#!/usr/bin/env bash
# The project's test command (README): set-up, the Python suite, then the editors' suites.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
venv=${STABLELM_LSP_VENV:-.venv}
if [ "${STABLELM_TEST_REMOTE:-0}" = 1 ]; then
    bash scripts/install_llama_cpp.sh "$venv" || exit 1
fi
# The tests' models are tiny and the test process and the servers it starts run side by side:
# one intra-op thread each avoids thread hand-offs that cost more than the arithmetic.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
rc=$?
# pytest exits 5 when it collected no test: that is a failure here, not a pass.
[ $rc -eq 5 ] && { echo "test: pytest collected no tests" >&2; exit 1; }
[ $rc -ne 0 ] && exit $rc
if [ -x editors/test.sh ]; then
    bash editors/test.sh || exit 1
fi
exit 0
