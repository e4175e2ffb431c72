#!/bin/bash
# FlashInfer on a GPU machine without network (the lent device): its PyPI wheel is Python plus CUDA
# sources that JIT-compile with the machine's nvcc on first use, so it travels as a small folder.
#
#   here (network):  bash bench/device_flashinfer.sh pack        # -> out/fi (~20 MiB, ignored)
#   on the device:   run(carry=["out/fi"], command="bash bench/device_flashinfer.sh run python3 -m bench.attention")
#
# `run` unpacks once into $SITE (it stays while the machine is warm; kept apart from the vLLM carry's site),
# sets PYTHONPATH, CUDA_HOME and the target architecture, and runs the command. The first use of
# each kernel on a fresh machine compiles for 1-2 minutes. `save DIR` (on the device, after a run)
# packs the compiled kernels into DIR/ficache.tar.xz (~4 MiB); copied back here into out/fi, it is
# unpacked into FlashInfer's cache by later `run`s, which then load those kernels instead of compiling.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.7.2.post1
SITE=${SITE:-/tmp/site-fi}  # apart from /tmp/site, where the vLLM peer unpacks: vLLM must not see FlashInfer
case "${1:-}" in
pack)
  PY=${PY:-python3}
  mkdir -p out/fi && rm -f out/fi/*
  # the device's Python is 3.12; the wheels are pure Python (tvm-ffi has a manylinux build)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d out/fi \
    "flashinfer-python==$VERSION" "apache-tvm-ffi==0.1.15.post2" "einops==0.8.2" "tabulate==0.10.0" \
    "nvidia-ml-py==13.615.71"
  # its MoE expert-parallel sources are not imported by `import flashinfer`: drop them to stay small
  W=$(ls out/fi/flashinfer_python-*.whl)
  T=$(mktemp -d) && (cd "$T" && unzip -q "$OLDPWD/$W" && tar -cJf "$OLDPWD/out/fi/flashinfer.tar.xz" \
    --exclude='flashinfer/moe_ep' flashinfer ./*.dist-info) && rm -rf "$T" "$W"
  du -sh out/fi
  ;;
run)
  shift
  if [ ! -f "$SITE/.flashinfer_ok" ]; then
    mkdir -p "$SITE"
    tar -xJf out/fi/flashinfer.tar.xz -C "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" out/fi/*.whl
    touch "$SITE/.flashinfer_ok"
  fi
  if [ -f out/fi/ficache.tar.xz ] && [ ! -d "$HOME/.cache/flashinfer" ]; then
    mkdir -p "$HOME/.cache" && tar -xJf out/fi/ficache.tar.xz -C "$HOME/.cache"
  fi
  CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}
  export PYTHONPATH=$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH} CUDA_HOME FLASHINFER_CUDA_ARCH_LIST=9.0 \
    MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
  "$@"
  ;;
save)
  tar -cJf "${2:?usage: $0 save DIR}/ficache.tar.xz" -C "$HOME/.cache" flashinfer
  ;;
*)
  echo "usage: $0 pack | run COMMAND... | save DIR" >&2
  exit 2
  ;;
esac
