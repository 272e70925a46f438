#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU tests, then a timed TSC on PreAct-ResNet18 at full width
# on CIFAR-10-shaped data (docs/scaling.md). Run from the project folder, in its environment.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'error: PyTorch sees no CUDA device (install a CUDA build: make setup TORCH_SPEC=torch)')"
"$PYTHON" -m pytest -m cuda
"$PYTHON" scripts/gpu_timing.py --device cuda "$@"
"$PYTHON" scripts/gpu_timing.py --device cuda --bf16 "$@"   # the same in bfloat16 autocast
