#!/usr/bin/env bash
# The bfloat16 path's GPU window in one script, for one device command of under 10 minutes on an
# H200 (estimated: not run on a GPU yet). Three parts, each logged to $LOG/<part>.log as it runs
# ($LOG: the device tool's $OUT where it is set, else runs/device) and cut at its own time limit
# (seconds: T_GPU, T_HALT, T_EVALS; 240, 210, 100), so that one slow part leaves the others their time; a part
# that fails does not stop the next, and the exit code says whether any failed:
#   gpu          bash bench/gpu.sh: the 1.7B shape's peaks, s/step, tokens/s and MFU at micro-batch 1
#                and 16, with and without --checkpoint-activations, moments on the device and host
#   halt_resume  bench/halt_resume.py: a rigsa.py train of the 1.7B shape's first 12 layers (its
#                widths, half its depth: half the disk and time) halted after 4 steps and resumed
#                trains the uninterrupted run's adapters, bit for bit, in bfloat16 on the device
#   evals        bench/bench_evals.py --ours-only on the device: PIQA, HellaSwag, GSM8k in bfloat16 at
#                its default limits, 135M shape (the CUDA path, not the paper's full evaluation)
#                (DATA, default data/, must hold piqa/ and gsm8k/: carry it to the device machine)
# On a CPU first, at a small shape (a minute):  SMALL=1 DATA=path/to/data bash bench/device.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
LOG=${LOG:-${OUT:-runs/device}}
export PYTHONUNBUFFERED=1 PY
if [ "${SMALL:-0}" = 1 ]; then
    G=(--device cpu --preset SmolLM2-135M-Instruct --layers 2 --tokens 64 --steps 2)
    H=(--device cpu --preset SmolLM2-135M-Instruct --layers 2 --steps 2 --halt-after 3 --batch-size 2)
    E=(--device cpu --limit-piqa 4 --limit-hellaswag 4 --limit-gsm8k 2 --limit-gsm8k-lm-eval 0 --repeats 1)
else
    G=(--device cuda)
    H=(--device cuda --layers 12)
    E=(--device cuda)
fi
DATA=${DATA:-data}
failed=""
part() {   # part NAME SECONDS COMMAND...: 124 in its exit line is its time limit
    local name=$1 limit=$2 t=$SECONDS rc
    shift 2
    echo "== $name: $* (at most $limit s, $(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$LOG/$name.log"
    rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc, $((SECONDS - t)) s"
    [ "$rc" = 0 ] || failed="$failed $name"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# every runtime package at once, before any part: a missing one is one line, not three failed parts
"$PY" -c "import torch, numpy, safetensors, tokenizers, tqdm, huggingface_hub
print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" || {
    echo "error: $PY lacks a runtime package (requirements.txt); carry its wheels"
    exit 1
}
# what the window is for, checked before any part: a GPU that torch sees, the evaluation's data files
if [ "${SMALL:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "error: $PY's torch sees no CUDA device (a CPU-only wheel, or no driver); SMALL=1 runs the CPU check instead"
    exit 1
fi
for t in piqa gsm8k; do
    [ -d "$DATA/$t" ] || { echo "error: $DATA/$t: not there; the evals part needs PIQA's and GSM8k's files (DATA=folder)"; exit 1; }
done
mkdir -p "$LOG" || exit 1   # after the checks: a refusal leaves no empty log folder behind
part gpu "${T_GPU:-240}" bash bench/gpu.sh "${G[@]}"
part halt_resume "${T_HALT:-210}" "$PY" bench/halt_resume.py "${H[@]}"
part evals "${T_EVALS:-100}" "$PY" bench/bench_evals.py --ours-only --data-dir "$DATA" "${E[@]}"
if [ -n "$failed" ]; then
    echo "failed:$failed (their logs: $LOG)"
    exit 1
fi
echo "all parts passed (logs: $LOG)"
