"""Inference backends behind one interface (``Backend``): native (default) and vllm (optional extra)."""

from batchllm.backends.base import Backend, Outcome, create_backend, resolve_device, supports

__all__ = ["Backend", "Outcome", "create_backend", "resolve_device", "supports"]
