"""Attention kernels behind one backend-neutral interface (torch reference on CPU; Triton on CUDA later).

Nothing here imports batchllm: the kernels see tensors and an ``AttentionMeta``.
"""

from .attention import AttentionMeta, GroupSpan, get_attention, read_kvcache, store_kvcache

__all__ = ["AttentionMeta", "GroupSpan", "get_attention", "read_kvcache", "store_kvcache"]
