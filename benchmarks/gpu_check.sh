#!/usr/bin/env bash
# The prepared GPU check: one table of HVP cost ratios (MLP, LeNet1, ResNet18), ResNet18 monitor overhead at
# every 10 / 50 steps, h0 time against PyHessian (if installed) and CPU/GPU agreement of h0 to 1e-3.
# Installs nothing; uses $PYTHON (default: python). Finishes well inside 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA device
#   bash benchmarks/gpu_check.sh --tiny     # tiny sizes on a CPU, in seconds (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 470 "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
