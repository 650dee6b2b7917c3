#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: install cnnc with its CUDA and test extras, then
# run what only a GPU can check (the CUDA backend has no other way to be executed) and write a
# summary (each check: pass, fail or skip, its time, the device) to one file.
#
#   scripts/gpu-check.sh                      install into .venv from the package index, check
#   scripts/gpu-check.sh --wheelhouse DIR     install from local wheels only (pip --no-index)
#   scripts/gpu-check.sh --no-install         check with the python3 on PATH as it is
#   scripts/gpu-check.sh --out FILE           the summary file [default: gpu-check-summary.txt]
#   scripts/gpu-check.sh --venv DIR           where to install [default: .venv in the checkout]
#
# Exit status: 0 every check passed or was skipped, 1 a check failed, 2 no usable GPU or bad usage.
set -euo pipefail

usage() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"
}

die() {                     # bad usage: one line, status 2
    echo "gpu-check: $1" >&2
    exit 2
}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=gpu-check-summary.txt
VENV=$ROOT/.venv
WHEELHOUSE=
INSTALL=1
while [ $# -gt 0 ]; do
    case $1 in
        --wheelhouse|--out|--venv)
            [ $# -ge 2 ] || die "$1 needs a value"
            case $1 in
                --wheelhouse) WHEELHOUSE=$2 ;;
                --out) OUT=$2 ;;
                --venv) VENV=$2 ;;
            esac
            shift 2 ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
if [ -n "$WHEELHOUSE" ]; then
    [ "$INSTALL" = 1 ] || die "--wheelhouse says where to install from: leave out --no-install"
    [ -d "$WHEELHOUSE" ] || die "--wheelhouse $WHEELHOUSE: no such directory"
    WHEELHOUSE=$(cd "$WHEELHOUSE" && pwd)
fi
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
case $VENV in /*) ;; *) VENV=$PWD/$VENV ;; esac
{ : > "$OUT"; } 2> /dev/null || die "cannot write the summary file $OUT"

no_gpu() {
    echo "gpu-check: no usable NVIDIA GPU: $1" >&2
    echo "no usable NVIDIA GPU: $1" > "$OUT"
    exit 2
}

# the cheap test first, so that a machine without a GPU is told so before a long installation
command -v nvidia-smi > /dev/null || no_gpu "nvidia-smi is not on PATH (no NVIDIA driver)"
nvidia-smi -L > /dev/null 2>&1 || no_gpu "nvidia-smi fails: $(nvidia-smi 2>&1 | head -n 1)"

cd "$ROOT"
if [ "$INSTALL" = 1 ]; then
    python3 -m venv "$VENV"
    PY=$VENV/bin/python
    if [ -n "$WHEELHOUSE" ]; then
        "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" "$ROOT[cuda,test]"
    else
        "$PY" -m pip install "$ROOT[cuda,test]"
    fi
else
    PY=$(command -v python3) || die "--no-install: no python3 on PATH"
fi
"$PY" -c 'import cnnc' 2> /dev/null \
    || die "$PY cannot import cnnc; install it with pip install '.[cuda,test]', or leave out --no-install"
"$PY" -c 'import sys; from cnnc.backends.cuda import cuda_usable; sys.exit(not cuda_usable())' \
    || no_gpu "PyCUDA cannot use a GPU (is pycuda installed, and built for this driver's CUDA?)"

cnnc() {                    # the checkout's cnnc, as the tests import it
    "$PY" -c 'import sys; from cnnc.cli import main; sys.argv[0] = "cnnc"; main()' "$@"
}

GPUS=$("$PY" -c 'import pycuda.driver as d; d.init(); print(d.Device.count())')
DEVICE=$("$PY" -c 'import pycuda.driver as d; d.init(); g = d.Device(0)
print(f"{g.name()} (compute capability {g.compute_capability()[0]}.{g.compute_capability()[1]})")')
DRIVER=$(nvidia-smi -i 0 --query-gpu=driver_version --format=csv,noheader 2> /dev/null) || DRIVER=unknown
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cnnc-gpu-check.XXXXXX")
{
    echo "cnnc GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2> /dev/null || echo unknown)"
    echo "device: $DEVICE, $GPUS GPU(s), driver $DRIVER"
} | tee "$OUT"

PASSED=0 FAILED=0 SKIPPED=0
START=$SECONDS
DETAIL=

record() {                  # record STATUS NAME SECONDS DETAIL: one summary line
    printf '%-4s  %-34s %5s  %s\n' "$1" "$2" "$3" "$4" | tee -a "$OUT"
}

check() {                   # check NAME LOG COMMAND...: run, time and record; a failure does not stop the rest
    local name=$1 log=$WORK/$2.log t0=$SECONDS
    shift 2
    DETAIL=
    if "$@" > "$log" 2>&1; then
        record PASS "$name" "$((SECONDS - t0))s" "$DETAIL"
        PASSED=$((PASSED + 1))
    else
        record FAIL "$name" "$((SECONDS - t0))s" "${DETAIL:-see $log}"
        tail -n 20 "$log" | sed 's/^/    /'
        FAILED=$((FAILED + 1))
    fi
}

skip() {                    # skip NAME WHY
    record SKIP "$1" "" "$2"
    SKIPPED=$((SKIPPED + 1))
}

pytest_gpu() {              # pytest_gpu ARGS...: GPU tests, their tally as the detail
    local out status=0
    out=$("$PY" -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1) || status=$?
    echo "$out"
    DETAIL=$(tail -n 1 <<< "$out" | tr -d '=')
    return $status
}

# the demo as shipped, trained on the GPU: at most 5% test error, as on OpenCL (tests/test_training.py)
digits() {
    cnnc compile examples/digits.cnn -o "$WORK/digits" || return
    local out
    out=$(cnnc run "$WORK/digits" --backend cuda --gpus 0 -q --save-dir "$WORK/digits-train" 2>&1) \
        || { echo "$out"; return 1; }
    echo "$out"
    DETAIL=$(grep -o 'test error *[0-9.]*%' <<< "$out" | tail -n 1 | tr -s ' ')
    [ -n "$DETAIL" ] && "$PY" -c 'import sys; sys.exit(not float(sys.argv[1].split()[-1][:-1]) <= 5)' "$DETAIL"
}

alexnet_bench() {           # cnnc bench against PyTorch on the same GPU (cuDNN), where PyTorch has CUDA
    local against=(--against torch) compared="cnnc/torch ms per step"
    if ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2> /dev/null; then
        against=()
        compared="cnnc ms per step (PyTorch has no CUDA: not compared)"
        echo "PyTorch is missing or has no CUDA: timing cnnc alone"
    fi
    cnnc compile examples/alexnet.cnn -o "$WORK/alexnet" || return
    local out
    out=$(cnnc bench "$WORK/alexnet" --backend cuda --gpus 0 --steps 3 ${against[@]+"${against[@]}"} 2>&1) \
        || { echo "$out"; return 1; }
    echo "$out"
    DETAIL="$compared: $(grep -o '[0-9.]* ms per step' <<< "$out" | sed 's/ ms per step//' | paste -sd/)"
}

check "pytest -m gpu" pytest pytest_gpu tests \
    -k "not logical_devices_on_one_gpu and not two_gpus"
check "digits demo on cuda" digits digits
check "--gpus 0,0 equals one device" one-gpu pytest_gpu tests/test_cuda_backend.py \
    -k logical_devices_on_one_gpu
if [ "$GPUS" -ge 2 ]; then
    check "two GPUs bitwise equal to one" two-gpus pytest_gpu tests/test_cuda_backend.py -k two_gpus
else
    skip "two GPUs bitwise equal to one" "needs two GPUs, this machine has $GPUS"
fi
check "bench alexnet --against torch" alexnet alexnet_bench

RESULT=PASS
[ "$FAILED" = 0 ] || RESULT=FAIL
echo "result: $RESULT ($PASSED passed, $FAILED failed, $SKIPPED skipped) in $((SECONDS - START))s; logs in $WORK" \
    | tee -a "$OUT"
[ "$FAILED" = 0 ]
