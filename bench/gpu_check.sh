#!/usr/bin/env bash
# The one GPU check to run where a GPU is available, in a single call (under 8 minutes):
#   0. the tools: the GPU, pytest, nvcc and compute-sanitizer (found through the CUDA toolkit)
#   1. a fresh build of the extension with its CUDA kernels for this GPU (-lineinfo), and a check
#      that the CUDA ops are served by that build, not by the pure-PyTorch fallback
#   2. the CUDA tests (every device-parametrized test on "cuda", and python_tests/test_cuda.py)
#   3. compute-sanitizer memcheck, racecheck, initcheck and synccheck on a small case of each op,
#      with torch's caching allocator off (an out-of-bounds read inside a pooled block is
#      otherwise invisible)
#   4. a reduced GPU kernel benchmark against the installed peers (bench/ops_gpu.py --quick)
#   5. end to end: ResNet-18 (GroupNorm) training steps with the monitor and the penalty
#      (bench/penalty.py --device cuda --quick)
#   6. each CUDA program per layer (bench/programs_gpu.py, the fused op's too), and ncu's
#      speed-of-light, occupancy and warp-state sections of the materialize, ghost and fused
#      kernels on C2 and C5
# The whole script keeps to a time budget (GPU_CHECK_SECONDS, default 480): each step's timeout is
# its own cap or what is left, whichever is less, and a step with too little time left is reported
# as SKIPPED, which fails the check like a failure does.
# Seven files go to $OUT (a GPU machine returns eight at most): the report gpu_check.md, the
# benchmarks' ops_gpu.md + .json, penalty_gpu.md + .json and programs_gpu.md (commit them under
# bench/results/), and logs.tgz (build, tests, sanitizer, benchmarks, ncu).
#
#   bash bench/gpu_check.sh            on a GPU machine
#   bash bench/gpu_check.sh --dry-run  anywhere: every step's own commands run, the GPU parts on
#                                      the CPU (collect-only tests, the sanitizer case and the
#                                      benchmark harness on CPU tensors, no build), each reported
#                                      as such; the test suite runs it so that the script cannot rot
# Without a GPU (and without --dry-run) it stops at step 0 with exit code 2 and says why.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, from any folder
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT="${OUT:-bench/results/gpu_check}"
LOGS="$OUT/logs"
mkdir -p "$OUT" "$LOGS"
PY="${PYTHON:-python3}"
report="$OUT/gpu_check.md"
status=0
work=$(mktemp -d)  # scratch kept out of $OUT, which holds only the result files
trap 'rm -rf "$work"' EXIT
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-480}))
step() { echo "== $1 ($((deadline - SECONDS)) s left)"; }
budget() {  # cap in seconds -> the timeout for the next command, or 0 when under 20 s are left
  local left=$((deadline - SECONDS - 5))
  [ "$left" -lt 20 ] && { echo 0; return; }
  [ "$1" -lt "$left" ] && echo "$1" || echo "$left"
}
skipped() { echo "| $1 | SKIPPED: out of time (GPU_CHECK_SECONDS) |" >> "$report"; status=1; }
record() {  # name, exit code, log file
  local result="ok"
  [ "$2" -eq 0 ] || { result="FAILED (exit $2; see $(basename "$3"))"; status=1; }
  [ "$DRY" -eq 1 ] && result="$result (dry run: GPU parts on the CPU)"
  echo "| $1 | $result |" >> "$report"
}
stop() {
  echo "| $1 | STOPPED: $2 |" >> "$report"
  tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
  cat "$report"
  exit 1
}

{
  echo "# GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $($PY -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)' 2>&1)"
  [ "$DRY" -eq 1 ] && echo && echo "**Dry run**: no GPU was used; the GPU parts ran on the CPU."
  echo
  echo "| step | result |"
  echo "|---|---|"
} > "$report"

step "0. tools"
$PY -c 'import pytest' 2>/dev/null || stop "tools" "pytest is not installed for $PY"
if [ "$DRY" -eq 0 ] && ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device is visible to $PY (torch.cuda.is_available() is False); nothing to check" | tee -a "$report"
  exit 2
fi
cuda_home=$($PY -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null)
sanitizer=$(command -v compute-sanitizer || true)
for candidate in "$cuda_home/bin/compute-sanitizer" "$cuda_home/compute-sanitizer/compute-sanitizer" \
                 /usr/local/cuda/bin/compute-sanitizer; do
  [ -z "$sanitizer" ] && [ -x "$candidate" ] && sanitizer="$candidate"
done
{ echo "nvcc: $("${cuda_home:-/usr/local/cuda}/bin/nvcc" --version 2>&1 | tail -2 | tr '\n' ' ')"
  echo "compute-sanitizer: ${sanitizer:-not found}"; } | tee "$LOGS/build.log"

step "1. build"
if [ "$DRY" -eq 1 ]; then
  echo "dry run: no build; the installed extension serves the steps below" >> "$LOGS/build.log"
  record "build" 0 "$LOGS/build.log"
else
  arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
  rm -f fisher_ext/_C*.so  # a stale build must not be what gets tested
  FISHER_EXT_FORCE_CUDA=1 FISHER_EXT_LINEINFO=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
    timeout "$(budget 300)" $PY setup.py build_ext --inplace >> "$LOGS/build.log" 2>&1
  code=$?
  record "build (sm_${arch/./})" $code "$LOGS/build.log"
  [ $code -eq 0 ] || stop "build" "the build failed; nothing else can be checked"
  $PY - >> "$LOGS/build.log" 2>&1 <<'PY' || stop "extension" "the CUDA ops are not served by the fresh build (build.log)"
import json, sys, fisher_ext
info = fisher_ext.build_info()
print(json.dumps(info))
cuda = info["backends"]["CUDA"]
sys.exit(0 if info["extension"] and all(v.startswith("compiled") for v in cuda.values()) else 1)
PY
fi

step "2. tests"
t=$(budget 200)
if [ "$t" -eq 0 ]; then
  skipped "pytest -k cuda"
else
  collect=(); [ "$DRY" -eq 1 ] && collect=(--collect-only)
  timeout "$t" $PY -m pytest -q -p no:cacheprovider "${collect[@]}" -k cuda python_tests > "$LOGS/tests.log" 2>&1
  record "pytest -k cuda" $? "$LOGS/tests.log"
  tail -3 "$LOGS/tests.log"
fi

step "3. compute-sanitizer"
cat > "$work/sanitize_case.py" <<'PY'
import sys, torch, fisher_ext
device = sys.argv[1]
torch.manual_seed(0)
# every program (materialize, ghost, row norm) and engine (FFMA, tensor cores), tiles cut at the edges,
# and the fused weight-gradient ops
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for method in ("materialize", "ghost"):
        a = torch.randn(3, 70, 37, device=device, dtype=dtype); g = torch.randn(3, 70, 19, device=device, dtype=dtype)
        fisher_ext.linear_sqnorm(a, g, bias=True, method=method)
        fisher_ext.linear_sqnorm(a[:, :1], g[:, :1], bias=True, method=method)
        fisher_ext.linear_grad_sqnorm(a, g, bias=True, method=method)
        x = torch.randn(2, 6, 9, 7, device=device, dtype=dtype); gy = torch.randn(2, 70, 5, 4, device=device, dtype=dtype)
        acc = torch.zeros(2, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        fisher_ext.conv_sqnorm(x, gy, kernel_size=3, stride=2, padding=1, groups=2, bias=True, accumulate=acc,
                               method=method)
        fisher_ext.conv_grad_sqnorm(x, gy, kernel_size=3, stride=2, padding=1, groups=2, bias=True, method=method)
if device == "cuda":
    torch.cuda.synchronize()
print("sanitize case done on", device)
PY
sanitize() {  # tool
  local t
  t=$(budget 75)
  [ "$t" -eq 0 ] && { skipped "compute-sanitizer $1"; return; }
  echo "== compute-sanitizer --tool $1" >> "$LOGS/sanitizer.log"
  if [ "$DRY" -eq 1 ]; then
    timeout "$t" $PY "$work/sanitize_case.py" cpu >> "$LOGS/sanitizer.log" 2>&1
  elif [ -z "$sanitizer" ]; then
    echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)" >> "$LOGS/sanitizer.log"; false
  else
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "$t" "$sanitizer" --tool "$1" --error-exitcode 3 \
      $PY "$work/sanitize_case.py" cuda >> "$LOGS/sanitizer.log" 2>&1
  fi
  record "compute-sanitizer $1" $? "$LOGS/sanitizer.log"
}
# memcheck and racecheck first; initcheck and synccheck get what the benchmarks leave
sanitize memcheck
sanitize racecheck

timed() {  # name, cap in seconds, log, command...: the command within its budget, recorded
  local name=$1 cap=$2 log=$3 t
  shift 3
  t=$(budget "$cap")
  [ "$t" -eq 0 ] && { skipped "$name"; return; }
  timeout "$t" "$@" >> "$log" 2>&1
  record "$name" $? "$log"
}
mode=--quick; device=cuda
[ "$DRY" -eq 1 ] && mode=--smoke && device=cpu

step "4. benchmark"
timed "bench/ops_gpu.py" 120 "$LOGS/bench.log" $PY bench/ops_gpu.py $mode --out "$OUT"

step "5. end to end"
timed "bench/penalty.py" 90 "$LOGS/bench.log" $PY bench/penalty.py --device "$device" $mode --out "$OUT"

step "6. programs and ncu"
timed "bench/programs_gpu.py" 60 "$LOGS/programs.log" $PY bench/programs_gpu.py $mode --out "$OUT"
ncu=$(command -v ncu || ls "$cuda_home"/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
for layer in C2 C5; do
  t=$(budget 45)
  if [ "$t" -eq 0 ]; then
    skipped "ncu $layer"
  elif [ "$DRY" -eq 1 ]; then  # the profiled program, without the profiler
    timeout "$t" $PY bench/programs_gpu.py --smoke --profile "$layer" >> "$LOGS/ncu.log" 2>&1
    record "ncu $layer" $? "$LOGS/ncu.log"
  elif [ -z "$ncu" ]; then
    echo "ncu not found" >> "$LOGS/ncu.log"; record "ncu $layer" 1 "$LOGS/ncu.log"
  else  # the card's clocks as they are (no clock control)
    timeout "$t" "$ncu" --clock-control none -k 'regex:program_kernel|fused_kernel' -c 4 --section SpeedOfLight \
      --section Occupancy --section WarpStateStats --section LaunchStats \
      $PY bench/programs_gpu.py --profile "$layer" --dtypes float32 >> "$LOGS/ncu.log" 2>&1
    record "ncu $layer" $? "$LOGS/ncu.log"
  fi
done

step "3b. compute-sanitizer, the rest"
sanitize initcheck
sanitize synccheck

echo >> "$report"
for table in ops_gpu.md penalty_gpu.md programs_gpu.md; do
  [ -f "$OUT/$table" ] && { tail -n +3 "$OUT/$table"; echo; } >> "$report"
done
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOGS"
cat "$report"
exit $status
