#!/bin/bash
# One device call that checks before it times: every GPU test (kernels against the torch reference,
# backends, graphs and their staging, engine; the fa3 backend's when the vLLM carry folder peer/.vw1 is present), the engine on
# CUDA against CPU float32 and transformers, and the attention microbenchmark beside FlashAttention-3.
#   run(carry=["peer/.vw1", "peer/device_setup.sh"], command="bash bench/device_check.sh")
# Output under $OUT: pytest.txt (every test's line, so a timeout still shows what ran), gpu_check.json,
# attention.json, log.txt. STAGES picks the parts: the GPU tests alone take about six minutes on a fresh
# machine (Triton compiles each kernel variant once; 2026-12-05: 37 tests in 300 s), so one call runs
# them (the default, STAGES=tests) and the next the rest:
#   run(carry=["peer/.vw1", "peer/device_setup.sh"], command="STAGES='gpu_check attention' bash bench/device_check.sh")
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  SITE=""; if [ -d peer/.vw1 ] && bash peer/device_setup.sh >/dev/null; then SITE=:/tmp/site; fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  # every file with gpu tests, by name: the device has no duckdb, so collecting all of tests/ fails
  GPU_FILES=$(grep -l "mark.gpu" tests/*.py)
  STAGES=${STAGES:-tests}
  if [[ " $STAGES " == *" tests "* ]]; then
    PYTHONPATH=$PYTHONPATH$SITE timeout ${TEST_TIMEOUT:-480} python3 -m pytest -v -p no:cacheprovider -rfE \
      --durations=15 -m gpu $GPU_FILES > "$OUT/pytest.txt" 2>&1
    echo "pytest rc=$?"
    # the elementwise and gate/up kernels run on the GPU where there is one (not marked: they run under the
    # interpreter too)
    timeout 90 python3 -m pytest -v -p no:cacheprovider -rfE tests/test_elementwise_kernels.py tests/test_gate_up.py \
      >> "$OUT/pytest.txt" 2>&1
    echo "elementwise rc=$?; $(grep -c PASSED "$OUT/pytest.txt") passed"
    grep -E "FAILED|ERROR" "$OUT/pytest.txt" | head -20; tail -25 "$OUT/pytest.txt"
  fi
  if [[ " $STAGES " == *" gpu_check "* ]]; then
    timeout ${CHECK_TIMEOUT:-200} python3 -m bench.gpu_check --attention torch,triton > "$OUT/gpu_check.json"
    echo "gpu_check rc=$?"; cat "$OUT/gpu_check.json"
  fi
  if [[ " $STAGES " == *" attention "* ]]; then
    PYTHONPATH=$PYTHONPATH$SITE timeout ${ATTN_TIMEOUT:-150} python3 -m bench.attention --json "$OUT/attention.json"
    echo "attention rc=$?"
  fi
} 2>&1 | tee -a "$OUT/log.txt"
