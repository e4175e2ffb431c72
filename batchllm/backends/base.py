"""The backend interface: run one shard of token-id prompts for one task kind.

A backend wraps an inference engine (the native one, or vLLM) and returns
one ``Outcome`` per prompt, in input order. Per-prompt failures come back as
outcomes with ``error`` set; only a failure of the whole engine raises.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Protocol

import numpy as np

from batchllm.spec import SamplingSpec, TaskSpec

Progress = Callable[[int, int], None]
# One group of the job's plan: (shared prefix length, positions of its prompts in the shard).
GroupSpec = tuple[int, Sequence[int]]


@dataclass
class Outcome:
    """The result of one prompt, whatever the task kind (fields not produced stay None)."""

    prompt_tokens: int
    output: str | None = None
    label: str | None = None
    score: float | None = None
    label_probs: dict[str, float] | None = None
    output_tokens: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


class Backend(Protocol):
    """One loaded model on one device."""

    def __init__(self, model: str, device: str, **engine_options: Any) -> None: ...

    @staticmethod
    def supports(kind: str) -> str | None:
        """None when ``run`` accepts task ``kind``, else the reason it refuses it (no model loaded).

        Checked before a run starts, so it must say exactly what ``run`` accepts.
        """
        ...

    @staticmethod
    def check_options(options: Mapping[str, Any], device: str = "cpu") -> str | None:
        """None when the backend takes these engine options on ``device`` (the job's), else why not,
        naming the option (no model loaded)."""
        ...

    def run(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None = None,
        groups: Sequence[GroupSpec] | None = None,
    ) -> list[Outcome]:
        """Outcomes for ``prompts`` in input order; ``groups``, the job's plan for them, is run as
        given (the job plans once), else the backend groups the prompts itself."""
        ...

    def stats(self) -> dict[str, Any]:
        """Statistics of the last ``run``."""
        ...

    def close(self) -> None: ...


# Backends by name, as "module:Class": the interface names its implementations without
# importing them (they import this module, and pull in their engine when loaded).
_BACKENDS = {
    "native": "batchllm.backends.native:NativeBackend",
    "vllm": "batchllm.backends.vllm:VllmBackend",
}


def backend_class(name: str) -> type[Backend]:
    """The class of the named backend (imports its module, not yet its engine)."""
    where = _BACKENDS.get(name)
    if where is None:
        raise ValueError(f"backend: unknown backend {name!r}")
    module, _, attr = where.partition(":")
    return getattr(import_module(module), attr)


def resolve_device(device: str) -> str:
    """``auto`` means the GPU when one is visible."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_backend(name: str, model: str, device: str, **engine_options: Any) -> Backend:
    """Load ``model`` on ``device`` with the named backend (``engine_options``: the job's, passed through)."""
    return backend_class(name)(model=model, device=resolve_device(device), **engine_options)


def supports(name: str, kind: str) -> str | None:
    """None when backend ``name`` can run task ``kind``, else the reason (checked before any model load)."""
    try:
        cls = backend_class(name)
    except ValueError as exc:
        return str(exc)
    return cls.supports(kind)


def options_problem(name: str, options: Mapping[str, Any], device: str = "cpu") -> str | None:
    """None when backend ``name`` takes engine ``options`` on ``device``, else the reason (before any
    model load)."""
    return backend_class(name).check_options(options, device)
