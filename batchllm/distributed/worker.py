"""The engine actor: one loaded model on one device (a GPU, or a CPU slot), running shards.

The model loads once per actor, when the actor starts, and serves every shard
the actor is given; ``infer_shard`` runs each one with the shard's own groups, so
an actor computes each prefix of its shards once. The actor is threaded
(``max_concurrency=4``): ``poll`` answers while ``run`` computes, with the
shard's progress and the log lines written since the last poll, which the
flow forwards to Prefect. Nothing here writes to the warehouse.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any

import numpy as np

from batchllm.backends.base import Backend, GroupSpec, Outcome
from batchllm.faults import pause_point
from batchllm.spec import JobSpec

_MAX_LOG_LINES = 2000  # kept between polls; older lines are dropped (and counted)


class _Lines(logging.Handler):
    """Log records of this process as text lines, for the next ``poll``."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=_MAX_LOG_LINES)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING or record.name.startswith("batchllm"):
            self.lines.append(self.format(record))

    def drain(self) -> list[str]:
        out = []
        while self.lines:
            out.append(self.lines.popleft())
        return out


class ShardWorker:
    """Runs shards of one job on the engine it loads at start (wrapped by ``ray.remote`` in pool.py)."""

    def __init__(self, spec: JobSpec, index: int) -> None:
        self.spec = spec
        self.index = index
        self.log = logging.getLogger("batchllm.actor")
        self._lines = _Lines()
        root = logging.getLogger()
        root.addHandler(self._lines)
        root.setLevel(min(root.level or logging.WARNING, logging.INFO))
        logging.captureWarnings(True)
        self._backend: Backend | None = None
        self._load_s = 0.0
        self._loaded = threading.Event()
        self._lock = threading.Lock()
        self._shard: int | None = None
        self._done = 0
        self._total = 0

    def info(self) -> dict[str, Any]:
        """Where this actor runs: its process id, host, Ray node and the GPUs Ray gave it."""
        import ray

        context = ray.get_runtime_context()
        return {
            "index": self.index,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
        }

    def load(self) -> float:
        """Load the model (once; later calls wait for the first). Returns the seconds it took."""
        with self._lock:
            if self._backend is None:
                t0 = time.perf_counter()
                self.log.info("actor %d (pid %d): loading %s on %s", self.index, os.getpid(), *self._where())
                from batchllm import job

                self._backend = job.load_backend(self.spec)
                self._load_s = time.perf_counter() - t0
                self.log.info("actor %d: model loaded in %.1fs", self.index, self._load_s)
                self._loaded.set()
        return self._load_s

    def run(
        self, shard: int, token_ids: list[np.ndarray], groups: list[GroupSpec] | None
    ) -> tuple[list[Outcome], dict[str, Any]]:
        """Run one shard: outcomes in the shard's prompt order, and the engine's stats."""
        from batchllm import job

        self._shard, self._done, self._total = shard, 0, len(token_ids)
        try:
            load_s = self.load() if self._backend is None else 0.0
            self.log.info(
                "actor %d: shard %d, %d prompts in %d groups",
                self.index,
                shard,
                len(token_ids),
                len(groups or []),
            )
            outcomes, stats = job.infer_shard(
                self.spec, token_ids, progress=self._progress, groups=groups, backend=self._backend
            )
        except Exception:
            self.log.exception("actor %d: shard %d failed", self.index, shard)
            raise
        finally:
            self._shard = None
        stats["load_s"] = load_s  # the model load this shard waited for (0 once loaded)
        self.log.info("actor %d: shard %d done in %.1fs", self.index, shard, stats.get("run_s", 0.0))
        return outcomes, stats

    def poll(self) -> tuple[int | None, int, list[str]]:
        """(shard running or None, its prompts done, log lines since the last poll)."""
        return self._shard, self._done, self._lines.drain()

    def status(self) -> dict[str, Any]:
        """What runs here now, without taking the log lines: for operators and fault tests."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "shard": self._shard,
            "done": self._done,
            "total": self._total,
        }

    def close(self) -> None:
        """Free the engine (the actor process ends when the pool lets it go)."""
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _progress(self, done: int, total: int) -> None:
        self._done = done
        if done:  # fault tests stop an actor here, mid-shard: ``actor-shard-K`` (docs/faults.md)
            pause_point(f"actor-shard-{self._shard}")

    def _where(self) -> tuple[str, str]:
        return self.spec.model, self.spec.device
