#!/bin/bash
# One device call that checks before it times, in the order a short lease needs them, each stage bounded
# by what is left of LIMIT seconds (the call's timeout; default 570):
#   kernels    the elementwise and gate/up kernels on the GPU (the compiled rounding; about 20 s)
#   gpu_check  the engine on CUDA (torch, triton) against CPU float32 and transformers
#   a205       (a) at ~205k KV tokens beside stock vLLM shuffled (bench.peers; needs peer/.vw1)
#   tests      every GPU test: kernels against the torch reference, backends, graphs and their staging,
#              engine (about six minutes on a fresh machine: Triton compiles each kernel variant once)
#   attention  decode attention of one layer at (a)'s shapes beside FA3 (bench.attention)
#   prefill    prefill-only 1,024 x 2,048 tokens, MFU against the matmul peak measured in the same call
#   mlp        the gate/up GEMM with its SiLU epilogue against cuBLAS + silu_mul at decode row counts
#   profile    where (a) at 205k's GPU time goes, kernel kinds and idle gaps, in a second (warm) run
#   plain      (a) with two-level decode against every group read plain over the same shared KV
#              (bench.config_ab, one engine, A B A B: decode ms/step both ways; PLAIN_KV tokens, 205000)
#   run(carry=["peer/.vw1", "peer/device_setup.sh"], command="bash bench/device_check.sh")   # kernels tests
#   run(carry=[...], command="LIMIT=585 STAGES='kernels gpu_check a205 prefill' bash bench/device_check.sh")
#   run(carry=[...], command="LIMIT=585 STAGES='mlp profile' bash bench/device_check.sh")
#   run(carry=[...], command="LIMIT=585 STAGES=plain bash bench/device_check.sh")
# Output under $OUT: one <stage>.txt each (a timeout still shows what ran), *.json, log.txt (the summary).
set -o pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s); LIMIT=${LIMIT:-570}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# seconds a stage may take: its own cap, or what is left of LIMIT (8 s kept for the summary)
budget() { local left=$((LIMIT - ($(date +%s) - T0) - 8)); echo $((left < $1 ? left : $1)); }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  SITE=""; if [ -d peer/.vw1 ] && bash peer/device_setup.sh >/dev/null; then SITE=:/tmp/site; fi
  export PYTHONPATH=$PYTHONPATH$SITE
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  for stage in ${STAGES:-kernels tests}; do
    (($(budget 9999) > 0)) || { echo "== $stage: no time left"; break; }
    echo "== $stage ($(budget 9999) s left)"
    case $stage in
      kernels)
        timeout "$(budget 120)" python3 -m pytest -q -p no:cacheprovider -rfE tests/test_elementwise_kernels.py \
          tests/test_gate_up.py > "$OUT/kernels.txt" 2>&1
        echo "rc=$?"; grep -E "^FAILED|passed|failed" "$OUT/kernels.txt" | tail -8 ;;
      gpu_check)
        timeout "$(budget 200)" python3 -m bench.gpu_check --attention torch,triton \
          > "$OUT/gpu_check.json" 2> "$OUT/gpu_check.txt"
        echo "rc=$?"; cat "$OUT/gpu_check.json" ;;
      a205)
        timeout "$(budget 300)" python3 -m bench.peers --model bench/configs/llama31-8b --device cuda \
          --case 2000,200,100,16,100 --kv-tokens 205000 --skip "vllm plan,vllm sorted" --native-repeat 2 \
          --demo-rows 0 --out "$OUT/a205" > "$OUT/a205.txt" 2>&1
        echo "rc=$?"; cat "$OUT/a205/table.md" 2>/dev/null ;;
      tests)
        # every file with gpu tests, by name: the device has no duckdb, so collecting all of tests/ fails
        timeout "$(budget 480)" python3 -m pytest -v -p no:cacheprovider -rfE --durations=15 -m gpu \
          $(grep -l "mark.gpu" tests/*.py) > "$OUT/tests.txt" 2>&1
        echo "rc=$?"; grep -E "^FAILED|^ERROR|passed|failed" "$OUT/tests.txt" | tail -20 ;;
      attention)
        timeout "$(budget 150)" python3 -m bench.attention --cases a205,main,sd1,p512 --json "$OUT/attention.json" \
          > "$OUT/attention.txt" 2>&1
        echo "rc=$?"; tail -30 "$OUT/attention.txt" ;;
      prefill)
        timeout "$(budget 200)" python3 -m bench.generate --case 0,2048,1,1,1024 --kv-tokens 900000 --peer none \
          --repeat 2 --out "$OUT/prefill" > "$OUT/prefill.txt" 2>&1
        echo "rc=$?"; grep -E "^PEAK|^\|" "$OUT/prefill.txt" | head -8 ;;
      mlp)
        timeout "$(budget 120)" python3 -m bench.fused_mlp --rows 224,448,480,512 --sweep --json "$OUT/mlp.json" \
          > "$OUT/mlp.txt" 2>&1
        echo "rc=$?"; tail -40 "$OUT/mlp.txt" ;;
      profile)
        timeout "$(budget 240)" python3 -m bench.profile --case 2000,200,100,16,100 --kv-tokens 205000 --warm-whole \
          --out "$OUT/profile" > "$OUT/profile.txt" 2>&1
        echo "rc=$?"; tail -40 "$OUT/profile.txt" ;;
      plain)
        timeout "$(budget 300)" python3 -m bench.config_ab generate --model bench/configs/llama31-8b \
          --case 2000,200,100,16,100 --kv-tokens "${PLAIN_KV:-205000}" --max-model-len 8192 --config '{}' \
          --config '{"two_level": 0}' --rounds 2 --json "$OUT/plain.json" > "$OUT/plain.txt" 2>&1
        echo "rc=$?"; grep -E '^\{"round"|median' "$OUT/plain.txt" | tail -8 ;;
      *) echo "unknown stage $stage" ;;
    esac
  done
  echo "== done ($(budget 9999) s left)"
} 2>&1 | tee -a "$OUT/log.txt"
