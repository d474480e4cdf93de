#!/usr/bin/env bash
# The prepared GPU check, for one CUDA GPU, in under 5 minutes: the `cuda` tests (compiled Triton merge vs
# torch, composed forward CUDA vs CPU in fp32 and bf16, short SVI fits on CUDA with a resume on the CPU, NCCL
# DDP when two GPUs exist), then benchmarks/gpu_check.py at ViT-B-32, T = 8 (merge, composed forward N = 128,
# SVI images/s for VTVC and aTLAS), each figure with the ratio it is judged by.
#
#   benchmarks/gpu_check.sh                  # from the repository root, after `make setup`
#   PY=python benchmarks/gpu_check.sh --model ViT-B-16 --batch 64      # extra arguments go to gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_INTERPRET=0  # the compiled kernel (tests/conftest.py would otherwise default to the interpreter)
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA GPU visible')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== cuda tests"
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py
echo "== benchmarks/gpu_check.py"
"$PY" benchmarks/gpu_check.py --device cuda "$@"
