#!/usr/bin/env bash
# The GPU check, in one call: the CUDA-marked tests, then bench/gpu_bench.py, then one summary table.
#
#   bash bench/gpu_check.sh [OUTDIR]          # OUTDIR default: $OUT, else /tmp/neureg-gpu-check
#
# On a GPU machine it runs the paper sizes in <= 8 minutes (GPU_CHECK_BUDGET seconds for the benchmark,
# default 390); without CUDA the same script runs tiny sizes (the test suite runs it that way). It needs
# torch, numpy, scipy, foolbox, pyautoattack and pytest, and no database.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-/tmp/neureg-gpu-check}}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT_DIR"
cd "$ROOT"

# The repository root is the neureg package: make it importable where it is not installed.
if ! "$PY" -c "import neureg.models" >/dev/null 2>&1; then
  link_dir="$(mktemp -d)"
  ln -s "$ROOT" "$link_dir/neureg"
  export PYTHONPATH="$link_dir${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

started=$(date +%s)
"$PY" - <<'PYEOF' | tee "$OUT_DIR/device.txt"
import torch
print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device: "
      + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU run, tiny sizes)"))
PYEOF

"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/models/test_cuda_paths.py 2>&1 | tee "$OUT_DIR/tests.log"
tests_rc=${PIPESTATUS[0]}
tests_line="$(grep -E '^[0-9]+ (passed|failed)|[0-9]+ passed|[0-9]+ failed' "$OUT_DIR/tests.log" | tail -1)"

"$PY" bench/gpu_bench.py --budget "${GPU_CHECK_BUDGET:-390}" --out "$OUT_DIR/gpu_bench.json" \
  ${GPU_CHECK_ARGS:-} 2>&1 | tee "$OUT_DIR/bench.log"
bench_rc=${PIPESTATUS[0]}

echo
echo "== gpu_check summary =="
cat "$OUT_DIR/device.txt"
echo "cuda-marked tests: ${tests_line:-no result} (exit $tests_rc)"
sed -n '/^neureg gpu_bench on/,$p' "$OUT_DIR/bench.log"
echo "benchmark exit $bench_rc; total $(( $(date +%s) - started )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
