"""Typed generation on the native backend: the task's format as the engine's grammar constraint.

``check_format`` builds the grammar without a tokenizer or weights, so a
schema the grammar library refuses fails as a spec error before any model
loads. ``ConstrainedNativeBackend`` is the native backend whose generate runs
under the task's grammar (other tasks run as in the native backend).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from batchllm.backends.base import Outcome, Progress
from batchllm.backends.native import NativeBackend
from batchllm.shape import FormatSpec
from batchllm.spec import SamplingSpec, SpecError, TaskSpec

if TYPE_CHECKING:
    from batchllm.engine.grammar import Constraint

GroupSpec = tuple[int, Sequence[int]]


def constraint_of(fmt: FormatSpec) -> Constraint:
    """The engine's constraint for a format (the grammar and how to decode under it)."""
    from batchllm.engine.grammar import Constraint

    kind, source = fmt.grammar()
    return Constraint(kind, source, fmt.whitespace == "any", fmt.jump_forward)  # type: ignore[arg-type]


def check_format(spec: Any) -> None:
    """The backend runs typed output and the grammar library accepts the format (no model needed)."""
    fmt = spec.task.format
    if fmt is None:
        return
    if spec.backend != "native":
        raise SpecError(f"task.format: typed output runs on the native backend (backend is {spec.backend!r})")
    from batchllm.engine.grammar import build_grammar

    try:
        build_grammar(constraint_of(fmt))
    except ValueError as exc:
        raise SpecError(f"task.format.{fmt.kind}: the grammar cannot be built: {exc}") from None


class ConstrainedNativeBackend(NativeBackend):
    """The native engine; a generate task with ``format`` decodes under its grammar."""

    def run(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None = None,
        groups: Iterable[GroupSpec] | None = None,
    ) -> list[Outcome]:
        if task.kind != "generate" or task.format is None or not prompts:
            return super().run(prompts, task, sampling, progress=progress, groups=groups)
        from batchllm.engine import SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=tuple(sampling.stop),
        )
        engine = self._engine
        results = engine.generate(
            list(prompts), params, progress=progress, groups=groups, constraint=constraint_of(task.format)
        )
        self._stats = engine.stats.as_dict()
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
