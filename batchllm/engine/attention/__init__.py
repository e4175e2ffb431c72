"""Attention backends as registered objects, chosen by name and device.

``torch``: the reference (plain torch, float32 math; CPU and CUDA).
``triton``: our Triton kernels (paged prefill/decode, two-level attention;
CUDA, or CPU under TRITON_INTERPRET=1 for tests).
``cpu``: two-level attention on torch's fused CPU attention kernel (CPU only).
``flashinfer``: FlashInfer's paged prefill kernels, two-level by two launches and
its merge (CUDA, bf16/fp16, where flashinfer-python is installed).
``fa3``: vLLM's bundled FlashAttention-3 for prefill steps, triton for decode
(Hopper, bf16/fp16, where vLLM is installed): the bar for our prefill kernels.
``auto`` picks cpu on CPU; on CUDA fa3 where it runs (Hopper, bf16/fp16, vLLM
importable: its prefill ran (a) 20.3 s against 21.6-22.7 s on triton at 205k KV,
bench/RESULTS.md 2026-12-04), else triton. Backends are imported when chosen, so
triton and vLLM stay optional.
"""

from __future__ import annotations

import os
from importlib import import_module

import torch

from batchllm.engine.attention.base import (
    AttentionBackend,
    BatchLayout,
    KVShape,
    fa3_missing,
    to_device,
)

_MODULES = {
    "torch": "batchllm.engine.attention.torch_ref",
    "triton": "batchllm.engine.attention.triton",
    "cpu": "batchllm.engine.attention.cpu",
    "flashinfer": "batchllm.engine.attention.flashinfer",
    "fa3": "batchllm.engine.attention.fa3",
}
BACKENDS = ("auto", *_MODULES)
CUDA_ONLY = ("flashinfer", "fa3")  # library kernels without CPU paths (base.require_cuda_half)


def backend_problem(name: object, device_type: str) -> str | None:
    """None when ``name`` is a backend that can run on ``device_type`` ('cpu' or 'cuda'), else why not
    (no torch needed: a job checks its engine_options with it before any model work)."""
    if name not in BACKENDS:
        return f"attention: must be one of {', '.join(BACKENDS)}, got {name!r}"
    if name in CUDA_ONLY and device_type != "cuda":
        return f"attention: backend {name!r} runs on CUDA only, the device is {device_type!r}"
    return None


def resolve_name(name: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The backend a name means on a device for a KV dtype ('auto': cpu on CPU; fa3 or triton on CUDA)."""
    if name not in BACKENDS:  # a CUDA-only name on the CPU fails where its pool is made (create_backend)
        raise ValueError(backend_problem(name, device.type))
    if name != "auto":
        return name
    if device.type != "cuda":
        return "cpu"
    half = dtype in (torch.bfloat16, torch.float16)
    return "fa3" if half and fa3_missing(device) is None else "triton"


def create_backend(name: str, shape: KVShape, storage: torch.Tensor | None = None) -> AttentionBackend:
    """A backend instance owning a KV pool of ``shape`` (laid over ``storage`` when given)."""
    name = resolve_name(name, shape.device, shape.dtype)
    if name == "cpu" and shape.device.type != "cpu":
        raise ValueError(f"attention: backend 'cpu' runs on the CPU only, not {shape.device.type!r}")
    if name == "triton" and shape.device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton on CPU: its interpreter (tests, CI)
    module = import_module(_MODULES[name])
    return module.BACKEND(shape, storage)


__all__ = [
    "BACKENDS",
    "CUDA_ONLY",
    "AttentionBackend",
    "BatchLayout",
    "KVShape",
    "backend_problem",
    "create_backend",
    "resolve_name",
    "to_device",
]
