#!/usr/bin/env bash
# The one GPU check a session with a lent GPU runs, in a single device call (under 8 minutes):
#   1. build the extension with its CUDA kernels on the GPU machine (its own torch; no network)
#   2. the test suite on the GPU (every device-parametrized test runs on CUDA there)
#   3. compute-sanitizer memcheck and racecheck on a small case of each op
#   4. the GPU kernel benchmark (bench/ops_gpu.py)
# Seven files go to $OUT (few, so that all of them can be copied back): the report gpu_check.md, build.log,
# tests.log, sanitizer.log, bench.log and the benchmark's ops_gpu.md + ops_gpu.json; commit the
# report under bench/results/. A short table is printed last.
# Without a GPU it stops at step 0 with exit code 2 and says why.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
report="$OUT/gpu_check.md"
status=0
work=$(mktemp -d)  # scratch kept out of $OUT, which holds only the seven result files
step() { echo "== $1"; }
record() {  # name, exit code, log file
  local result="ok"
  [ "$2" -eq 0 ] || { result="FAILED (exit $2; see $(basename "$3"))"; status=1; }
  echo "| $1 | $result |" >> "$report"
}

{
  echo "# GPU check"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || echo 'no nvidia-smi'); $($PY -c 'import torch; print("torch", torch.__version__)' 2>&1)"
  echo
  echo "| step | result |"
  echo "|---|---|"
} > "$report"

step "0. device"
if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: no CUDA device is visible to $PY (torch.cuda.is_available() is False); nothing to check" | tee -a "$report"
  exit 2
fi

step "1. build"
arch=$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')
FISHER_EXT_FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS=16 \
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
record "build (sm_${arch/./})" $? "$OUT/build.log"
$PY -c 'import fisher_ext, json; print(json.dumps(fisher_ext.build_info()))' >> "$OUT/build.log" 2>&1

step "2. tests"
timeout 240 $PY -m pytest -q -x -p no:cacheprovider python_tests > "$OUT/tests.log" 2>&1
record "pytest (CPU and CUDA)" $? "$OUT/tests.log"
tail -3 "$OUT/tests.log"

step "3. compute-sanitizer"
cat > "$work/sanitize_case.py" <<'PY'
import torch, fisher_ext
torch.manual_seed(0)
# every program (materialize, ghost, row norm) and engine (FFMA, tensor cores), tiles cut at the edges
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    for method in ("materialize", "ghost"):
        a = torch.randn(3, 70, 37, device="cuda", dtype=dtype); g = torch.randn(3, 70, 19, device="cuda", dtype=dtype)
        fisher_ext.linear_sqnorm(a, g, bias=True, method=method)
        fisher_ext.linear_sqnorm(a[:, :1], g[:, :1], bias=True, method=method)
        x = torch.randn(2, 6, 9, 7, device="cuda", dtype=dtype); gy = torch.randn(2, 70, 5, 4, device="cuda", dtype=dtype)
        acc = torch.zeros(2, device="cuda", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        fisher_ext.conv_sqnorm(x, gy, kernel_size=3, stride=2, padding=1, groups=2, bias=True, accumulate=acc,
                               method=method)
torch.cuda.synchronize()
print("sanitize case done")
PY
for tool in memcheck racecheck; do
  echo "== compute-sanitizer --tool $tool" >> "$OUT/sanitizer.log"
  timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 $PY "$work/sanitize_case.py" >> "$OUT/sanitizer.log" 2>&1
  record "compute-sanitizer $tool" $? "$OUT/sanitizer.log"
done

step "4. benchmark"
timeout 240 $PY bench/ops_gpu.py --out "$OUT" > "$OUT/bench.log" 2>&1
record "bench/ops_gpu.py" $? "$OUT/bench.log"

echo >> "$report"
[ -f "$OUT/ops_gpu.md" ] && tail -n +3 "$OUT/ops_gpu.md" >> "$report"
cat "$report"
exit $status
