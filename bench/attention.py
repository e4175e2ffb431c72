"""Decode attention of one layer on the GPU: our Triton kernels vs FlashAttention-3, in ms and GB/s.

Shape (Llama-3.1-8B decode): B = G x sd sequences, each group of sd members
shares a P-token prefix (the same physical KV blocks), every member has S own
tokens and one query; 32 query heads, 8 KV heads, head_dim 128, bf16, block
16; block ids are shuffled over the pool. Cases: `main` (G=100, sd=16,
P=2000, S=304), `sd1` (no sharing: 1600 groups of 1), `p512` (P=512, 4
members), `a205` ((a)'s step with a 205k-token pool: 27 groups of 16, 256 own). Per case it times, with CUDA graphs (eager if capture fails):

- paged: paged_attention over the full contexts (reads every prefix sd times);
- two_level: two_level_attention as the engine runs it (decode: the two levels as two
  launches on two streams, each kernel with its own registers, then the reduce);
- fused: the same with both levels in one launch (CONFIG_OVERRIDE separate=0);
- prefix / own: prefix_attention alone, paged_attention from the prefix end;
- fa3_plain / fa3_two_pass (+ merge): vLLM's FlashAttention-3 when
  `vllm.vllm_flash_attn` imports (its paged layout [block, offset, kv_head,
  dim] gets its own copy of the cache);
- fi_decode / fi_cascade / fi_two_pass (fi_prefix, fi_own): FlashInfer when it
  imports, on our pool as is (its "HND" layout): its paged decode, its 2-level
  cascade, and what the `flashinfer` backend runs for a decode step with groups
  (decode kernel over own pages, prefill kernel over group prefixes, merge_state).

It checks two_level (and paged, FA3) against a float32 dense reference on a
sample of sequences, and reports bytes of KV read, GB/s and the floor: bytes /
the device bandwidth measured in the same run (the better of a large
device-to-device copy, counting read + write, and a large read-only sum).
--sweep CASE also times tile configurations (kernels.paged.CONFIG_OVERRIDE).

    python -m bench.attention [--json out.json] [--cases main,sd1,p512] [--sweep]

Run it from the repository root: it imports batchllm.kernels.paged, nothing
else of the project (to time another version's kernels, run it from that
version's tree). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from batchllm.kernels import paged as pa
from batchllm.kernels.paged import fused

CASES = {
    "main": (100, 16, 2000, 304),
    "sd1": (1600, 1, 2000, 304),
    "p512": (400, 4, 512, 304),
    "a205": (27, 16, 2000, 256),
}
HEADS, KV_HEADS, DIM, BLOCK = 32, 8, 128, 16
KNOBS = (
    "block_n", "num_warps", "num_stages", "maxnreg", "block_m_pre", "block_m_own",
    "target_programs", "prefix_splits", "own_splits", "mix", "prefix_direct", "block_n_pre",
    "block_n_own", "prefix_split_loop", "own_split_loop", "heads_per_tile",
)  # fmt: skip


def _fa3():
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # not installed, or no FA3 build for this GPU
        return None, f"{type(e).__name__}: {e}"
    return flash_attn_varlen_func, None


def build(groups: int, members: int, prefix: int, own: int, seed: int = 0) -> dict:
    """Shuffled paged pool and the index tensors of both kernels' conventions."""
    assert prefix % BLOCK == 0 and own % BLOCK == 0
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(seed)
    num_seqs = groups * members
    pp, op = prefix // BLOCK, own // BLOCK
    num_blocks = groups * pp + num_seqs * op
    shape = (num_blocks, KV_HEADS, BLOCK, DIM)
    k_cache = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16)
    v_cache = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16)
    ids = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
    g_tables = ids[: groups * pp].view(groups, pp).contiguous()
    own_tables = ids[groups * pp :].view(num_seqs, op).contiguous()
    grp = torch.arange(num_seqs, device=dev) // members
    tables = torch.cat([g_tables[grp], own_tables], 1).contiguous()
    i32 = {"device": dev, "dtype": torch.int32}
    return {
        "shape": (groups, members, prefix, own),
        "q": torch.randn(num_seqs, HEADS, DIM, generator=gen, device=dev, dtype=torch.bfloat16),
        "k": k_cache,
        "v": v_cache,
        "cu_q": torch.arange(num_seqs + 1, **i32),
        "kv_lens": torch.full((num_seqs,), prefix + own, **i32),
        "tables": tables,
        "prefix_lens": torch.full((num_seqs,), prefix, **i32),
        "cu_g": torch.arange(groups + 1, **i32) * members,
        "g_lens": torch.full((groups,), prefix, **i32),
        "g_tables": g_tables,
        "own_lens": torch.full((num_seqs,), own, **i32),
        "own_tables": own_tables,
        "scale": 1 / math.sqrt(DIM),
        "workspace": {},
    }


def dense_kv(c: dict, seq: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [kv_len, heads, D] of sequence `seq` in float32, read through its block table
    from the head-major paged pool, each kv head repeated for its query heads."""
    bs = c["k"].shape[2]
    pos = torch.arange(int(c["kv_lens"][seq]), device=c["k"].device)
    blocks = c["tables"][seq].long()[pos // bs]
    g = heads // c["k"].shape[1]
    k = c["k"][blocks, :, pos % bs].float().repeat_interleave(g, 1)
    v = c["v"][blocks, :, pos % bs].float().repeat_interleave(g, 1)
    return k, v


def reference(c: dict, seqs: list[int]) -> torch.Tensor:
    """Dense float32 attention of the given sequences' queries over their whole context: [n, H, D]."""
    outs = []
    for i in seqs:
        k, v = dense_kv(c, i, HEADS)
        s = torch.einsum("hd,lhd->hl", c["q"][i].float(), k) * c["scale"]
        outs.append(torch.einsum("hl,lhd->hd", s.softmax(-1), v))
    return torch.stack(outs)


def time_ms(fn, iters: int) -> tuple[float, str]:
    """Median ms per call: a CUDA graph of `iters` calls replayed 5 times (eager loop if capture fails)."""
    fn()  # compile, allocate workspaces
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(iters):
                fn()
        run, how = graph.replay, "cuda_graph"
        graph.replay()
    except Exception:  # e.g. a library that syncs inside
        torch.cuda.synchronize()

        def run():
            for _ in range(iters):
                fn()

        how = "eager"
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times), how


def copy_bandwidth() -> dict:
    """Device memory bandwidth in bytes/s: the best of device-to-device copies (read + write bytes)
    of 1 and 4 GiB, and of a read-only pass (sum of 4 GiB)."""
    best_copy = 0.0
    for gib in (1, 4):
        n = gib * 2**30 // 2
        bufs: list = [
            torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_(),
            torch.empty(n, dtype=torch.bfloat16, device="cuda"),
        ]
        ms, _ = time_ms(lambda bufs=bufs: bufs[1].copy_(bufs[0]), 5)
        best_copy = max(best_copy, 2 * n * 2 / (ms * 1e-3))
        bufs.clear()
    n = 2**30  # float32, 4 GiB
    bufs = [torch.empty(n, dtype=torch.float32, device="cuda").normal_(), torch.empty((), device="cuda")]
    ms, _ = time_ms(lambda: torch.sum(bufs[0], dim=0, out=bufs[1]), 5)
    read = n * 4 / (ms * 1e-3)
    bufs.clear()
    torch.cuda.empty_cache()
    return {"copy": best_copy, "read": read}


def ours(c: dict) -> dict:
    """Callables of our kernels on case c."""
    out = torch.empty_like(c["q"])
    lse = torch.empty(c["q"].shape[:2], dtype=torch.float32, device="cuda")
    members, max_len = c["shape"][1], c["shape"][2] + c["shape"][3]

    def paged():
        pa.paged_attention(
            c["q"], c["k"], c["v"], c["cu_q"], c["kv_lens"], c["tables"], None, c["scale"], 1,
            max_kv_len=max_len, out=out, lse=lse, workspace=c["workspace"],
        )  # fmt: skip

    def two_level():
        pa.two_level_attention(
            c["q"], c["k"], c["v"], c["cu_q"], c["kv_lens"], c["tables"], c["prefix_lens"],
            c["cu_g"], c["g_lens"], c["g_tables"], c["scale"], 1,
            max_kv_len=max_len, max_prefix_len=c["shape"][2], max_group_rows=members,
            out=out, lse=lse, workspace=c["workspace"],
        )  # fmt: skip

    def prefix():
        pa.prefix_attention(
            c["q"], c["k"], c["v"], c["cu_g"], c["g_lens"], c["g_tables"], c["scale"],
            max_prefix_len=c["shape"][2], max_group_rows=members, out=out, lse=lse, workspace=c["workspace"],
        )  # fmt: skip

    def own():
        pa.paged_attention(
            c["q"], c["k"], c["v"], c["cu_q"], c["kv_lens"], c["tables"], c["prefix_lens"], c["scale"], 1,
            max_kv_len=max_len, out=out, lse=lse, workspace=c["workspace"],
        )  # fmt: skip

    def fused():
        """Both levels in one launch (what decode ran before the two-stream launches)."""
        with overridden(separate=0):
            two_level()

    return {
        "paged": paged,
        "two_level": two_level,
        "prefix": prefix,
        "own": own,
        "fused": fused,
        "_out": out,
    }


@contextmanager
def overridden(**config: int) -> Iterator[None]:
    """The kernels' tile configuration (CONFIG_OVERRIDE) with config on top, restored afterwards."""
    saved = dict(pa.CONFIG_OVERRIDE)
    pa.CONFIG_OVERRIDE.update(config)
    try:
        yield
    finally:
        pa.CONFIG_OVERRIDE.clear()
        pa.CONFIG_OVERRIDE.update(saved)


def fa3_calls(c: dict, fa) -> dict:
    """FA3 plain and two-pass (+ our merge) on a [block, offset, kv_head, dim] copy of the cache."""
    kf = c["k"].permute(0, 2, 1, 3).contiguous()
    vf = c["v"].permute(0, 2, 1, 3).contiguous()
    _, members, prefix, own_len = c["shape"]
    q, scale = c["q"], c["scale"]
    merged = torch.empty_like(q)

    def plain():
        return fa(
            q, kf, vf, max_seqlen_q=1, cu_seqlens_q=c["cu_q"], max_seqlen_k=prefix + own_len,
            seqused_k=c["kv_lens"], block_table=c["tables"], softmax_scale=scale, causal=True, fa_version=3,
        )  # fmt: skip

    def lse_rows(lse):
        return lse.transpose(0, 1) if lse.shape[0] == HEADS and lse.shape[1] == q.shape[0] else lse

    def two_pass():
        o1, l1 = fa(
            q, kf, vf, max_seqlen_q=members, cu_seqlens_q=c["cu_g"], max_seqlen_k=prefix, seqused_k=c["g_lens"],
            block_table=c["g_tables"], softmax_scale=scale, causal=False, return_softmax_lse=True, fa_version=3,
        )  # fmt: skip
        o2, l2 = fa(
            q, kf, vf, max_seqlen_q=1, cu_seqlens_q=c["cu_q"], max_seqlen_k=own_len, seqused_k=c["own_lens"],
            block_table=c["own_tables"], softmax_scale=scale, causal=True, return_softmax_lse=True, fa_version=3,
        )  # fmt: skip
        pa.merge_attention(o1, lse_rows(l1), o2, lse_rows(l2), out=merged)
        return merged

    return {"fa3_plain": plain, "fa3_two_pass": two_pass}


def _flashinfer():
    try:
        import flashinfer
    except Exception as e:  # not installed (bench/device_flashinfer.sh brings it to the device)
        return None, f"{type(e).__name__}: {e}"
    return flashinfer, None


def flashinfer_calls(c: dict, fi) -> dict:
    """FlashInfer on the pool as it is: plain decode, its cascade, and our backend's two launches + merge.
    Plans are made here, once, outside the timed calls (the engine plans once per step for all layers)."""
    q, dev = c["q"], c["q"].device
    cache = (c["k"], c["v"])
    i32 = {"dtype": torch.int32}
    dtypes = {"q_data_type": torch.bfloat16, "kv_data_type": torch.bfloat16}

    def ws() -> torch.Tensor:
        return torch.empty(128 << 20, dtype=torch.uint8, device=dev)

    def level(tables: torch.Tensor) -> list[torch.Tensor]:
        """kv indptr, indices, last page lengths of full-page tables (every length here is whole pages)."""
        n, width = tables.shape
        return [torch.arange(n + 1, **i32) * width, tables.reshape(-1).cpu(), torch.full((n,), BLOCK, **i32)]

    heads = (HEADS, KV_HEADS, DIM, BLOCK)
    decode = fi.BatchDecodeWithPagedKVCacheWrapper(ws(), "HND", use_tensor_cores=True)
    decode.plan(*level(c["tables"]), *heads, sm_scale=c["scale"], **dtypes)
    cascade = fi.MultiLevelCascadeAttentionWrapper(2, ws(), "HND")
    lv0, lv1 = level(c["g_tables"]), level(c["own_tables"])
    cascade.plan(
        [c["cu_g"].cpu(), c["cu_q"].cpu()], [lv0[0], lv1[0]], [lv0[1], lv1[1]], [lv0[2], lv1[2]], *heads,
        causal=True, sm_scale=c["scale"], **dtypes,
    )  # fmt: skip
    own = fi.BatchDecodeWithPagedKVCacheWrapper(ws(), "HND", use_tensor_cores=True)
    own.plan(*lv1, *heads, sm_scale=c["scale"], **dtypes)
    pre = fi.BatchPrefillWithPagedKVCacheWrapper(ws(), "HND")
    pre.plan(c["cu_g"].cpu(), *lv0, *heads, causal=False, sm_scale=c["scale"], **dtypes)

    def two_pass():
        o, lse = own.run(q, cache, return_lse=True)
        o_pre, lse_pre = pre.run(q, cache, return_lse=True)
        fi.merge_state_in_place(o, lse, o_pre, lse_pre)
        return o

    return {
        "fi_decode": lambda: decode.run(q, cache),
        "fi_cascade": lambda: cascade.run(q, cache),
        "fi_prefix": lambda: pre.run(q, cache),
        "fi_own": lambda: own.run(q, cache),
        "fi_two_pass": two_pass,
    }


def run_case(name: str, iters: int, bandwidth: float, fa, fi=None) -> dict:
    """Check, then time every op of case `name`; floor = KV bytes / bandwidth."""
    groups, members, prefix, own_len = CASES[name]
    c = build(groups, members, prefix, own_len)
    num_seqs = groups * members
    row_bytes = KV_HEADS * DIM * 2 * 2  # K and V, bf16, one position
    kv_bytes = {
        "paged": num_seqs * (prefix + own_len) * row_bytes,
        "two_level": (groups * prefix + num_seqs * own_len) * row_bytes,
        "prefix": groups * prefix * row_bytes,
        "own": num_seqs * own_len * row_bytes,
    }
    kv_bytes["fa3_plain"], kv_bytes["fa3_two_pass"] = kv_bytes["paged"], kv_bytes["two_level"]
    kv_bytes["fused"] = kv_bytes["two_level"]
    kv_bytes["fi_decode"] = kv_bytes["paged"]
    kv_bytes["fi_cascade"] = kv_bytes["fi_two_pass"] = kv_bytes["two_level"]
    kv_bytes["fi_prefix"], kv_bytes["fi_own"] = kv_bytes["prefix"], kv_bytes["own"]
    res: dict = {"G": groups, "sd": members, "P": prefix, "S": own_len, "B": num_seqs, "ops": {}}
    fns = ours(c)
    sample = sorted({0, 1, members, num_seqs // 2, num_seqs - 1} & set(range(num_seqs)))
    ref = reference(c, sample)
    errors = {}
    for op in ("two_level", "fused", "paged"):
        fns[op]()
        torch.cuda.synchronize()
        errors[op] = (fns["_out"][sample].float() - ref).abs().max().item()
    fa_fns = fa3_calls(c, fa) if fa is not None else {}
    if fi is not None:
        try:
            fa_fns |= flashinfer_calls(c, fi)
        except Exception as e:
            res.setdefault("errors", {})["flashinfer"] = f"{type(e).__name__}: {e}"
    for op, fn in fa_fns.items():
        if op in ("fi_prefix", "fi_own"):
            continue  # one level alone: not the whole attention
        try:
            o = fn()
            o = o[0] if isinstance(o, tuple) else o
            torch.cuda.synchronize()
            errors[op] = (o[sample].float() - ref).abs().max().item()
        except Exception as e:
            res.setdefault("errors", {})[op] = f"{type(e).__name__}: {e}"
            fa_fns = {k: v for k, v in fa_fns.items() if k != op}
    res["max_abs_err_vs_fp32_reference"] = errors
    res["kernels"] = {op: kernel_info(fns[op]) for op in ("prefix", "own", "two_level", "fused")}
    for op, fn in [*((k, v) for k, v in fns.items() if not k.startswith("_")), *fa_fns.items()]:
        ms, how = time_ms(fn, iters)
        res["ops"][op] = {
            "ms": round(ms, 4),
            "kv_bytes": kv_bytes[op],
            "GB_per_s": round(kv_bytes[op] / (ms * 1e-3) / 1e9, 1),
            "floor_ms": round(kv_bytes[op] / bandwidth * 1e3, 4),
            "timing": how,
        }
    del c, fns, fa_fns
    torch.cuda.empty_cache()
    return res


def kernel_info(fn) -> dict:
    """Registers, spills, shared memory and MMA flavour of the attention kernel that fn launches last,
    and of each kernel it launches ("launches": the two levels of a decode step are two launches)."""
    seen = []
    jit = fused._attention_kernel
    original = jit.run

    def spy(*args, **kwargs):
        kernel = original(*args, **kwargs)
        seen.append(kernel)
        return kernel

    jit.run = spy
    try:
        fn()
    finally:
        jit.run = original
    if not seen:
        return {}

    def info(k) -> dict:
        ttgir = k.asm.get("ttgir", "")
        return {
            "n_regs": k.n_regs,
            "n_spills": k.n_spills,
            "shared_bytes": k.metadata.shared,
            "num_warps": k.metadata.num_warps,
            "num_stages": k.metadata.num_stages,
            "wgmma": "warp_group_dot" in ttgir,
            "mma_v2": "versionMajor = 2" in ttgir,
        }

    return {**info(seen[-1]), "launches": [info(k) for k in seen]}


def sweep(iters: int, case: str) -> list[dict]:
    """Tile configurations (CONFIG_OVERRIDE) on one case: prefix and own alone, two_level (two streams
    for decode) and fused (one launch)."""
    c = build(*CASES[case])
    fns = ours(c)
    sample = [0, 1, c["q"].shape[0] - 1]
    ref = reference(c, sample)
    rows = []
    configs = [
        {},
        {"num_stages": 2},
        {"heads_per_tile": 1},
        {"block_n_own": 128},
        {"block_n_own": 128, "num_stages": 2},
        {"block_n_pre": 32},
        {"maxnreg": 168},
        {"block_n_pre": 32, "maxnreg": 168, "block_n_own": 128},
        {"num_stages": 4},
        {"maxnreg": 128},
        {"maxnreg": 200},
        {"own_splits": 2},
        {"own_splits": 4},
        {"prefix_splits": 2},
        {"prefix_splits": 4},
        {"own_splits": 2, "prefix_splits": 2},
        {"own_splits": 2, "prefix_splits": 4},
        {"heads_per_tile": 8},
        {"block_n_own": 64},
        {"heads_per_tile": 2},
        {"block_n_pre": 128},
        {"num_warps": 8},
    ]
    for config in configs:
        row: dict = dict(config)
        for op in ("prefix", "own", "two_level", "fused"):
            with overridden(**config):
                try:
                    row[op] = round(time_ms(fns[op], iters)[0], 4)
                    if op == "two_level":
                        err = (fns["_out"][sample].float() - ref).abs().max().item()
                        row["two_level_err"] = round(err, 5)
                        info = kernel_info(fns[op])
                        row["regs"], row["spills"] = info.get("n_regs"), info.get("n_spills")
                except Exception as e:  # e.g. out of shared memory
                    row[op] = f"{type(e).__name__}: {str(e)[:80]}"
        rows.append(row)
        print(f"# sweep {json.dumps(row)}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the result here")
    ap.add_argument("--cases", default="main,sd1,p512", help=f"comma list of {', '.join(CASES)}")
    ap.add_argument("--iters", type=int, default=20, help="calls per timed graph")
    ap.add_argument("--sweep", metavar="CASE", help="also time prefix/own/two_level over tile configurations")
    ap.add_argument("--no-fa3", action="store_true")
    ap.add_argument("--no-flashinfer", action="store_true")
    for knob in KNOBS:
        ap.add_argument("--" + knob.replace("_", "-"), type=int, help="override the launch heuristic")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs CUDA"}))
        return 1
    for knob in KNOBS:
        if getattr(args, knob) is not None:
            pa.CONFIG_OVERRIDE[knob] = getattr(args, knob)
    import triton

    fa, fa_error = (None, "disabled") if args.no_fa3 else _fa3()
    fi, fi_error = (None, "disabled") if args.no_flashinfer else _flashinfer()
    t0 = time.time()
    bw = copy_bandwidth()
    bandwidth = max(bw["copy"], bw["read"])
    result: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "fa3": fa_error or "vllm.vllm_flash_attn",
        "flashinfer": fi_error or fi.__version__,
        "copy_GB_per_s": round(bw["copy"] / 1e9, 1),
        "read_GB_per_s": round(bw["read"] / 1e9, 1),
        "config_override": dict(pa.CONFIG_OVERRIDE),
        "heads": HEADS,
        "kv_heads": KV_HEADS,
        "head_dim": DIM,
        "block_size": BLOCK,
        "cases": {},
    }
    for name in filter(None, args.cases.split(",")):
        result["cases"][name] = run_case(name, args.iters, bandwidth, fa, fi)
        print(f"# {name}: {json.dumps(result['cases'][name]['ops'])}", file=sys.stderr, flush=True)
    if args.sweep:
        result["sweep"] = {"case": args.sweep, "rows": sweep(args.iters, args.sweep)}
    result["seconds"] = round(time.time() - t0, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
