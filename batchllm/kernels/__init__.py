"""Kernels: the attention torch reference (``attention``), our Triton attention (``paged``), the
elementwise kernels (``elementwise``) and the gate/up GEMM with SiLU-and-mul in its epilogue (``gate_up``).

Nothing here imports batchllm: kernels see tensors and index arrays. The
Triton package is imported only by the backends that use it (it needs triton).
"""

from .attention import AttentionMeta, GroupSpan, read_kvcache, store_kvcache, torch_attention

__all__ = ["AttentionMeta", "GroupSpan", "read_kvcache", "store_kvcache", "torch_attention"]
