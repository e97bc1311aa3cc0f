#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh), run the whole test suite, then the mutation check
# (scripts/mutants.py: deliberate faults the tests must catch, ~3 min on 2 cores). Extra
# arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` for the fast subset;
# with extra arguments, or with DSTRAIN_SKIP_MUTANTS=1, the mutation check is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/ruff check dstrain tests scripts
.venv/bin/dstrain validate ds_configs/*.json
.venv/bin/python -m pytest -q --durations=20 "$@"
if [[ $# -eq 0 && -z "${DSTRAIN_SKIP_MUTANTS:-}" ]]; then
    .venv/bin/python scripts/mutants.py --jobs 2
fi
