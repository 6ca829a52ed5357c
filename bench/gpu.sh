#!/usr/bin/env bash
# One GPU window: training memory of the real 1.7B shape, random weights, no download.
# Peaks (torch.cuda.max_memory_allocated) at micro-batch 1 and 16 (with and without --checkpoint-activations), densities 100% and 3.46%, moments
# on the GPU and in host memory, with seconds per step, tokens/s and MFU; sized for under 8 minutes on an H200 (not run on one yet).
# Try it on a CPU first, at a small shape:  bash bench/gpu.sh --device cpu --preset SmolLM2-135M-Instruct --layers 2 --tokens 64 --steps 2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec "$PY" bench/bench_memory.py --gpu "$@"
