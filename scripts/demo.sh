#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and fine-tune genslm_tiny on the bundled H3N2 HA/NA
# FASTA (CPU when there is no GPU; about two minutes). Extra arguments go to `dstrain train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dstrain train "$@"
