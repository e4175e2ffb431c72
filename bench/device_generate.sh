#!/bin/bash
# One device call: GPU and versions, the carried vLLM unpacked when present, then bench.generate into $OUT.
#   run(carry=["peer/.vw1"], command="bash bench/device_generate.sh --case 2000,200,100,16,100")
# Extra arguments go to `python3 -m bench.generate` (a later --time-budget wins over the default here).
# Output: $OUT/results.json, $OUT/table.md, $OUT/vllm.json, $OUT/log.txt. BENCH_COMMIT=<hash> is recorded.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
       HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  if [ -d peer/.vw1 ] && bash peer/device_setup.sh; then export PYTHONPATH=/tmp/site:$PYTHONPATH; fi
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  timeout ${BENCH_TIMEOUT:-570} python3 -m bench.generate --out "$OUT" --time-budget 450 "$@"
  rc=$?
  nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv,noheader
  exit $rc
} 2>&1 | tee -a "$OUT/log.txt"
