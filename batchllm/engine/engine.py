"""Engine: the public entry point of the native engine.

``generate``/``classify`` prepare the requests (requests.py: tokenize, validate,
dedup, group by shared prefix, or take a precomputed grouping), hand the groups
to the scheduler and drive the step loop: schedule -> runner forward -> head
(sampled token or label probabilities) -> the head says which requests end ->
scheduler bookkeeping. Control flows one way: engine -> scheduler (queues,
blocks) and engine -> runner (tensors); a head (heads.py) alone decides when a
request stops.

Generation is pipelined (pipeline.py): a step's sampled ids are read back after the next
step is launched; runs of decode steps over the same sequences skip the per-sequence
bookkeeping (steady.py). Grammar-constrained generation reads every step back at once.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from batchllm.engine.attention import resolve_name, to_device
from batchllm.engine.collect import fewer_collections
from batchllm.engine.config import ModelConfig
from batchllm.engine.grammar import Constraint, GrammarCache, GrammarHead
from batchllm.engine.heads import Head, SeqSampling, StopRule, TokenHead
from batchllm.engine.kv import activation_bytes, gpu_memory, pool_blocks
from batchllm.engine.labels import LabelSet
from batchllm.engine.model import load_model
from batchllm.engine.options import check_options, model_folder, resolve_device
from batchllm.engine.outputs import ClassifyResult, EngineStats, Result
from batchllm.engine.pipeline import Pending, ReadBack, hold, settle
from batchllm.engine.prefill import PACK_TOKENS, run_prefill
from batchllm.engine.prefill_scheduler import STARVATION_LAMBDA
from batchllm.engine.requests import (
    Batch,
    GroupSpec,
    Progress,
    Prompt,
    Request,
    check_prompt,
    params_list,
    prepare,
    tokenize,
)
from batchllm.engine.runner import ModelRunner, kv_bytes_per_block, on_device
from batchllm.engine.sampling import SamplingParams
from batchllm.engine.scheduler import ScheduledChunk, Scheduler
from batchllm.engine.sequence import Sequence as Seq
from batchllm.engine.steady import SteadyDecode
from batchllm.engine.tokenizer import Tokenizer, config_eos_token_ids

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Engine:
    """A model loaded for offline batch inference.

    model: "default" or an HF folder of a Llama-family model. device: "cpu", "cuda" or "cuda:N" (dtype
    float32 on CPU, bfloat16 on CUDA unless given); generate/classify run with that GPU current.
    enable_sharing: plan prompts by shared prefix, compute each prefix once and identical requests once
    (False: each a plain one, in input order). max_num_batched_tokens: one step's token budget.
    KV pool size: kv_cache_tokens if given, else kv_cache_gb if given, else on CUDA gpu_memory_utilization
    x the GPU's memory minus what is in use after loading the weights and an activation margin for one
    step; 2 GB on CPU. decode_reserve: share of each request's max_tokens reserved in KV at admission
    (1.0 never preempts; less admits more and may preempt, then recompute). seed: base of the
    per-request seeds of unseeded sampling.
    attention: "auto" (cpu on CPU; fa3 on Hopper with vLLM for 16-bit KV, else triton) or a
    backend name ("torch": the reference).
    load_format "dummy": random weights from config.json alone (benchmarks); no tokenizer.json is needed
    then, token-id prompts run and eos ids come from config.json. cuda_graphs: decode steps as CUDA graphs.
    measured_padding: pad a decode step to the graph size whose GEMMs measure fastest
    (``graphs``); False: the smallest size that holds it, so bf16 results repeat run to run.
    pipelined_decode: read a step's sampled tokens back after the next step is launched (module docstring).
    hybrid_prefill: classify/score a prompt longer than the KV pool layer by layer
    over the idle pool's memory (``hybrid``) instead of refusing it.
    float32_residual: a float32 residual stream beside 16-bit weights and matmuls (bf16 greedy tokens
    agree with float32 at 99.0% of teacher-forced positions instead of 98.1%).
    """

    def __init__(
        self,
        model: str | os.PathLike[str] = "default",
        *,
        device: str = "cpu",
        dtype: str | None = None,
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_gb: float | None = None,
        kv_cache_tokens: int | None = None,
        gpu_memory_utilization: float = 0.9,
        max_num_batched_tokens: int | None = None,
        enable_sharing: bool = True,
        decode_reserve: float = 1.0,
        seed: int | None = None,
        attention: str = "auto",
        load_format: str = "safetensors",
        cuda_graphs: bool = True,
        measured_padding: bool = True,
        hybrid_prefill: bool = True,
        pipelined_decode: bool = True,
        float32_residual: bool = True,
    ) -> None:
        check_options(**{k: v for k, v in locals().items() if k not in ("self", "model")})
        self.device = resolve_device(device)
        cuda = self.device.type == "cuda"
        torch_dtype = _DTYPES[dtype or ("bfloat16" if cuda else "float32")]
        self.attention = resolve_name(attention, self.device, torch_dtype)
        self.folder = model_folder(model, load_format)
        self.config = ModelConfig.from_folder(self.folder)
        self._has_tokenizer = (self.folder / "tokenizer.json").is_file()
        if load_format == "safetensors" and not self._has_tokenizer:
            raise ValueError(f"model: {str(self.folder)!r} has no tokenizer.json")
        self._tokenizer: Tokenizer | None = None
        limit = self.config.max_context
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len: must be in [1, {limit}] for this model, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        dummy = {"dummy": True} if load_format == "dummy" else {}  # load_model reads safetensors by default
        self.model = load_model(self.folder, self.max_model_len, self.device, torch_dtype, **dummy)
        self.model.set_residual_dtype(torch.float32 if float32_residual else None)
        self.block_size = block_size
        self.max_num_batched_tokens = max_num_batched_tokens or (16384 if cuda else 1024)
        self.num_kv_blocks = pool_blocks(
            kv_bytes_per_block(self.model, block_size, torch_dtype),
            block_size,
            kv_cache_tokens=kv_cache_tokens,
            kv_cache_gb=kv_cache_gb,
            gpu_memory=gpu_memory(self.device) if cuda else None,
            gpu_memory_utilization=gpu_memory_utilization,
            activation_margin=activation_bytes(
                self.config, self.max_num_batched_tokens, torch_dtype.itemsize
            ),
        )
        graphs = {"cuda_graphs": cuda_graphs, "measured_padding": measured_padding}
        self.runner = ModelRunner(self.model, self.num_kv_blocks, block_size, self.attention, **graphs)
        self.enable_sharing = enable_sharing
        self.hybrid_prefill = hybrid_prefill
        self.decode_reserve = decode_reserve
        self.pipelined_decode = pipelined_decode
        self.starvation_lambda = STARVATION_LAMBDA  # prefill-only scheduling: miss tokens per second waited
        self._rng = random.Random(seed)
        self._grammars: GrammarCache | None = None
        self._stats = EngineStats(num_kv_blocks=self.num_kv_blocks)

    @property
    def stats(self) -> EngineStats:
        """Statistics of the last generate/classify call."""
        return self._stats

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, parsed on first use (a dummy-weight model may have none)."""
        if self._tokenizer is None:
            if not self._has_tokenizer:
                raise ValueError(
                    f"model: {str(self.folder)!r} has no tokenizer.json; text prompts, labels and stop "
                    "strings need one (token-id prompts run without it)"
                )
            self._tokenizer = Tokenizer(self.folder)
        return self._tokenizer

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Ids that end generation (unless ignore_eos): the tokenizer's and config.json's eos ids."""
        return self.tokenizer.eos_token_ids if self._has_tokenizer else config_eos_token_ids(self.folder)

    # ---- public API -----------------------------------------------------------------

    @on_device
    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: Progress | None = None,
        enable_sharing: bool | None = None,
        groups: Iterable[GroupSpec] | None = None,
        constraint: Constraint | None = None,
    ) -> list[Result]:
        """Generate for every prompt (text or token ids); results in input order.

        A bad request (empty, too long, unknown token ids) gets an error result;
        the rest of the batch still runs. groups: a precomputed grouping,
        (prefix_len, [input indices]) per group in execution order (a job's
        plan, see ``requests.groups_from_plan``), run as given instead of
        planning here; prefix lengths are rounded down to whole KV blocks.
        constraint: every output follows this grammar (``grammar.Constraint``).
        """
        t0 = time.perf_counter()
        tokens = tokenize(prompts, lambda: self.tokenizer)
        per_input = params_list(params, len(tokens), SamplingParams)
        if any(p.stop for p in per_input) and not self._has_tokenizer:
            raise ValueError("params: stop strings need the model's tokenizer.json; use stop_token_ids")
        decode = self.tokenizer.decode if self._has_tokenizer else None
        stop = StopRule(self.eos_token_ids, self.max_model_len, decode)
        head: TokenHead = TokenHead(stop, decode)
        if constraint is not None:
            compiled = self.grammars.get(constraint)
            head = GrammarHead(stop, decode, compiled, self.config.vocab_size, constraint.jump_forward)
        batch = self._prepare(tokens, per_input, enable_sharing, groups)
        results = self._run(batch, head, t0, progress)
        if isinstance(head, GrammarHead):
            self._stats.grammar_mask_s, self._stats.forced_tokens = head.mask_s, head.forced_tokens
        return results

    @property
    def grammars(self) -> GrammarCache:
        """Grammars compiled for this model's tokenizer, cached by constraint (needs tokenizer.json)."""
        if self._grammars is None:
            self.tokenizer  # noqa: B018 - a clear error when there is no tokenizer.json
            self._grammars = GrammarCache(self.folder, self.config.vocab_size, self.eos_token_ids)
        return self._grammars

    @on_device
    def classify(
        self,
        prompts: Prompt | Sequence[Prompt],
        labels: Sequence[str] | LabelSet,
        *,
        pack: bool | None = None,
        pack_tokens: int = PACK_TOKENS,
        progress: Progress | None = None,
        enable_sharing: bool | None = None,
        groups: Iterable[GroupSpec] | None = None,
    ) -> list[ClassifyResult]:
        """Each prompt's distribution over the labels, every label scored on its whole token sequence.

        Prefill only (``prefill.run_prefill``, no token sampled). Labels are tokenized as a
        reply starts; any distinct labels work (``labels.LabelSet``). pack: a group's members
        in sequences of up to pack_tokens tokens (None: the attention backend's default: packed where
        its tree mask runs as fast as its plain prefill). groups: as in ``generate``.
        """
        t0 = time.perf_counter()
        label_set = labels if isinstance(labels, LabelSet) else LabelSet.build(labels, self.tokenizer)
        tokens = tokenize(prompts, lambda: self.tokenizer)
        batch = self._prepare(tokens, [SamplingParams(max_tokens=1)] * len(tokens), enable_sharing, groups)
        results, self._stats = run_prefill(
            self, batch, label_set, pack=pack, pack_tokens=pack_tokens, progress=progress, t0=t0
        )
        return results

    def score(
        self, prompts: Prompt | Sequence[Prompt], yes: str = "Yes", no: str = "No", **options: Any
    ) -> list[ClassifyResult]:
        """P(yes) / (P(yes) + P(no)) after each prompt, as ``result.score`` (options: as in ``classify``)."""
        results = self.classify(prompts, [yes, no], **options)
        for r in results:
            r.score = r.probs[yes] if r.ok else None
        return results

    # ---- execution --------------------------------------------------------------------

    def _prepare(
        self,
        tokens: list[Any],
        params: list[SamplingParams],
        enable_sharing: bool | None,
        groups: Iterable[GroupSpec] | None,
    ) -> Batch:
        vocab = self.config.vocab_size
        errors = {i: e for i, t in enumerate(tokens) if (e := check_prompt(t, self.max_model_len, vocab))}
        sharing = self.enable_sharing if enable_sharing is None else enable_sharing
        return prepare(
            tokens, params, errors, sharing=sharing, block_size=self.block_size, rng=self._rng, groups=groups
        )

    @fewer_collections()
    def _run(self, batch: Batch, head: Head, t0: float, progress: Progress | None) -> list[Any]:
        """Schedule and run the batch to completion; the head's results, in input order."""
        total, clock = batch.num_inputs, time.perf_counter
        stats = self._stats = EngineStats(num_requests=total, num_kv_blocks=self.num_kv_blocks)
        stats.prompt_tokens_logical, stats.num_groups = batch.logical_tokens, len(batch.groups)
        stats.plan_s = clock() - t0
        sizes = (self.num_kv_blocks, self.block_size, self.max_num_batched_tokens, self.max_model_len)
        scheduler = Scheduler(*sizes, decode_fraction=self.decode_reserve)
        by_seq = submit(scheduler, batch)
        # invalid inputs and requests the scheduler rejected are done already
        num_done = total - sum(len(r.inputs) for r in batch.requests if r.error is None)
        if progress is not None and num_done:
            progress(num_done, total)
        # Pipelined heads read a step's ids back after the next launch (`tokens` feeds it on the device), so
        # the GPU never waits; only without preemption: a preempted sequence would recompute pending ids.
        lagged = self.pipelined_decode and self.decode_reserve >= 1.0
        stop = head.stop if lagged and isinstance(head, TokenHead) and head.pipelined else None
        tokens = None if stop is None else torch.zeros(len(by_seq), dtype=torch.int64, device=self.device)
        readback = ReadBack(len(by_seq), self.device)
        pending: Pending | None = None
        steady_ok = stop is not None and not any(r.params.stop for r in batch.requests)
        rides, steady_after = self.runner.graphs is not None, None  # ends inside a run ride (steady.py)

        def retire(done: list[Seq]) -> None:  # finished sequences: their latency, the progress callback
            nonlocal num_done
            now = clock() - t0
            for seq in done:
                by_seq[seq.seq_id].latency_s = now
                num_done += len(by_seq[seq.seq_id].inputs)
            if done and progress is not None:
                progress(num_done, total)

        while scheduler.has_unfinished():
            t_host = clock()
            if steady_after is not None and pending is not None and tokens is not None and stop is not None:
                steady = SteadyDecode(scheduler, self.runner, steady_after, tokens, by_seq, stop, readback)
                hand, steady_after = steady.run(pending, stats, clock), None
                pending = hand.pending
                retire(hand.finished)
                if hand.step is None:  # the engine schedules the next step
                    continue
                step, seqs, outputs, t_host, t_run = hand.step, hand.seqs, hand.ids, hand.t_host, hand.t_run
            else:
                step = scheduler.schedule()
                t_run = clock()
                seqs, outputs = self._forward(step.chunks, head, tokens)
            late = settle(pending, by_seq, stop) if pending is not None and stop is not None else set()
            t_out = clock()
            now = t_out - t0
            if stop is None:
                ends = [
                    s.seq_id
                    for s, o in zip(seqs, outputs, strict=True)
                    if head.record(by_seq[s.seq_id], s, o, now)
                ]
            else:
                ends, pending = hold(seqs, outputs, late, by_seq, stop, now, readback)
            # a sequence that ended at the previous step but is not in this one ends outside a step
            done = scheduler.on_step_done(step, ends)
            done += scheduler.finish(by_seq[i].seq for i in late.difference(ends))  # type: ignore[misc]
            retire(done)
            ended = bool(ends or late)  # a run right after an end pays only where its own ends ride
            steady_after = (
                step if steady_ok and (rides or not ended) and scheduler.steady(step, ended) else None
            )
            decodes = sum(c.is_decode for c in step.chunks)
            stats.add_step(len(step.chunks), decodes, t_out - t_run, t_run - t_host + clock() - t_out)
        if pending is not None and stop is not None:
            assert not settle(pending, by_seq, stop), "a sequence ended late after the last step"
        if progress is not None and num_done < total:
            progress(total, total)
        outputs = sum(r.seq.num_generated * len(r.inputs) for r in batch.requests if r.seq is not None)
        stats.add_run(scheduler.stats, outputs, batch.planned_physical)
        stats.wall_s = clock() - t0
        results = head.results(batch)
        stats.num_errors = sum(r.error is not None for r in results)
        return results

    def _forward(
        self, chunks: list[ScheduledChunk], head: Head, tokens: torch.Tensor | None
    ) -> tuple[list[Seq], Any]:
        """One forward of the step, then the head on the last position of every sampled chunk. With
        ``tokens`` (pipelined) the sampled ids stay on the device (and go to ``tokens`` by seq_id, where
        the next step reads them); otherwise the head's outputs, read back."""
        hidden = self.runner.forward(chunks, tokens=tokens)
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if not rows:
            return [], []
        seqs = [chunks[i].seq for i in rows]
        if len(rows) < len(chunks):
            hidden = hidden[to_device(np.array(rows, dtype=np.int64), hidden.device)]
        if tokens is None:
            return seqs, head.compute(self.model, hidden, seqs)
        assert isinstance(head, TokenHead)
        ids = head.launch(self.model, hidden, seqs)
        tokens[to_device(np.fromiter((s.seq_id for s in seqs), np.int64, len(seqs)), tokens.device)] = ids
        return seqs, ids


def submit(scheduler: Scheduler, batch: Batch) -> dict[int, Request]:
    """One Sequence per request, handed to the scheduler group by group in execution order.

    Requests the scheduler rejects (they can never fit) get their error here.
    """
    by_seq: dict[int, Request] = {}
    for prefix_len, members in batch.groups:
        seqs = []
        for k in members:
            req, p = batch.requests[k], batch.requests[k].params
            req.seq = Seq(
                seq_id=len(by_seq),
                request_index=req.inputs[0],
                token_ids=req.tokens,  # an array until its first generated token (Sequence.token_ids)
                num_prompt_tokens=int(req.tokens.size),
                max_tokens=p.max_tokens,
                params=SeqSampling(p.temperature, p.top_p, p.top_k, req.seed),
            )
            by_seq[req.seq.seq_id] = req
            seqs.append(req.seq)
        scheduler.add_group(batch.requests[members[0]].tokens[:prefix_len].tolist(), seqs)
        for seq in seqs:  # the scheduler decides how much of the prefix is shared (whole blocks)
            by_seq[seq.seq_id].cached_tokens = seq.num_shared_tokens
    for seq in scheduler.rejected:  # it can never run: an error result
        req = by_seq[seq.seq_id]
        req.finish_reason, req.stop_text = "error", ""
        req.error = f"prompt: {scheduler.rejection_reasons[seq.seq_id]}"
    return by_seq
