"""The backend interface: run one shard of token-id prompts for one task kind.

A backend wraps an inference engine (the native one, vLLM later) and returns
one ``Outcome`` per prompt, in input order. Per-prompt failures come back as
outcomes with ``error`` set; only a failure of the whole engine raises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from batchllm.spec import SamplingSpec, TaskSpec

Progress = Callable[[int, int], None]


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

    def run(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None = None,
    ) -> list[Outcome]:
        """Outcomes for ``prompts`` in input order."""
        ...

    def stats(self) -> dict[str, Any]:
        """Statistics of the last ``run``."""
        ...

    def close(self) -> None: ...


def resolve_device(device: str) -> str:
    """``auto`` means the GPU when one is visible."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def create_backend(name: str, model: str, device: str) -> Backend:
    """Load ``model`` on ``device`` with the named backend."""
    if name == "native":
        from batchllm.backends.native import NativeBackend

        return NativeBackend(model=model, device=resolve_device(device))
    raise ValueError(f"backend: unknown backend {name!r}")


def supports(name: str, kind: str) -> str | None:
    """None when backend ``name`` can run task ``kind``, else the reason (checked before any model load)."""
    if name == "native":
        from batchllm.backends.native import NativeBackend

        return NativeBackend.supports(kind)
    return f"backend: unknown backend {name!r}"
