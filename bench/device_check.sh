#!/bin/bash
# One device call that checks before it times: the GPU tests (kernels against the torch reference,
# backends, engine; the fa3 backend's when the vLLM carry folder peer/.vw1 is present), the engine on
# CUDA against CPU float32 and transformers, and the attention microbenchmark beside FlashAttention-3.
#   run(carry=["peer/.vw1"], command="bash bench/device_check.sh")
# Output under $OUT: pytest.txt, gpu_check.json, attention.json, log.txt.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  SITE=""; if [ -d peer/.vw1 ] && bash peer/device_setup.sh >/dev/null; then SITE=:/tmp/site; fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  PYTHONPATH=$PYTHONPATH$SITE timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_kernels.py \
    tests/test_attention_backends.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"
  timeout ${CHECK_TIMEOUT:-200} python3 -m bench.gpu_check --attention torch,triton > "$OUT/gpu_check.json"
  echo "gpu_check rc=$?"; cat "$OUT/gpu_check.json"
  PYTHONPATH=$PYTHONPATH$SITE timeout ${ATTN_TIMEOUT:-150} python3 -m bench.attention --json "$OUT/attention.json"
  echo "attention rc=$?"
} 2>&1 | tee -a "$OUT/log.txt"
