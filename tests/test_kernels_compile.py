"""Every Triton kernel the engine launches compiles for a Hopper GPU (cuda:90) on this CPU.

CI runs the kernels in Triton's interpreter, which accepts Python the compiler rejects: a tuple of
dtypes built inside a kernel ran here and failed at the first launch on a GPU. This test records the
launches of engine runs on the Triton backend (the fused elementwise path, mixed steps, groups,
decode on graph-shaped buffers, packed scoring) and of the gate/up GEMM, the KV store and FA3's merge,
then compiles each distinct (kernel, argument types, constexprs, options) with Triton's own compiler,
ptxas included, in a process without the interpreter (where the kernels are compiled functions). It
also reads the RoPE kernel's PTX: no fused multiply-add, so the GPU rounds as torch's formula does.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("triton")

LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg", "enable_fp_fusion", "num_ctas")
TARGET = ("cuda", 90, 32)  # Hopper: the H100 and H200 the engine runs on


def _is_constexpr(param: inspect.Parameter) -> bool:
    return str(param.annotation).endswith("constexpr")


def _launch(fn: Any, args: tuple, kwargs: dict[str, Any]) -> str:
    """One launch as JSON: the kernel's module and name, each parameter's Triton type, the constexprs'
    values and the launch options."""
    from triton.runtime.jit import mangle_type

    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = bound.get(name, param.default)
        if _is_constexpr(param) or value is None:
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = mangle_type(value)
    options = {k: v for k, v in kwargs.items() if k in LAUNCH_OPTIONS}
    record = {"module": fn.__module__, "kernel": fn.__name__, "signature": signature}
    return json.dumps(record | {"constexprs": constexprs, "options": options})  # in parameter order


@pytest.fixture
def launches(monkeypatch) -> set[str]:
    """The distinct launches of interpreted kernels while the test runs."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: set[str] = set()
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        seen.add(_launch(self.fn, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    return seen


def _engine_runs(tmp_path: Path) -> None:
    """Engine runs on the Triton backend with the fused elementwise kernels: bf16 at head_dim 128 (the
    GPU's) and float32 at 64; prefill chunks, groups (two-level attention), plain requests, mixed steps,
    decode on a graph's static buffers (eager here, as at a key's first steps), then scoring of
    multi-token labels, packed (the tree mask) and by members."""
    from batchllm.engine import Engine, SamplingParams
    from batchllm.engine.attention import triton as tb
    from batchllm.engine.graphs import DecodeGraphs
    from batchllm.engine.labels import LabelSet
    from bench.gpu_check import build_model

    rng = np.random.default_rng(0)
    prompts = []
    for _ in range(2):
        prefix = rng.integers(4, 500, 40).tolist()
        prompts += [prefix + rng.integers(4, 500, int(rng.integers(2, 6))).tolist() for _ in range(4)]
    prompts += [rng.integers(4, 500, 20).tolist() for _ in range(3)]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    labels = LabelSet.from_token_ids(["a", "b", "c"], [[5, 6, 7], [5, 8], [9]])
    split = tb.DECODE_SPLIT_MIN_ROWS
    tb.DECODE_SPLIT_MIN_ROWS = 4  # the tiny batch's mixed steps split their decode rows off
    try:
        for head_dim, dtype in ((128, "bfloat16"), (64, "float32")):
            folder = tmp_path / f"model{head_dim}"
            build_model(
                folder,
                hidden_size=2 * head_dim,
                intermediate_size=128,
                num_hidden_layers=1,
                num_attention_heads=2,
            )
            kw = dict(device="cpu", dtype=dtype, attention="triton", max_num_batched_tokens=48)
            for graph_buffers in (False, True):
                engine = Engine(folder, kv_cache_tokens=2048, **kw)
                engine.model.use_fused_kernels(True)
                if graph_buffers:
                    runner = engine.runner
                    runner.graphs = DecodeGraphs(runner.model, runner.attention, measured_padding=False)
                engine.generate(prompts, params)
            engine = Engine(folder, kv_cache_tokens=1024, block_size=4, **kw)  # packs cut into chunks
            engine.model.use_fused_kernels(True)
            for pack in (True, False):  # packed scoring (the tree mask) and members, multi-token labels
                assert all(r.ok for r in engine.classify(prompts[:6], labels, pack=pack))
    finally:
        tb.DECODE_SPLIT_MIN_ROWS = split


def _direct_calls() -> None:
    """Kernels an engine run on CPU does not reach: the gate/up GEMM (CUDA's MLP), the KV store beside
    RoPE (backends without the fused store) and FA3's log-sum-exp merge, in bf16."""
    import torch

    from batchllm.kernels import gate_up as gu
    from batchllm.kernels.paged.merge import merge_attention
    from batchllm.kernels.paged.store import store_kv

    for rows in (5, 96):
        gu.gate_up_silu(torch.randn(rows, 64), torch.randn(128, 64) / 8)
    bf16 = torch.bfloat16
    k, v = torch.randn(2, 6, 2, 128, dtype=bf16).unbind(0)
    k_cache, v_cache = torch.zeros(2, 4, 2, 16, 128, dtype=bf16).unbind(0)
    store_kv(k, v, k_cache, v_cache, torch.tensor([0, 3, -1, 17, 40, 63]))
    o1, o2 = torch.randn(2, 6, 32, 128, dtype=bf16).unbind(0)
    lse1, lse2 = torch.randn(2, 6, 32).unbind(0)
    merge_attention(o1, lse1, o2, lse2)


@pytest.mark.slow  # interprets two small engine runs, then compiles every kernel variant they launched
def test_every_launched_kernel_compiles_for_hopper(tmp_path: Path, launches: set[str]) -> None:
    _engine_runs(tmp_path)
    _direct_calls()
    kernels = {json.loads(launch)["kernel"] for launch in launches}
    assert kernels == {
        "_rmsnorm_kernel",
        "_silu_mul_kernel",
        "_rope_kernel",
        "_attention_kernel",  # both levels of two-level attention, in one launch or two
        "_reduce_kernel",
        "_gate_up_silu_kernel",
        "_store_kv_kernel",
        "_merge_kernel",
    }
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    done = subprocess.run(
        [sys.executable, __file__],
        input="\n".join(sorted(launches)),
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).parent.parent,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["compiled"] == len(launches) and not report["failed"], report
    assert report["rope_fma"] == 0, "the RoPE kernel fuses multiply and add: not torch's rounding"


def compile_all(lines: list[str]) -> dict[str, Any]:
    """Compile each recorded launch for TARGET (no interpreter in this process); count the failures and
    the fused multiply-adds in the RoPE kernel's PTX."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled, failed, rope_fma = 0, [], 0
    for line in lines:
        launch = json.loads(line)
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        names = list(launch["signature"])
        constexprs = {(names.index(k),): v for k, v in launch["constexprs"].items()}
        source = ASTSource(fn, launch["signature"], constexprs=constexprs)
        try:
            kernel = triton.compile(source, target=GPUTarget(*TARGET), options=launch["options"])
        except Exception as e:  # reported with the launch that failed
            failed.append({"kernel": launch["kernel"], "error": f"{type(e).__name__}: {str(e)[-600:]}"})
            continue
        compiled += 1
        if launch["kernel"] == "_rope_kernel":
            rope_fma += kernel.asm["ptx"].count("fma.rn")
    return {"compiled": compiled, "failed": failed, "rope_fma": rope_fma}


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") != "1", "compiles: run without the interpreter"
    print(json.dumps(compile_all([line for line in sys.stdin.read().splitlines() if line])))
