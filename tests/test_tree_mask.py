"""The tree (multi-item) mask of the Triton attention kernels against the torch reference.

Tree sequences come from prefill-only scoring: a shared trunk, then packed
items, each followed by the label nodes of multi-token labels; key k is seen by
query q only when k <= q < key_ends[k]. The layouts here are built by
``packing.build_unit`` (the engine's own units) with random item lengths, cut
into chunks, mixed with plain sequences and grouped behind shared prefixes, and
run through ``paged_attention`` / ``two_level_attention`` and the Triton
backend; ``batchllm/kernels/attention.py``'s ``torch_attention`` is the reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set
by conftest.py) at tiny sizes; the ``gpu`` tests run the same checks at real
sizes in bf16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pytest
import torch

pytest.importorskip("triton")

from batchllm.engine.labels import LabelSet
from batchllm.engine.packing import NO_END, build_unit
from batchllm.kernels import AttentionMeta, GroupSpan
from batchllm.kernels import paged as pa
from batchllm.kernels.attention import torch_attention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# depth-first label trie: nodes (1,) (1, 2) (4,) with subtrees of 2, 1 and 1 nodes
LABELS = LabelSet.from_token_ids(["a", "b", "c", "d"], [[1, 2, 3], [1, 5], [4, 6], [7]])
NO_NODES = LabelSet.from_token_ids(["x", "y"], [[1], [2]])


@dataclass
class Spec:
    """One sequence of a step: a unit (trunk, then items with or without label nodes), and its chunk.

    The step computes the queries [kv_len - q_len, kv_len) with kv_len = unit length - cut.
    group >= 0: the sequence shares the group's prefix blocks (its trunk starts with them).
    """

    trunk: int
    items: tuple[int, ...]
    nodes: bool
    q_len: int | None = None  # None: every position after the group's prefix
    cut: int = 0
    group: int = -1


@dataclass
class Step:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cu_q: torch.Tensor
    kv_lens: torch.Tensor
    tables: torch.Tensor
    start_pos: torch.Tensor
    cu_g: torch.Tensor
    g_lens: torch.Tensor
    g_tables: torch.Tensor
    key_ends: np.ndarray
    tree: list[bool]
    q_lens: list[int]
    kv_host: list[int]
    groups: tuple[GroupSpan, ...]
    scale: float


def _key_ends(spec: Spec) -> np.ndarray | None:
    """The unit's key ends (None: a plain prompt), from the engine's own unit builder."""
    trunk = np.arange(spec.trunk) + 10
    items = [(i, np.arange(n) + 100 * (i + 1)) for i, n in enumerate(spec.items)]
    return build_unit(trunk, items, LABELS if spec.nodes else NO_NODES).key_ends


def build_step(
    specs: list[Spec],
    prefixes: list[int],
    *,
    kv_heads: int = 2,
    g: int = 4,
    dim: int = 32,
    block: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Step:
    """Plain (ungrouped) sequences first, then the groups' members contiguously, as the scheduler emits."""
    assert all(p % block == 0 for p in prefixes)
    gen = torch.Generator().manual_seed(seed)
    order = sorted(range(len(specs)), key=lambda i: (specs[i].group, i))
    specs = [specs[i] for i in order]
    ends, kv_lens, q_lens, starts = [], [], [], []
    for s in specs:
        e = _key_ends(s)
        length = s.trunk + sum(s.items) + (LABELS.num_nodes * len(s.items) if s.nodes else 0)
        kv = length - s.cut
        start = prefixes[s.group] if s.group >= 0 else 0
        assert s.trunk >= start and kv > start
        q_len = kv - start if s.q_len is None else s.q_len
        assert 0 < q_len <= kv - start
        ends.append(e[:kv] if e is not None else np.full(kv, NO_END, np.int32))
        kv_lens.append(kv)
        q_lens.append(q_len)
        starts.append(start)
    num_blocks = sum(-(-kv // block) for kv in kv_lens) + sum(p // block for p in prefixes) + 2
    k_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=gen)
    v_cache = torch.randn(num_blocks, kv_heads, block, dim, generator=gen)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    prefix_blocks = [[free.pop() for _ in range(p // block)] for p in prefixes]
    tables = []
    for s, kv in zip(specs, kv_lens, strict=True):
        shared = prefix_blocks[s.group] if s.group >= 0 else []
        tables.append(shared + [free.pop() for _ in range(-(-kv // block) - len(shared))])
    width = max(len(t) for t in tables) + 1
    cu = np.concatenate([[0], np.cumsum(q_lens)])
    # groups: each run of members; plain sequences come first and are no group
    group_ids = [s.group for s in specs]
    firsts = [i for i, grp in enumerate(group_ids) if grp >= 0 and (i == 0 or group_ids[i - 1] != grp)]
    bounds = [*firsts, len(specs)]
    groups = tuple(GroupSpan(a, b, prefixes[group_ids[a]]) for a, b in pairwise(bounds))
    g_width = max([p // block for p in prefixes] + [0]) + 1
    g_tables = [prefix_blocks[group_ids[a]] for a in firsts]
    q = torch.randn(int(cu[-1]), kv_heads * g, dim, generator=gen)

    def i32(x) -> torch.Tensor:
        return torch.tensor(np.asarray(x), dtype=torch.int32, device=DEVICE)

    return Step(
        q=q.to(DEVICE, dtype),
        k_cache=k_cache.to(DEVICE, dtype),
        v_cache=v_cache.to(DEVICE, dtype),
        cu_q=i32(cu),
        kv_lens=i32(kv_lens),
        tables=i32([t + [-1] * (width - len(t)) for t in tables]),
        start_pos=i32(starts),
        cu_g=i32(cu[bounds] if firsts else [0]),
        g_lens=i32([prefixes[group_ids[a]] for a in firsts]),
        g_tables=i32([t + [-1] * (g_width - len(t)) for t in g_tables]).reshape(len(firsts), g_width),
        key_ends=np.concatenate(ends).astype(np.int32),
        tree=[_key_ends(s) is not None for s in specs],
        q_lens=q_lens,
        kv_host=kv_lens,
        groups=groups,
        scale=1 / math.sqrt(dim),
    )


def reference(st: Step) -> torch.Tensor:
    meta = AttentionMeta(
        slot_mapping=torch.zeros(st.q.shape[0], dtype=torch.int64, device=DEVICE),
        cu_seqlens_q=st.cu_q,
        kv_lens=st.kv_lens,
        block_tables=st.tables,
        groups=st.groups,
        q_lens_host=st.q_lens,
        kv_lens_host=st.kv_host,
        tree_host=st.tree,
        key_ends_host=st.key_ends,
    )
    return torch_attention(st.q.float(), st.k_cache.float(), st.v_cache.float(), meta, st.scale)


def run_kernel(st: Step, *, max_q_len: int | None = None, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton launch the backend makes: fused two-level with groups, else paged attention."""
    offsets, open_ends = pa.tree_bounds(st.key_ends, np.array(st.kv_host), st.start_pos.cpu().numpy())
    tree = {
        "key_ends": torch.from_numpy(st.key_ends).to(DEVICE),
        "key_offsets": torch.from_numpy(offsets).to(DEVICE),
        "open_ends": torch.from_numpy(open_ends).to(DEVICE),
    }
    mq = max(st.q_lens) if max_q_len is None else max_q_len
    out = torch.full_like(st.q, float("nan"))
    lse = torch.full(st.q.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)
    if not st.groups:
        splits = kw.pop("own_splits", None)
        pa.paged_attention(
            st.q, st.k_cache, st.v_cache, st.cu_q, st.kv_lens, st.tables, None, st.scale, mq,
            num_splits=splits, out=out, lse=lse, **tree, **kw,
        )  # fmt: skip
    else:
        pa.two_level_attention(
            st.q, st.k_cache, st.v_cache, st.cu_q, st.kv_lens, st.tables, st.start_pos,
            st.cu_g, st.g_lens, st.g_tables, st.scale, mq,
            max_group_rows=int(max([*torch.diff(st.cu_g).tolist(), 1])), out=out, lse=lse, **tree, **kw,
        )  # fmt: skip
    return out, lse


def check(st: Step, tol: float, **kw) -> None:
    out, lse = run_kernel(st, **kw)
    ref = reference(st)
    assert torch.isfinite(lse).all(), "every query sees at least itself"
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def _tol(dtype: torch.dtype) -> float:
    return 2e-2 if dtype in (torch.bfloat16, torch.float16) else (1e-4 if CUDA else 2e-5)


def random_specs(
    rng: np.random.Generator, n: int, prefixes: list[int], block: int, max_item: int
) -> list[Spec]:
    """n sequences: packs of 1-4 items with or without nodes, plain prompts, whole units and cut chunks."""
    specs = []
    for _ in range(n):
        group = int(rng.integers(-1, len(prefixes))) if prefixes else -1
        base = prefixes[group] if group >= 0 else 0
        trunk = base + int(rng.integers(0 if base else 1, block))  # a trunk tail past the shared blocks
        items = tuple(int(x) for x in rng.integers(1, max_item + 1, int(rng.integers(1, 5))))
        nodes = bool(rng.integers(0, 2))
        length = trunk + sum(items) + (LABELS.num_nodes * len(items) if nodes else 0)
        cut = int(rng.integers(0, max(1, (length - trunk) // 2))) if rng.integers(0, 3) == 0 else 0
        own = length - cut - base
        q_len = None if rng.integers(0, 2) else int(rng.integers(1, own + 1))
        specs.append(Spec(trunk, items, nodes, q_len, cut, group))
    return specs


# --------------------------------------------------------------------------- host bounds


def test_tree_bounds() -> None:
    big = NO_END
    # seq 0: plain (3 keys); seq 1: trunk of 2, item [2, 4), item [4, 6); seq 2: grouped, prefix 2
    ends = np.array([big] * 3 + [big, big, 4, 4, 6, 6] + [big, big, 5, 5, 5], dtype=np.int32)
    offsets, open_ends = pa.tree_bounds(ends, np.array([3, 6, 5]), np.array([0, 0, 2]))
    assert offsets.tolist() == [0, 3, 9] and open_ends.tolist() == [3, 2, 5]
    hidden = ends.copy()
    hidden[10] = 3  # a prefix key of the grouped sequence that its last query does not see
    with pytest.raises(ValueError, match="shared prefix must be seen by every member query"):
        pa.tree_bounds(hidden, np.array([3, 6, 5]), np.array([0, 0, 2]))
    with pytest.raises(ValueError, match="key_ends: 14 entries"):
        pa.tree_bounds(ends, np.array([3, 6, 6]))


# --------------------------------------------------------------------------- kernels, interpreter sizes


CASES = {
    # a pack of items of varying lengths with label nodes after a trunk, computed whole
    "pack-nodes": ([Spec(5, (7, 3, 12), True)], []),
    # several sequences in one launch: tree and plain, whole units and chunks cut mid-pack
    "mixed": (
        [
            Spec(3, (9,), False, q_len=4),  # a plain prompt (no mask)
            Spec(6, (4, 11, 2), False, cut=5),  # packed, no nodes, chunk ends inside an item
            Spec(2, (13,), True, q_len=9),  # one item with nodes (whole-label scoring)
            Spec(4, (5, 6), True, q_len=3, cut=2),  # a short chunk inside the last item's nodes
        ],
        [],
    ),
    # groups with a shared prefix: tree members (and a plain one) behind it, plus plain sequences
    "groups": (
        [
            Spec(16 + 3, (6, 9, 4), True, group=0),
            Spec(16, (8,), False, group=0),
            Spec(16 + 5, (10, 2), False, q_len=7, group=0),
            Spec(32 + 1, (5, 5, 5), True, cut=3, group=1),
            Spec(3, (7, 2), True),
        ],
        [16, 32],
    ),
}


@pytest.mark.parametrize(("g", "dim"), [(4, 64), (1, 128)])
@pytest.mark.parametrize("name", list(CASES))
def test_tree_mask_matches_the_reference(name: str, g: int, dim: int) -> None:
    specs, prefixes = CASES[name]
    st = build_step(specs, prefixes, g=g, dim=dim, kv_heads=2 if g > 1 else 3, seed=1)
    check(st, _tol(torch.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_tree_layouts(seed: int) -> None:
    rng = np.random.default_rng(seed)
    prefixes = [16 * int(rng.integers(1, 3)) for _ in range(int(rng.integers(0, 3)))]
    specs = random_specs(rng, 5, prefixes, block=16, max_item=14)
    st = build_step(specs, prefixes, g=int(rng.choice([1, 4])), dim=32, seed=seed)
    check(st, _tol(torch.float32))


@pytest.mark.parametrize("own_splits", [2, 3])
def test_tree_mask_with_key_splits(own_splits: int) -> None:
    """Short chunks (max_q_len <= 16) may take key splits: each split masks its own keys."""
    specs = [Spec(4, (9, 6, 8), True, q_len=5), Spec(16 + 2, (7, 10), True, q_len=3, group=0)]
    st = build_step(specs, [16], g=4, dim=32, seed=3)
    check(st, _tol(torch.float32), own_splits=own_splits)


def test_tree_mask_in_decode_tiles() -> None:
    """One query per tree sequence (the last token of a chunked pack): decode tiles (several kv heads
    per tile, one masked loop), and max_q_len understated for a longer chunk (a program loops its tiles)."""
    specs = [
        Spec(3, (6, 5), True, q_len=1),
        Spec(2, (4, 9, 3), False, q_len=1, cut=4),
        Spec(5, (8,), True, q_len=1),
    ]
    st = build_step(specs, [], kv_heads=4, g=2, dim=32, seed=4)
    check(st, _tol(torch.float32))
    specs[1] = Spec(2, (4, 9, 3), False, q_len=6, cut=4)
    st = build_step(specs, [], kv_heads=4, g=2, dim=32, seed=4)
    check(st, _tol(torch.float32), max_q_len=1)


def test_tree_mask_half_precision() -> None:
    """bf16 on CUDA; fp16 in the interpreter (its tl.dot reads bf16 bits as integers)."""
    dtype = torch.bfloat16 if CUDA else torch.float16
    specs, prefixes = CASES["groups"]
    st = build_step(specs, prefixes, g=4, dim=64, dtype=dtype, seed=5)
    check(st, _tol(dtype))


def test_steps_without_a_tree_take_the_plain_kernel() -> None:
    """Key ends that hide nothing (no tree sequence in the step) give the plain kernel's result."""
    specs = [Spec(3, (9,), False, q_len=4), Spec(16, (8,), False, group=0)]
    st = build_step(specs, [16], g=4, dim=32, seed=6)
    assert not any(st.tree)
    out, lse = run_kernel(st)
    plain_out = torch.full_like(st.q, float("nan"))
    plain_lse = torch.full(st.q.shape[:2], float("nan"), dtype=torch.float32, device=DEVICE)
    pa.two_level_attention(
        st.q, st.k_cache, st.v_cache, st.cu_q, st.kv_lens, st.tables, st.start_pos,
        st.cu_g, st.g_lens, st.g_tables, st.scale, max(st.q_lens), out=plain_out, lse=plain_lse,
    )  # fmt: skip
    torch.testing.assert_close(out, plain_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, plain_lse, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block_n", [16, 64])
def test_earlier_items_are_never_read(block_n: int) -> None:
    """A chunk of a pack's last item and its label nodes: the keys of the earlier items (NaN here) are
    skipped from their key ends alone, never loaded; narrow key steps too (block_n 16)."""
    specs = [
        Spec(3, (21, 34, 9, 17), True, q_len=17 + 3),
        Spec(16 + 1, (18, 25, 12), False, q_len=12, group=0),
    ]
    st = build_step(specs, [16], g=4, dim=32, seed=7)
    ref = reference(st)
    bs = st.k_cache.shape[2]
    # the plain pack's keys of items 0-2 and their nodes, the grouped pack's items 0-1
    for q_len, (lo, hi) in ((20, (3, 3 + 21 + 3 + 34 + 3 + 9 + 3)), (12, (17, 17 + 18 + 25))):
        i = st.q_lens.index(q_len)
        pos = torch.arange(lo, hi, device=DEVICE)
        blocks = st.tables[i].long()[pos // bs]
        st.k_cache[blocks, :, pos % bs] = float("nan")
        st.v_cache[blocks, :, pos % bs] = float("nan")
    pa.CONFIG_OVERRIDE["block_n"] = block_n
    try:
        out, lse = run_kernel(st)
    finally:
        pa.CONFIG_OVERRIDE.pop("block_n")
    assert torch.isfinite(lse).all()
    torch.testing.assert_close(out, ref, rtol=_tol(torch.float32), atol=_tol(torch.float32))


# --------------------------------------------------------------------------- the engine


def test_engine_packed_and_label_scores_on_triton_equal_torch(tmp_path) -> None:
    """Packed scoring and whole-label scoring of multi-token labels with attention='triton' (interpreted
    on CPU) give the torch backend's probabilities; 4-token blocks and a 64-token step budget cut packs
    into chunks."""
    from batchllm.engine import Engine
    from bench.gpu_check import build_model, workload

    build_model(tmp_path)
    prompts = workload(2, 2, 8, 512, seed=3)
    labels = LabelSet.from_token_ids(["a", "b", "c", "d"], [[5, 6, 7], [5, 8], [9, 10], [11]])
    probs = {}
    for attention in ("torch", "triton"):
        engine = Engine(
            tmp_path, attention=attention, kv_cache_tokens=1024, block_size=4, max_num_batched_tokens=64
        )
        for mode, pack in (("packed", True), ("members", False)):
            results = engine.classify(prompts, labels, pack=pack)
            assert all(r.ok for r in results)
            probs[attention, mode] = [list(r.probs.values()) for r in results]
            if pack:
                assert engine.stats.packs >= 2
            assert engine.stats.label_tokens_computed > 0
    for mode in ("packed", "members"):
        for got, want in zip(probs["triton", mode], probs["torch", mode], strict=True):
            assert got == pytest.approx(want, abs=1e-4)


# --------------------------------------------------------------------------- GPU, real sizes

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(
    ("g", "kv_heads", "dim", "dtype"),
    [
        (4, 8, 128, torch.bfloat16),
        (1, 16, 128, torch.bfloat16),
        (4, 4, 64, torch.bfloat16),
        (4, 2, 128, torch.float32),
        (1, 4, 64, torch.float32),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_random_tree_layouts(g: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int) -> None:
    """Packs of up to 4 items of up to 400 tokens behind 512- and 1024-token group prefixes, plain
    prompts and chunks cut mid-pack, 16 sequences in one launch."""
    rng = np.random.default_rng(100 + seed)
    prefixes = [512, 1024]
    specs = random_specs(rng, 16, prefixes, block=16, max_item=400)
    st = build_step(specs, prefixes, kv_heads=kv_heads, g=g, dim=dim, dtype=dtype, seed=seed)
    check(st, _tol(dtype))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_packs_without_groups_and_short_chunks(dtype: torch.dtype) -> None:
    """The plain-path launch (no group): 2048-token packs whole, with key splits on short chunks,
    and one-token chunks (decode tiles)."""
    rng = np.random.default_rng(7)
    specs = [Spec(300, tuple(int(x) for x in rng.integers(50, 500, 4)), bool(i % 2)) for i in range(6)]
    specs += [Spec(200, (700, 900), True, q_len=9, cut=100), Spec(100, (60,), False, q_len=1)]
    st = build_step(specs, [], kv_heads=8, g=4, dim=128, dtype=dtype, seed=8)
    check(st, _tol(dtype))
    short = build_step(specs[6:], [], kv_heads=8, g=4, dim=128, dtype=dtype, seed=9)
    check(short, _tol(dtype))
    check(short, _tol(dtype), own_splits=4)
    ones = [Spec(100, (300, 200, 250), True, q_len=1, cut=k) for k in (0, 1, 5, 200)]
    check(build_step(ones, [], kv_heads=8, g=4, dim=128, dtype=dtype, seed=10), _tol(dtype))


@pytest.mark.gpu
@needs_cuda
def test_gpu_tree_launch_skips_other_items() -> None:
    """A step of 8 packs of 4 x 480-token items behind a 1024-token prefix: the tree launch reads each
    item's own keys only, so it takes less time than the plain kernel's causal attention over the
    same keys (about 0.65x the work)."""
    specs = [Spec(1024, (480, 480, 480, 480), True, group=0) for _ in range(8)]
    st = build_step(specs, [1024], kv_heads=8, g=4, dim=128, dtype=torch.bfloat16, seed=11)
    check(st, _tol(torch.bfloat16))
    offsets, open_ends = pa.tree_bounds(st.key_ends, np.array(st.kv_host), st.start_pos.cpu().numpy())
    tree = {
        "key_ends": torch.from_numpy(st.key_ends).to(DEVICE),
        "key_offsets": torch.from_numpy(offsets).to(DEVICE),
        "open_ends": torch.from_numpy(open_ends).to(DEVICE),
    }
    out, workspace = torch.empty_like(st.q), {}
    rows = int(max(torch.diff(st.cu_g).tolist()))

    def time_ms(**kw) -> float:
        def launch() -> None:
            pa.two_level_attention(
                st.q, st.k_cache, st.v_cache, st.cu_q, st.kv_lens, st.tables, st.start_pos,
                st.cu_g, st.g_lens, st.g_tables, st.scale, max(st.q_lens),
                max_group_rows=rows, out=out, workspace=workspace, **kw,
            )  # fmt: skip

        for _ in range(3):
            launch()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            launch()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 20

    tree_ms, causal_ms = time_ms(**tree), time_ms()
    print(f"tree {tree_ms:.3f} ms, plain causal {causal_ms:.3f} ms")
    assert tree_ms < causal_ms


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("dtype", "tol", "mean_tol"), [("float32", 1e-4, 1e-5), ("bfloat16", 0.1, 1e-2)])
def test_gpu_engine_packed_and_label_scores_equal_torch(
    tmp_path, dtype: str, tol: float, mean_tol: float
) -> None:
    """The engine on CUDA: packed and per-member multi-token label scores, triton against torch (bf16:
    the two round differently, so a loose bound on the worst row and a tight one on the mean)."""
    from batchllm.engine import Engine
    from bench.gpu_check import build_model, workload

    build_model(tmp_path)
    rng = np.random.default_rng(12)
    prompts = [
        p + rng.integers(3, 512, int(rng.integers(0, 300))).tolist() for p in workload(4, 16, 256, 512)
    ]
    labels = LabelSet.from_token_ids(["a", "b", "c", "d"], [[5, 6, 7], [5, 8], [9, 10], [11]])
    probs = {}
    for attention in ("torch", "triton"):
        engine = Engine(
            tmp_path, device="cuda", dtype=dtype, attention=attention, kv_cache_tokens=65536,
            max_num_batched_tokens=2048,
        )  # fmt: skip
        for pack in (True, False):
            results = engine.classify(prompts, labels, pack=pack)
            assert all(r.ok for r in results)
            probs[attention, pack] = np.array([list(r.probs.values()) for r in results])
            if pack:
                assert engine.stats.packs >= 4
    for pack in (True, False):
        diff = np.abs(probs["triton", pack] - probs["torch", pack])
        assert diff.max() < tol and diff.mean() < mean_tol, (pack, diff.max(), diff.mean())
