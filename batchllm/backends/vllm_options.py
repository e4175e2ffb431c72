"""engine_options for the vllm backend, checked before any model loads: names against this vLLM's
EngineArgs, the options the job sets itself refused, and values of plain types checked (a bad value
would fail the load after minutes of start-up)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


def engine_args_fields() -> set[str]:
    from vllm.engine.arg_utils import EngineArgs

    return {f.name for f in dataclasses.fields(EngineArgs)}


# options the job sets itself: the model folder, and how tokens come in and out
OWNED = {
    "model": "its 'model' field",
    "tokenizer": "the model folder's",
    "skip_tokenizer_init": "the backend",
}


def option_value_problem(options: Mapping[str, Any], args_class: type) -> str | None:
    """A value of the wrong type for its EngineArgs field (plain types, their optionals and Literals;
    others are left to vLLM), named before any model loads: a bad value would fail the load after
    minutes of start-up."""
    try:
        hints = typing.get_type_hints(args_class)
    except Exception:  # introspection only: a hint this Python cannot resolve
        return None
    for name, value in options.items():
        hint = hints.get(name)
        literal = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else None
        if literal is not None and value not in literal:
            return f"engine_options.{name}: one of {list(literal)}, got {value!r}"
        members = (
            typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        )
        if not all(m in SIMPLE for m in members):
            continue
        ok = tuple(t for m in members for t in SIMPLE[m])
        if not isinstance(value, ok) or (isinstance(value, bool) and bool not in members):
            names = " or ".join("null" if m is type(None) else m.__name__ for m in members)
            return f"engine_options.{name}: expects {names}, got {value!r}"
    return None


SIMPLE: dict[Any, tuple[type, ...]] = {
    int: (int,),
    float: (int, float),
    bool: (bool,),
    str: (str,),
    type(None): (type(None),),
}


def options_problem(options: Mapping[str, Any]) -> str | None:
    """What is wrong with the options (``feed`` is the backend's own, a bool), or None."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    fields = engine_args_fields() | {"feed"}
    if unknown := sorted(k for k in options if k not in fields):
        return f"engine_options: this vLLM ({vllm.__version__}) has no option {unknown}"
    if owned := sorted(OWNED.keys() & options.keys()):
        return f"engine_options.{owned[0]}: set by the job ({OWNED[owned[0]]}), not an engine option"
    if not isinstance(options.get("feed", True), bool):
        return f"engine_options.feed: must be true or false, got {options['feed']!r}"
    return option_value_problem({k: v for k, v in options.items() if k != "feed"}, EngineArgs)
