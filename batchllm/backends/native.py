"""The native engine as a Backend: token-id prompts in, Outcomes out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from batchllm.backends.base import Outcome, Progress
from batchllm.spec import SamplingSpec, TaskSpec


class NativeBackend:
    """batchllm's embedded engine on CPU or CUDA; prefix sharing is planned inside the engine."""

    def __init__(self, model: str, device: str) -> None:
        from batchllm.engine import Engine

        self._engine = Engine(model, device=device)
        self._stats: dict[str, Any] = {}

    @staticmethod
    def supports(kind: str) -> str | None:
        from batchllm.engine import Engine

        if not callable(getattr(Engine, kind, None)):
            return f"task.kind: {kind!r} is not supported by the native engine yet"
        return None

    def run(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None = None,
    ) -> list[Outcome]:
        if not prompts:
            return []
        if task.kind == "generate":
            out = self._generate(prompts, sampling, progress)
        elif task.kind == "classify":
            out = self._classify(prompts, list(task.labels or []), progress)
        else:
            raise ValueError(f"task.kind: {task.kind!r} is not supported by the native engine yet")
        self._stats = self._engine.stats.as_dict()
        return out

    def _generate(
        self, prompts: Sequence[np.ndarray], sampling: SamplingSpec, progress: Progress | None
    ) -> list[Outcome]:
        from batchllm.engine import SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=tuple(sampling.stop),
        )
        results = self._engine.generate(list(prompts), params, progress=progress)
        return [
            Outcome(
                prompt_tokens=r.prompt_tokens,
                output=None if r.error else r.text,
                output_tokens=len(r.token_ids),
                cached_tokens=r.cached_tokens,
                finish_reason=r.finish_reason,
                error=r.error,
            )
            for r in results
        ]

    def _classify(
        self, prompts: Sequence[np.ndarray], labels: list[str], progress: Progress | None
    ) -> list[Outcome]:
        results = self._engine.classify(list(prompts), labels, progress=progress)
        return [
            Outcome(
                prompt_tokens=r.prompt_tokens,
                label=None if r.error else r.label,
                score=None if r.error or r.label is None else float(r.probs.get(r.label, 0.0)),
                label_probs=None if r.error else {k: float(v) for k, v in r.probs.items()},
                cached_tokens=r.cached_tokens,
                finish_reason="error" if r.error else "stop",
                error=r.error,
            )
            for r in results
        ]

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def close(self) -> None:
        self._engine = None  # type: ignore[assignment]
