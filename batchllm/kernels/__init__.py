"""Attention kernels: the torch reference (``attention``) and our Triton kernels (``paged``).

Nothing here imports batchllm: kernels see tensors and index arrays. The
Triton package is imported only by the backends that use it (it needs triton).
"""

from .attention import AttentionMeta, GroupSpan, read_kvcache, store_kvcache, torch_attention

__all__ = ["AttentionMeta", "GroupSpan", "read_kvcache", "store_kvcache", "torch_attention"]
