#!/usr/bin/env bash
# Create .venv and install dstrain into it (with the test extra: pytest, ruff).
#
# torch: a CPU-only machine must not pull a multi-GB CUDA build. pyproject.toml bounds
# torch below 2.14; here torch==2.13.0 is installed first (on this project's machines
# pip takes a local CPU wheel; elsewhere set TORCH_INDEX_URL, e.g. PyTorch's cpu or
# cu126 wheel index). GPU users: install your CUDA build of torch into .venv first (any
# torch 2.13.x, the tested series), or set TORCH_SPEC; an installed torch is kept. The other
# dependencies are pinned to the tested versions by scripts/constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  echo "setup: installing $TORCH_SPEC" >&2
  .venv/bin/pip install -q "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
echo "setup: installing dstrain and its dependencies into .venv" >&2
.venv/bin/pip install -q -e ".[test]" -c scripts/constraints.txt
.venv/bin/python -c "import torch, deepspeed, transformers; print('setup: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__)" 2>/dev/null | grep '^setup:' >&2
