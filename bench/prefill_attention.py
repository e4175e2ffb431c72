"""Prefill attention of one layer on the GPU: our Triton kernels in TFLOP/s against the matmul peak.

Shapes (Llama-3.1-8B: 32 query heads, 8 KV heads, head_dim 128, bf16, block 16,
block ids shuffled over the pool), each one 16k-token engine step:

- ``causal``: 2 sequences of 8,192 new tokens from position 0 (group prefixes,
  long prompts): paged_attention, causal, keys read from the paged cache;
- ``chunked``: 1 sequence, 8,192 new tokens after 8,192 cached (chunked prefill);
- ``members``: 100 members x 160 new tokens in 2 groups with 4,000-token
  prefixes (the scoring workload): two_level_attention (prefix tiles + own tiles);
- ``prompts``: 8 prompts of 2,048 new tokens from position 0 (prefill-only
  prompts, one engine step);
- ``agroup``: 5 groups of 16 members x 200 new tokens after 2,000-token
  prefixes (a prefill step of (a), W(2000, 200, 100, 16, 100)).

FLOPs count the visible (query, key) pairs only (4 x heads x head_dim each).
Each configuration is checked against a dense float32 reference on a sample
of rows before it is timed. ``--sweep`` also times tile configurations
(``kernels.paged.CONFIG_OVERRIDE``) and prints the best per case as JSON.
``--libraries`` times library kernels on the same shapes as the bar ours must
clear: vLLM's FlashAttention-3 (where vLLM is importable): paged on a [block,
offset, kv_head, dim] copy of the cache, paged on the engine's strided view of
its own [block, kv_head, offset, dim] pool, for cases with groups also as two
passes on that view (each group's stacked rows against its prefix, each
member's rows against its own keys, ``merge_attention``: 5% slower than one
plain pass on ``agroup``, 18% on ``members``, H100, bench/RESULTS.md
2026-12-05 night, so the fa3 backend runs one), and for
cases without cached keys on the step's fresh keys and values (no block
table: contiguous, and as the views of one fused QKV projection output the
model hands over); and torch's scaled_dot_product_attention (cuDNN and flash backends, dense
contiguous K/V, one call per sequence) for ``causal``.

    python -m bench.prefill_attention [--sweep] [--libraries] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from batchllm.kernels import paged as pa
from bench.attention import dense_kv, time_ms

HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
DEV = (
    "cuda" if torch.cuda.is_available() else "cpu"
)  # cpu: build/call/max_error under the interpreter; main needs CUDA
DTYPE = torch.bfloat16 if DEV == "cuda" else torch.float32
CASES = {
    "causal": (2, 8192, 0, 0, 0),
    "chunked": (1, 8192, 8192, 0, 0),
    "members": (100, 160, 0, 2, 4000),
    "prompts": (8, 2048, 0, 0, 0),
    "agroup": (80, 200, 0, 5, 2000),
}


# Tile configurations per case (CONFIG_OVERRIDE keys); m, n, w, s: rows, key columns, warps, stages of
# the tiles that dominate the case (own tiles for causal and chunked, prefix tiles for members)
def _own(m: int, n: int, w: int, s: int) -> dict[str, int]:
    return {"block_m_own": m, "block_n_own": n, "num_warps": w, "num_stages": s}


def _pre(m: int, n: int, w: int, s: int) -> dict[str, int]:
    return {"block_m_pre": m, "block_n_pre": n, "num_warps": w, "num_stages": s}


SWEEP: dict[str, list[dict[str, int]]] = {
    "causal": [_own(128, 64, 8, 3), _own(256, 64, 16, 2), _own(256, 64, 16, 4), _own(256, 32, 16, 3),
               _own(256, 64, 8, 3), _own(128, 64, 4, 3)],
    "chunked": [_own(128, 64, 8, 3), _own(256, 64, 16, 3), _own(256, 64, 16, 2)],
    "members": [_pre(256, 64, 8, 3), _pre(256, 64, 16, 3), _pre(256, 64, 16, 2), {"wide_own_rows": 1 << 30},
                {**_pre(256, 64, 16, 3), "block_m_own": 128}, _pre(128, 64, 8, 3)],
    "prompts": [_own(128, 64, 8, 3), _own(256, 64, 16, 3)],
    "agroup": [_pre(256, 64, 8, 3), _pre(256, 64, 16, 3), {"wide_own_rows": 1 << 30}],
}  # fmt: skip


def build(case: str, seed: int = 0) -> dict:
    seqs, new, cached, groups, prefix = CASES[case]
    dev = DEV
    gen = torch.Generator(device=dev).manual_seed(seed)
    pre_b = -(-prefix // BLOCK)
    own_b = -(-(cached + new) // BLOCK)
    num_blocks = groups * pre_b + seqs * own_b + 1
    shape = (num_blocks, KV_HEADS, BLOCK, DIM)
    k = torch.randn(shape, generator=gen, device=dev, dtype=DTYPE)
    v = torch.randn(shape, generator=gen, device=dev, dtype=DTYPE)
    ids = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    i32 = {"device": dev, "dtype": torch.int32}
    own_tables = ids[groups * pre_b : groups * pre_b + seqs * own_b].view(seqs, own_b)
    c = {
        "case": case,
        "q": torch.randn(seqs * new, HEADS, DIM, generator=gen, device=dev, dtype=DTYPE),
        "k": k,
        "v": v,
        "cu_q": torch.arange(seqs + 1, **i32) * new,
        "scale": 1 / math.sqrt(DIM),
        "new": new,
        "max_q": new,
        "workspace": {},
    }
    if groups:
        g_tables = ids[: groups * pre_b].view(groups, pre_b).contiguous()
        members = seqs // groups
        grp = torch.arange(seqs, device=dev) // members
        c["tables"] = torch.cat([g_tables[grp], own_tables], 1).contiguous()
        c["kv_lens"] = torch.full((seqs,), pre_b * BLOCK + new, **i32)
        c["start"] = torch.full((seqs,), pre_b * BLOCK, **i32)
        c["cu_g"] = torch.arange(groups + 1, **i32) * members * new
        c["g_lens"] = torch.full((groups,), pre_b * BLOCK, **i32)
        c["g_tables"] = g_tables
        c["prefix"], c["members"] = pre_b * BLOCK, members
        c["own_tables"] = own_tables.contiguous()
        # pairs: every row sees the prefix and its own keys causally
        c["pairs"] = seqs * (new * pre_b * BLOCK + new * (new + 1) // 2)
    else:
        c["tables"] = own_tables.contiguous()
        c["kv_lens"] = torch.full((seqs,), cached + new, **i32)
        c["pairs"] = seqs * (new * cached + new * (new + 1) // 2)
    c["max_kv"] = int(c["kv_lens"].max())
    return c


def call(c: dict, out: torch.Tensor, lse: torch.Tensor) -> None:
    if "g_tables" in c:
        pa.two_level_attention(
            c["q"], c["k"], c["v"], c["cu_q"], c["kv_lens"], c["tables"], c["start"], c["cu_g"],
            c["g_lens"], c["g_tables"], c["scale"], c["max_q"], max_kv_len=c["max_kv"],
            max_prefix_len=c["prefix"], max_group_rows=c["members"] * c["new"], out=out, lse=lse,
            workspace=c["workspace"],
        )  # fmt: skip
    else:
        pa.paged_attention(
            c["q"], c["k"], c["v"], c["cu_q"], c["kv_lens"], c["tables"], None, c["scale"], c["max_q"],
            max_kv_len=c["max_kv"], out=out, lse=lse, workspace=c["workspace"],
        )  # fmt: skip


def max_error(c: dict, out: torch.Tensor, rows: int = 64) -> float:
    """Dense float32 attention of the last `rows` query rows of the first and last sequence."""
    err = 0.0
    for s in (0, len(c["cu_q"]) - 2):
        lo, hi = int(c["cu_q"][s]), int(c["cu_q"][s + 1])
        length = int(c["kv_lens"][s])
        k, v = dense_kv(c, s, HEADS)
        pos = torch.arange(length, device=DEV)
        q_pos = torch.arange(length - (hi - lo), length, device=DEV)[-rows:]
        q = c["q"][hi - rows : hi].float()
        s_ = torch.einsum("rhd,lhd->hrl", q, k) * c["scale"]
        s_ = s_.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        ref = torch.einsum("hrl,lhd->rhd", s_.softmax(-1), v)
        err = max(err, float((out[hi - rows : hi].float() - ref).abs().max()))
    return err


def _timed(c: dict, peak: float, fn, iters: int) -> dict:
    """Check fn's output [T, H, D] (fn returns it, or a tuple led by it) against the dense reference, then
    time it; an error instead when it cannot run (a configuration the compiler refuses, a library
    without this shape or GPU)."""
    try:
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        torch.cuda.synchronize()
        err = max_error(c, out)
        ms, how = time_ms(fn, iters)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    tflops = 4 * HEADS * DIM * c["pairs"] / (ms * 1e-3) / 1e12
    return {"ms": ms, "tflops": tflops, "of_peak": tflops * 1e12 / peak, "err": err, "timing": how}


def measure(c: dict, peak: float, config: dict[str, int], iters: int) -> dict:
    pa.CONFIG_OVERRIDE.clear()
    pa.CONFIG_OVERRIDE.update(config)
    out = torch.full_like(c["q"], float("nan"))
    lse = torch.empty(c["q"].shape[:2], dtype=torch.float32, device=DEV)

    def run() -> torch.Tensor:
        call(c, out, lse)
        return out

    try:
        return {"config": config, **_timed(c, peak, run, iters)}
    finally:
        pa.CONFIG_OVERRIDE.clear()


def fresh_kv(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values [T, KV_HEADS, D] of a case without cached keys, in query order: what the
    step's QKV projection produced before the pool stored it (read back through the block tables)."""
    per_seq = [dense_kv(c, s, KV_HEADS) for s in range(len(c["cu_q"]) - 1)]  # float32: exact for bf16
    return torch.cat([k for k, _ in per_seq]).to(DTYPE), torch.cat([v for _, v in per_seq]).to(DTYPE)


def library_calls(c: dict) -> dict:
    """Library kernels on case c: name -> a call returning the output [T, H, D]."""
    from bench.attention import _fa3

    calls = {}
    fa, _ = _fa3()
    if fa is not None:
        kf = c["k"].permute(0, 2, 1, 3).contiguous()
        vf = c["v"].permute(0, 2, 1, 3).contiguous()
        calls["fa3_paged"] = lambda: fa(
            c["q"], kf, vf, max_seqlen_q=c["new"], cu_seqlens_q=c["cu_q"], max_seqlen_k=c["max_kv"],
            seqused_k=c["kv_lens"], block_table=c["tables"], softmax_scale=c["scale"], causal=True, fa_version=3,
        )  # fmt: skip
        kview, vview = c["k"].transpose(1, 2), c["v"].transpose(1, 2)  # the engine's view of its pool
        calls["fa3_paged_view"] = lambda: fa(
            c["q"], kview, vview, max_seqlen_q=c["new"], cu_seqlens_q=c["cu_q"], max_seqlen_k=c["max_kv"],
            seqused_k=c["kv_lens"], block_table=c["tables"], softmax_scale=c["scale"], causal=True, fa_version=3,
        )  # fmt: skip
        if "g_tables" in c:
            own_lens = torch.full((len(c["cu_q"]) - 1,), c["new"], dtype=torch.int32, device=DEV)
            calls["fa3_two_pass"] = lambda: fa3_two_pass(c, fa, kview, vview, own_lens)
        if c["case"] in ("causal", "prompts"):  # no cached keys: the step's own keys are all it reads
            kd, vd = fresh_kv(c)
            qkv = torch.cat([c["q"].flatten(1), kd.flatten(1), vd.flatten(1)], 1)  # [T, (H + 2 KVH) * D]
            _, ks, vs = qkv.split([HEADS * DIM, KV_HEADS * DIM, KV_HEADS * DIM], 1)
            kq, vq = ks.view(-1, KV_HEADS, DIM), vs.view(-1, KV_HEADS, DIM)
            for name, (k_, v_) in {"fa3_dense": (kd, vd), "fa3_dense_qkv_view": (kq, vq)}.items():
                calls[name] = lambda k_=k_, v_=v_: fa(
                    c["q"], k_, v_, max_seqlen_q=c["new"], cu_seqlens_q=c["cu_q"], max_seqlen_k=c["new"],
                    cu_seqlens_k=c["cu_q"], softmax_scale=c["scale"], causal=True, fa_version=3,
                )  # fmt: skip
    if c["case"] == "causal":
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        seqs = len(c["cu_q"]) - 1
        dense = [dense_kv(c, s, HEADS) for s in range(seqs)]  # [L, H, D] each, float32
        ks = [k.to(DTYPE).transpose(0, 1)[None] for k, _ in dense]
        vs = [v.to(DTYPE).transpose(0, 1)[None] for _, v in dense]
        qs = [c["q"][s * c["new"] : (s + 1) * c["new"]].transpose(0, 1)[None] for s in range(seqs)]
        out = torch.empty_like(c["q"])

        def run(backend):
            def call_():
                with sdpa_kernel(backend):
                    for s in range(seqs):
                        o = sdpa(qs[s], ks[s], vs[s], is_causal=True, scale=c["scale"])
                        out[s * c["new"] : (s + 1) * c["new"]] = o[0].transpose(0, 1)
                return out

            return call_

        calls["sdpa_cudnn"] = run(SDPBackend.CUDNN_ATTENTION)
        calls["sdpa_flash"] = run(SDPBackend.FLASH_ATTENTION)
    return calls


def fa3_two_pass(c: dict, fa, k: torch.Tensor, v: torch.Tensor, own_lens: torch.Tensor) -> torch.Tensor:
    """Two FA3 passes for a step of members (every row grouped): own keys (own_lens each) causal, each
    group's stacked rows against its prefix, merged into the first pass's output."""
    out, lse = fa(
        c["q"], k, v, max_seqlen_q=c["new"], cu_seqlens_q=c["cu_q"], max_seqlen_k=c["new"], seqused_k=own_lens,
        block_table=c["own_tables"], softmax_scale=c["scale"], causal=True, return_softmax_lse=True, fa_version=3,
    )  # fmt: skip
    pre, pre_lse = fa(
        c["q"], k, v, max_seqlen_q=c["members"] * c["new"], cu_seqlens_q=c["cu_g"], max_seqlen_k=c["prefix"],
        seqused_k=c["g_lens"], block_table=c["g_tables"], softmax_scale=c["scale"], causal=False,
        return_softmax_lse=True, fa_version=3,
    )  # fmt: skip
    return pa.merge_attention(pre, pre_lse.t(), out, lse.t(), out=out)


def measure_library(c: dict, peak: float, name: str, fn, iters: int) -> dict:
    return {"library": name, **_timed(c, peak, fn, iters)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--libraries", action="store_true")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args()
    from bench.floor import measure_peak

    peak = measure_peak("cuda")
    report: dict = {"device": torch.cuda.get_device_name(), "matmul_peak_tflops": peak / 1e12, "cases": {}}
    for case in args.cases.split(","):
        c = build(case)
        runs = [measure(c, peak, {}, args.iters)]
        if args.sweep:
            runs += [measure(c, peak, cfg, args.iters) for cfg in SWEEP[case]]
        ok = [r for r in runs if "ms" in r and r["err"] < 0.05]
        best = min(ok, key=lambda r: r["ms"]) if ok else None
        libraries = []
        if args.libraries:
            libraries = [measure_library(c, peak, n, fn, args.iters) for n, fn in library_calls(c).items()]
        report["cases"][case] = {"pairs": c["pairs"], "runs": runs, "best": best, "libraries": libraries}
        for r in runs + libraries:
            print(case, json.dumps(r), flush=True)
        del c
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps({k: v["best"] for k, v in report["cases"].items()}))


if __name__ == "__main__":
    main()
