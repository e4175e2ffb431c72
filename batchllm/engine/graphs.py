"""CUDA graphs of decode steps: captured once per key (padded batch size, group slots, block-table
width), replayed per step. A step may run at a larger size than it needs where that size's GEMMs are
measured faster (padding.py; ``measured_padding=False``: the smallest size that holds it, the same
sizes every run, so bf16 results repeat run to run).

A decode step's shapes depend only on its number of sequences, of groups and on
its longest sequence, so its forward runs on static input buffers of its key,
with the attention backend's static metadata written from the step's layout
(``staging``: one copy). The key's first steps run eagerly on those buffers;
the third runs on a side stream and records the graph there, which later
steps replay. A capture cost ~100-150 ms with two warm-up forwards besides the
step (h1, h4: a first run paid ~25 of them, 2.4 s of SmolLM2-135M's 5.05 s and
3.7 s of an 8B model's 22.8 s); after the eager steps the step itself is the
one warm-up left. An eager step costs its launches, a few ms for a small model,
hidden behind an 8B model's GPU time. A run's tail passes through many sizes
once or twice ((a) at 900k: 27 keys, 20 used once, 6 twice, the full batch 67
times), so waiting for the third step keeps the captures to the keys that pay
them back. A recording that fails (out of memory) leaves the steps eager.

Eager and replayed steps launch the same kernels on the same shapes, so a
step's result does not depend on which it was. Padded rows write one token to
the backend's scratch block; their outputs are dropped. On the CPU (tests) the
steps run eagerly on the same buffers: no capture.

Group slots beyond the step's groups are empty, but each launches prefix
programs that find no work: sizing the slots by the step's groups, not by its
rows, keeps those few (1,600 rows in 100 groups: 128 slots, not 1,600). The
tables' width is a power of two of the longest sequence's blocks, not the
model's context (``table_width``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from batchllm.engine.attention import AttentionBackend, BatchLayout
from batchllm.engine.model import CausalLM
from batchllm.engine.padding import cached_costs, cheapest_sizes, projections, time_projections
from batchllm.engine.staging import Field, Staging

log = logging.getLogger(__name__)
CAPTURE_AT = 3  # a key's step that captures its graph (the ones before run eagerly)
Key = tuple[int, int, int]  # (padded rows, group slots, block-table width)


def graph_sizes(max_seqs: int) -> list[int]:
    """Padded batch sizes: powers of two up to 32, steps of 32 up to 512, then steps of 64 (a padded row
    costs a whole row of every GEMM: (a) at 205k KV decodes ~395 rows, which steps of 64 padded to 448,
    13% more rows than needed; steps of 32 keep the waste under 8% from 400 rows up, steps of 64 under
    6% from 1,024). Graphs are captured lazily, so an unused size is never captured."""
    sizes = [1, 2, 4, 8, 16]
    sizes += list(range(32, 512, 32)) + list(range(512, max_seqs + 1, 64))
    return [s for s in sizes if s <= max_seqs] or [max_seqs]


def group_capacity(num_groups: int, size: int) -> int:
    """Group slots of the graph that runs a step of ``num_groups`` groups padded to ``size`` rows: the
    next power of two (few graphs per size), at most one group per row."""
    return min(size, 1 << max(0, num_groups - 1).bit_length())


def table_width(blocks: int, max_blocks: int) -> int:
    """Block-table columns of the graph that runs a step whose longest sequence holds ``blocks``: the
    next power of two, at least 16, at most the model's context. A graph ships its tables' rows every
    step and sizes its key splits by their width: at a context's full width (Llama-3.1-8B: 8,192
    columns) a 1,600-row step would ship 52 MB and split for 131k keys it does not have."""
    return min(max_blocks, max(16, 1 << max(0, blocks - 1).bit_length()))


def step_key(size: int, groups: int, max_kv_len: int, block_size: int, max_blocks: int) -> Key:
    """The key of a decode step padded to ``size`` rows, with ``groups`` two-level groups, the longest
    sequence holding ``max_kv_len`` keys."""
    return size, group_capacity(groups, size), table_width(-(-max_kv_len // block_size), max_blocks)


@dataclass
class _Graph:
    """A key's static buffers, and its graph once captured (at the key's ``CAPTURE_AT``-th step)."""

    input_ids: torch.Tensor
    staging: Staging  # positions and the backend's metadata, one copy per step
    meta: Any  # the backend's metadata over ``staging``'s device arrays
    graph: torch.cuda.CUDAGraph | None = None
    hidden: torch.Tensor | None = None  # the graph's output buffer
    steps: int = 0


class DecodeGraphs:
    """Decode forwards on static buffers per key (``key``), captured graphs sharing one memory pool."""

    def __init__(
        self, model: CausalLM, backend: AttentionBackend, max_seqs: int = 2048, measured_padding: bool = True
    ) -> None:
        self.model, self.backend = model, backend
        self.sizes = graph_sizes(max_seqs)
        self.measured_padding = measured_padding
        # the size each size's steps run at: the one whose GEMMs measure cheapest (padding.py), timed
        # at the first decode step (engines that only score never pay for it)
        self.run_at: dict[int, int] | None = None
        self.cost: dict[int, float] = {}  # seconds of one layer's projections per size, once measured
        self.graphs: dict[Key, _Graph] = {}
        self.max_blocks = -(-model.rope.shape[0] // backend.shape.block_size)
        self.device = model.embed_tokens.weight.device
        on_cuda = self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if on_cuda else None
        # captures run their warm-up and record on this stream, not on the engine's (None: no captures)
        self.stream = torch.cuda.Stream(device=self.device) if on_cuda else None
        self.failed: tuple[torch.cuda.CUDAGraph, Exception] | None = None  # a recording that raised

    def fits(self, layout: BatchLayout) -> bool:
        return layout.num_seqs <= self.sizes[-1]

    def run(self, layout: BatchLayout, input_ids: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, hidden] of a decode step, on the buffers of its key (``key``): eagerly at
        their first steps, by capturing the graph at step ``CAPTURE_AT``, replaying it after.
        input_ids: the step's ids on the device (the runner resolves ids still being sampled); padding
        rows keep the ids of an earlier step (valid ids; their outputs are dropped)."""
        if self.run_at is None:
            if self.measured_padding:
                linears = projections(self.model.layers[0])
                self.cost = cached_costs(linears, self.sizes, lambda: time_projections(linears, self.sizes))
            self.run_at = cheapest_sizes(self.sizes, self.cost)
        key = self.key(layout.num_seqs, layout.num_groups, int(layout.kv_lens.max()))
        assert key is not None
        g = self.graphs.get(key) or self._buffers(key)
        n, host = layout.num_seqs, g.staging.host()
        host["positions"][:n] = layout.positions
        host["positions"][n:] = 0
        self.backend.fill_graph_meta(host, layout)
        g.staging.ship(tail_rows=n)
        g.input_ids[:n].copy_(input_ids)
        g.steps += 1
        if g.graph is not None:
            g.graph.replay()
            assert g.hidden is not None
            return g.hidden[:n]
        if g.steps >= CAPTURE_AT and self.stream is not None and self.failed is None:
            return self._capture(g)[:n]
        return self.model(g.input_ids, g.staging.device["positions"], g.meta)[:n]

    def key(self, rows: int, groups: int, max_kv_len: int) -> Key | None:
        """The (padded rows, group slots, table width) whose buffers and graph run a decode step of
        ``rows`` sequences in ``groups`` two-level groups, the longest holding ``max_kv_len`` keys
        (None: too many rows, or before the first decode step measured the sizes)."""
        if self.run_at is None or rows > self.sizes[-1]:
            return None
        size = self.run_at[next(s for s in self.sizes if s >= rows)]
        return step_key(size, groups, max_kv_len, self.backend.shape.block_size, self.max_blocks)

    def reset(self) -> None:
        """Drop every key's buffers and graph: each key's next steps run eagerly and capture again, under
        the launch heuristics in force then (a graph keeps the kernel configurations it was recorded
        with, so an A/B of attention configurations in one engine resets between them: bench.config_ab).
        The measured padding stays, and so does a failed recording: its steps stay eager. The graphs
        record into a fresh memory pool: a tensor of the old one still held (a step's output) would
        make the next recording fail."""
        self.graphs.clear()
        if self.pool is not None:
            self.pool = torch.cuda.graph_pool_handle()

    def captured(self) -> list[Key]:
        """The keys whose graph is captured; the others ran eagerly so far."""
        return sorted(key for key, g in self.graphs.items() if g.graph is not None)

    def _buffers(self, key: Key) -> _Graph:
        size, groups, width = key
        input_ids = torch.zeros(size, dtype=torch.int64, device=self.device)
        fields = self.backend.graph_fields(size, groups, width)
        staging = Staging({"positions": Field((size,), torch.int64), **fields}, self.device)
        self.graphs[key] = _Graph(input_ids, staging, self.backend.graph_meta(staging.device))
        return self.graphs[key]

    def _capture(self, g: _Graph) -> torch.Tensor:
        """Run the step whose inputs were just shipped on the side stream (its buffers' eager steps
        compiled the kernels and sized the workspaces; this run sets up what the stream itself uses,
        cuBLAS's workspace), then record it there as the key's graph; returns the run's output. The
        recording runs nothing, and the replays rewrite the keys and values the run wrote. A recording
        that raises (out of memory) leaves every key eager from then on: the run goes on."""
        positions, stream = g.staging.device["positions"], self.stream
        assert stream is not None
        current = torch.cuda.current_stream(stream.device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            hidden = self.model(g.input_ids, positions, g.meta)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    out = self.model(g.input_ids, positions, g.meta)
            except RuntimeError as e:
                # the failed graph stays referenced: the allocator may still route its pool to it
                self.failed = (graph, e)
                log.warning("CUDA graph capture failed (%s); decode steps run eagerly from here on", e)
            else:
                g.graph, g.hidden = graph, out
        current.wait_stream(stream)
        hidden.record_stream(current)  # read on the engine's stream from here on
        return hidden
