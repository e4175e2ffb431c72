"""The native engine: ``Engine(model).generate(prompts, SamplingParams(...))``.

Names are imported on first use, so ``batchllm.engine.tokenizer`` stays usable
without loading torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchllm.engine.engine import Engine
    from batchllm.engine.outputs import ClassifyResult, EngineStats, Result
    from batchllm.engine.sampling import SamplingParams

__all__ = ["ClassifyResult", "Engine", "EngineStats", "Result", "SamplingParams"]

_WHERE = {
    "Engine": "batchllm.engine.engine",
    "SamplingParams": "batchllm.engine.sampling",
    "Result": "batchllm.engine.outputs",
    "ClassifyResult": "batchllm.engine.outputs",
    "EngineStats": "batchllm.engine.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'batchllm.engine' has no attribute {name!r}")
