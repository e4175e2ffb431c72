"""Triton compilations inside a timed region: how many, of which kernels, and the seconds they took.

A compile (or a load from Triton's disk cache) inside a timed run is time the
benchmark charges to the engine; a fresh machine has an empty cache, so the
count tells a warm-up that missed a kernel variant from a slow engine.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CompileLog:
    count: int = 0
    seconds: float = 0.0
    kernels: Counter = field(default_factory=Counter)
    variants: list[str] = field(default_factory=list)  # Triton's repr of each: warps, stages, constexprs
    _started: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seconds": round(self.seconds, 3),
            "kernels": dict(self.kernels),
            "variants": self.variants,
        }


@contextmanager
def compile_log() -> Iterator[CompileLog]:
    """Record every Triton JIT compile while the block runs (no-op where Triton has no hooks)."""
    log = CompileLog()
    try:
        from triton import knobs
    except ImportError:
        yield log
        return

    def before(*_args: Any, **kw: Any) -> bool:
        log._started = time.perf_counter()
        log.variants.append(str(kw.get("repr", "?"))[:600])
        return False  # never skip the compile

    def after(*_args: Any, **kw: Any) -> None:
        if log._started is not None:
            log.seconds += time.perf_counter() - log._started
            log._started = None
        log.count += 1
        fn = kw.get("fn")
        log.kernels[getattr(fn, "name", None) or str(kw.get("repr", "?")).split("[")[0]] += 1

    saved = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    try:
        yield log
    finally:
        knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = saved
