"""What the engine returns: per-request results and per-run statistics."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "error"]


@dataclass
class Result:
    """One generation request, reported in input order.

    finish_reason: "stop" (EOS, a stop token id or a stop string), "length"
    (max_tokens reached) or "error" (see ``error``; nothing was generated).
    token_ids keeps every generated token (an EOS or stop token id included);
    text is their decoding without special tokens, cut before a stop string.
    cached_tokens counts prompt tokens whose KV came from a shared group prefix
    or from an identical prompt computed once. latency_s runs from the start of
    ``generate`` to the request's last token; first_token_s to its first token.
    """

    index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason = "length"
    error: str | None = None
    cached_tokens: int = 0
    latency_s: float = 0.0
    first_token_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class ClassifyResult:
    """One classification (or scoring) request: the distribution over the labels, each label scored
    on its whole token sequence. ``score`` (``Engine.score``) is the probability of the yes label."""

    index: int
    prompt_tokens: int
    label: str | None = None
    probs: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    cached_tokens: int = 0
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SchedulerStats:
    """Per-run counters. Prompt tokens are positions < num_prompt_tokens (a group prefix counts once per compute)."""

    num_steps: int = 0
    num_tokens: int = 0
    max_tokens_per_step: int = 0
    num_prompt_tokens_logical: int = 0
    num_prompt_tokens_computed: int = 0
    peak_kv_blocks: int = 0
    num_preemptions: int = 0
    num_prefix_evictions: int = 0
    # group_id -> how many times its prefix prefill ran from position 0 (1 unless preempted or evicted)
    prefix_computations: dict[int, int] = field(default_factory=dict)

    @property
    def mean_tokens_per_step(self) -> float:
        return self.num_tokens / self.num_steps if self.num_steps else 0.0

    @property
    def saving_ratio(self) -> float:
        logical = self.num_prompt_tokens_logical
        return 1.0 - self.num_prompt_tokens_computed / logical if logical else 0.0

    def add_steps(self, steps: int, tokens: int, widest: int) -> None:
        """``steps`` steps of ``tokens`` in all, the largest of ``widest``."""
        self.num_steps += steps
        self.num_tokens += tokens
        if steps:
            self.max_tokens_per_step = max(self.max_tokens_per_step, widest)


@dataclass
class EngineStats:
    """Statistics of one ``generate``/``classify`` call.

    Prompt tokens are "logical" as submitted (duplicates counted) and
    "computed" when the model actually ran them (a recomputed preempted prompt
    counts again). saving_ratio = 1 - computed / logical prompt tokens;
    planned_saving_ratio is what the plan promised before running.

    Time split of the step loop (wall clock): prefill_s is the runner and head
    time of steps with a prefill chunk (mixed steps included), decode_s that of
    decode-only steps, host_s the engine's own time around them (scheduling,
    recording outputs, bookkeeping; the runner's host-side batch preparation is
    inside prefill_s/decode_s). With pipelined decode a step's runner time ends
    when the previous step's ids are read back, so it holds the wait for the
    GPU. decode_steps have no prefill chunk; mixed_steps have decode and
    prefill chunks.

    Prefill-only runs (classify, score): label_tokens_computed are the extra
    positions that score multi-token labels (not prompt tokens); packs are
    sequences holding several candidates (packed_items of them); hybrid_units
    ran layer by layer because the KV pool could not hold them.
    """

    num_requests: int = 0
    num_errors: int = 0
    num_groups: int = 0
    steps: int = 0
    tokens_computed: int = 0
    prompt_tokens_logical: int = 0
    prompt_tokens_computed: int = 0
    output_tokens: int = 0
    mean_tokens_per_step: float = 0.0
    max_tokens_per_step: int = 0
    planned_saving_ratio: float = 0.0
    saving_ratio: float = 0.0
    peak_kv_blocks: int = 0
    num_kv_blocks: int = 0
    preemptions: int = 0
    prefixes_computed: int = 0
    prefix_recomputations: int = 0  # shared prefixes computed more than once (evicted, then needed again)
    plan_s: float = 0.0
    wall_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    host_s: float = 0.0
    decode_steps: int = 0
    mixed_steps: int = 0
    label_tokens_computed: int = 0
    packs: int = 0
    packed_items: int = 0
    hybrid_units: int = 0  # prefill-only sequences longer than the KV pool, run by hybrid prefill
    grammar_mask_s: float = 0.0  # typed output: filling and applying token masks
    forced_tokens: int = 0  # typed output: tokens appended by jump-forward, never sampled
    steady_steps: int = 0  # decode steps run by steady decode (steady.py), no per-sequence host work
    steady_host_s: float = 0.0  # their host time: all but waiting for the device's sampled ids

    def add_step(self, num_chunks: int, num_decode_chunks: int, run_s: float, host_s: float) -> None:
        """Account one step's time: runner+head time by step kind, the rest as host time."""
        if num_decode_chunks == num_chunks:
            self.decode_s += run_s
            self.decode_steps += 1
        else:
            self.prefill_s += run_s
            self.mixed_steps += num_decode_chunks > 0
        self.host_s += host_s

    def add_run(self, sched: Any, output_tokens: int, planned_physical: int | None) -> None:
        """Fill the token and step counts from the scheduler's stats (``SchedulerStats``) at the end of a run."""
        logical = self.prompt_tokens_logical
        if planned_physical is not None and logical:
            self.planned_saving_ratio = 1.0 - planned_physical / logical
        self.steps, self.tokens_computed = sched.num_steps, sched.num_tokens
        self.prompt_tokens_computed = sched.num_prompt_tokens_computed
        self.output_tokens = output_tokens
        self.mean_tokens_per_step, self.max_tokens_per_step = (
            sched.mean_tokens_per_step,
            sched.max_tokens_per_step,
        )
        self.peak_kv_blocks, self.preemptions = sched.peak_kv_blocks, sched.num_preemptions
        self.prefixes_computed = len(sched.prefix_computations)
        self.prefix_recomputations = sum(n - 1 for n in sched.prefix_computations.values())
        self.saving_ratio = 1.0 - self.prompt_tokens_computed / logical if logical else 0.0

    def add_prefill(self, label_tokens: int, packs: int, packed_items: int) -> None:
        """Prefill-only figures, after ``add_run``: label positions are computed but are no prompt tokens."""
        self.label_tokens_computed, self.packs, self.packed_items = label_tokens, packs, packed_items
        self.prompt_tokens_computed -= label_tokens
        logical = self.prompt_tokens_logical
        self.saving_ratio = 1.0 - self.prompt_tokens_computed / logical if logical else 0.0

    @property
    def tokens_reused(self) -> int:
        """Prompt tokens served from a shared prefix or a duplicate instead of computed."""
        return max(self.prompt_tokens_logical - self.prompt_tokens_computed, 0)

    @property
    def output_tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_reused"] = self.tokens_reused
        d["output_tokens_per_s"] = self.output_tokens_per_s
        return d
