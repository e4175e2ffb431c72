"""Triton kernels for paged attention with two-level (shared-prefix) attention.

Layout (the same as batchllm/kernels/attention.py, the torch reference):

- q [num_tokens, num_heads, head_dim]: the new tokens of B sequences back to
  back; sequence i owns rows cu_seqlens_q[i]:cu_seqlens_q[i+1], at positions
  kv_lens[i] - q_len_i .. kv_lens[i] - 1 (causal: a query sees keys at
  positions <= its own).
- k_cache, v_cache [num_blocks, num_kv_heads, block_size, head_dim], head major
  inside a block; block_tables [B, max_blocks] int32 (-1 unused);
  slot = block_id * block_size + offset.
- GQA: num_heads = num_kv_heads * g. A tile holds BLOCK_M = (query tokens) x
  (the g heads of one kv head) rows, so each K/V tile is loaded once for all g
  heads of its kv head.
- lse: natural-log log-sum-exp of the scaled scores, float32
  [num_tokens, num_heads], -inf where a row saw no key.

Kernels:

- ``store_kv``: new keys/values into their slots (slot -1 = skip).
- ``paged_attention``: each sequence's queries against its keys at positions
  [start_pos[i], kv_lens[i]), causal; ragged batches of prefill chunks and
  decode rows; split-KV (partial results + a reduce) when few tiles would not
  fill the GPU.
- ``prefix_attention``: the shared level of two-level attention: every row of
  group j attends, unmasked, to the group's prefix keys [0, prefix_len_j); the
  prefix is read once per (group, kv head, tile of up to 64 rows), not once
  per member (decode, GQA 4: 16 members x 4 heads = one tile).
- ``merge_attention``: combine two partial results through their lse.
- ``two_level_attention``: both levels in one launch (prefix programs first,
  then per-sequence programs), or for decode as two launches on two streams
  (each kernel with its own registers); partial results into a workspace,
  then one reduce launch.
- Tree sequences (prefill-only scoring: packed items, label nodes): with
  ``key_ends`` (and ``tree_bounds``' offsets and open ends) the own level also
  hides key k from queries at or past key_ends[k]; a separate kernel variant,
  so steps without a tree sequence run the plain kernel.

All launchers are free of host synchronisation: grids depend on tensor shapes
and host integers only, so they can be captured in a CUDA graph once the
kernels are compiled (run them once before capture).

Modules: store (store_kv); tiles (the inner loop and the tile helpers);
prefix and own (the programs of the two levels); fused (the one attention
kernel over both levels, and the reduce); merge (merge_attention);
heuristics (tile sizes, splits, CONFIG_OVERRIDE); tree (host bounds of the
tree mask); launch (one launch of the
fused kernel and the reduce); api (the public attention launchers);
interpreter (a fix for Triton's interpreter, applied under TRITON_INTERPRET=1).
"""

from .api import paged_attention, prefix_attention, two_level_attention
from .heuristics import CONFIG_OVERRIDE
from .interpreter import patch_if_interpreted
from .merge import merge_attention
from .store import store_kv
from .tree import tree_bounds

patch_if_interpreted()

__all__ = [
    "CONFIG_OVERRIDE",
    "merge_attention",
    "paged_attention",
    "prefix_attention",
    "store_kv",
    "tree_bounds",
    "two_level_attention",
]
