"""A run's metrics over time: steps, tokens, KV blocks in use and prompts done, sampled as the engine runs.

The engine keeps totals only (``EngineStats``); the run report wants their course.
``Timeline.watch`` observes one runner's steps (their ``BatchLayout``) for the length of
a run: each step adds two counters, and at most one sample per ``interval`` seconds also
counts the KV blocks of the step's block tables, so the step loop pays next to nothing. A long
run keeps at most ``max_samples`` samples (every other one is dropped and the
interval doubles), so the series stays small enough to store with the run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from batchllm.engine.attention.base import BatchLayout

FIELDS = ("t", "steps", "tokens", "kv_blocks", "prompts_done")


class Timeline:
    """Cumulative steps and tokens, KV blocks in use and prompts done, at times ``t`` (s since start)."""

    def __init__(self, kv_blocks_total: int, interval: float = 0.25, max_samples: int = 1000) -> None:
        self.kv_blocks_total = kv_blocks_total
        self.interval = interval
        self.max_samples = max_samples
        self.started = time.time()
        self._t0 = time.perf_counter()
        self._last = -interval
        self.steps = 0
        self.tokens = 0
        self.kv_blocks = 0
        self.prompts_done = 0
        self.samples: list[tuple[float, int, int, int, int]] = []

    def step(self, layout: BatchLayout) -> None:
        """One engine step (the runner's layout), seen as it is launched: a sample when ``interval`` has
        passed counts the steps before it (done by now) and the KV blocks this one holds; then it counts."""
        now = time.perf_counter() - self._t0
        if now - self._last >= self.interval:
            tables = layout.block_tables
            self.kv_blocks = int(np.unique(tables[tables >= 0]).size)
            self._sample(now)
        self.steps += 1
        self.tokens += layout.num_tokens

    def progress(self, done: int, total: int) -> None:
        self.prompts_done = done

    def _sample(self, now: float) -> None:
        self._last = now
        self.samples.append((round(now, 4), self.steps, self.tokens, self.kv_blocks, self.prompts_done))
        if len(self.samples) > self.max_samples:
            self.samples = self.samples[::2]
            self.interval *= 2

    def finish(self) -> None:
        """The closing sample: the run's totals, no KV held."""
        self.kv_blocks = 0
        self._sample(time.perf_counter() - self._t0)

    def as_dict(self) -> dict[str, Any]:
        """Columns by name (``FIELDS``), the start time (epoch seconds) and the KV pool size."""
        columns = list(zip(*self.samples, strict=True)) if self.samples else [() for _ in FIELDS]
        out: dict[str, Any] = {name: list(col) for name, col in zip(FIELDS, columns, strict=True)}
        return {**out, "started": self.started, "kv_blocks_total": self.kv_blocks_total}

    @contextmanager
    def watch(
        self, runner: Any, progress: Callable[[int, int], None] | None
    ) -> Iterator[Callable[[int, int], None]]:
        """Count every step the runner runs while inside; yields the progress callback to hand the engine
        (it records prompts done, then calls ``progress``)."""

        def report(done: int, total: int) -> None:
            self.progress(done, total)
            if progress is not None:
                progress(done, total)

        runner.observers.append(self.step)
        try:
            yield report
        finally:
            runner.observers.remove(self.step)
            self.finish()
