#!/usr/bin/env bash
# The GPU checks in one go, on a machine with an NVIDIA GPU:
#   1. the machine: nvidia-smi, python, torch and its CUDA;
#   2. the CUDA tests (tests/ops/test_cuda.py; they skip without a GPU);
#   3. every benchmark with --device cuda: bench_dkm.py, bench_train_step.py at the
#      ImageNet size (--size 224 --batch 64) and bench_llm.py (all configurations).
# Each part runs whatever happened to the ones before; a summary of which parts
# passed comes last, and the exit status is 1 if any failed.
#
# Usage, from anywhere in the repository: bash benchmarks/gpu_check.sh
# Environment (all optional):
#   PYTHON                 the interpreter when there is no .venv (default: python, else python3)
#   PYTHONPATH=src         on a machine without network whose Python holds the dependencies:
#                          the package is imported from the checkout and nothing is installed
#   GPU_CHECK_LOG_DIR      where each part's output is kept (default: $OUT if set, else a temporary folder)
#   GPU_CHECK_PART_TIMEOUT seconds one part may run before it is stopped and marked failed (default: none)
#   BENCH_DKM_ARGS, BENCH_TRAIN_STEP_ARGS, BENCH_LLM_ARGS
#                          extra arguments for that benchmark, e.g. BENCH_LLM_ARGS="--configs 134m"

set -u -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2

LOG_DIR=${GPU_CHECK_LOG_DIR:-${OUT:-$(mktemp -d)}}
mkdir -p "$LOG_DIR" || exit 2
PART_TIMEOUT=${GPU_CHECK_PART_TIMEOUT:-0}
read -r -a DKM_ARGS <<< "${BENCH_DKM_ARGS:-}"
read -r -a TRAIN_STEP_ARGS <<< "${BENCH_TRAIN_STEP_ARGS:-}"
read -r -a LLM_ARGS <<< "${BENCH_LLM_ARGS:-}"

NAMES=()
OUTCOMES=()

# part NAME COMMAND...: runs the command, its output shown and kept in $LOG_DIR/NAME.log
part() {
    local name=$1 began rc
    shift
    echo
    echo "=== $name: $* ==="
    began=$SECONDS
    if [[ $PART_TIMEOUT -gt 0 ]] && ! declare -F "$1" > /dev/null; then
        timeout --signal=INT --kill-after=30 "$PART_TIMEOUT" "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    else
        "$@" 2>&1 | tee "$LOG_DIR/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    NAMES+=("$name")
    if [[ $rc -eq 0 ]]; then
        OUTCOMES+=("passed ($((SECONDS - began)) s)")
    elif [[ $rc -eq 124 ]]; then
        OUTCOMES+=("FAILED: stopped after ${PART_TIMEOUT} s")
    else
        OUTCOMES+=("FAILED: exit status $rc ($((SECONDS - began)) s)")
    fi
    return 0
}

# -- the environment: the repository's virtual environment if there is one, else install
if [[ -f .venv/bin/activate ]]; then
    # shellcheck disable=SC1091
    source .venv/bin/activate
    PY=python
elif [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
elif command -v python > /dev/null; then
    PY=python
else
    PY=python3
fi
if ! "$PY" -c "import dkm_param" > /dev/null 2>&1; then
    part install "$PY" -m pip install -e ".[dev]"
fi

# shellcheck disable=SC2317  # called through part
machine() {
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi
    else
        echo "nvidia-smi: not found"
    fi
    "$PY" - << 'EOF'
import platform
import sys

import torch

print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}")
if not torch.cuda.is_available():
    sys.exit("torch sees no GPU: the CUDA tests will skip and the benchmarks will fail")
for index in range(torch.cuda.device_count()):
    props = torch.cuda.get_device_properties(index)
    print(f"cuda:{index}: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
          f"{props.major}.{props.minor}")
EOF
}

part machine machine
part cuda-tests "$PY" -m pytest -q -rs tests/ops/test_cuda.py
# pytest's closing line beside the outcome: "passed" with every test skipped means no GPU was used
OUTCOMES[-1]+=" - $(tail -n 1 "$LOG_DIR/cuda-tests.log")"
part bench_dkm "$PY" benchmarks/bench_dkm.py --device cuda "${DKM_ARGS[@]}"
part bench_train_step "$PY" benchmarks/bench_train_step.py --device cuda --size 224 --batch 64 "${TRAIN_STEP_ARGS[@]}"
part bench_llm "$PY" benchmarks/bench_llm.py --device cuda "${LLM_ARGS[@]}"

echo
echo "=== summary (logs in $LOG_DIR) ==="
failed=0
for i in "${!NAMES[@]}"; do
    printf '%-18s %s\n' "${NAMES[$i]}" "${OUTCOMES[$i]}"
    [[ ${OUTCOMES[$i]} == passed* ]] || failed=1
done
exit "$failed"
