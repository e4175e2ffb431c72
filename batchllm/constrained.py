"""Typed generation on the native backend: the task's format as the engine's grammar constraint.

``check_format`` builds the grammar without a tokenizer or weights, so a
schema the grammar library refuses fails as a spec error before any model
loads; ``constraint_of`` is what the native backend hands its engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchllm.shape import FormatSpec
from batchllm.spec import SpecError

if TYPE_CHECKING:
    from batchllm.engine.grammar import Constraint


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
