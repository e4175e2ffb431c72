"""Engine: the public entry point of the native engine.

``generate`` validates and deduplicates the requests, plans them by shared
prefix (``batchllm.plan``), hands the groups to the scheduler and drives the
step loop: schedule -> runner forward -> sample -> stop checks -> report back.
Control flows one way: engine -> scheduler (queues, blocks) and engine ->
runner (tensors); the engine alone decides when a request stops.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from batchllm.engine.model import ModelConfig, load_model
from batchllm.engine.outputs import ClassifyResult, EngineStats, Result
from batchllm.engine.runner import ModelRunner, SeqSampling, kv_bytes_per_block
from batchllm.engine.sampling import SamplingParams
from batchllm.engine.scheduler import Scheduler
from batchllm.engine.sequence import Sequence as Seq
from batchllm.engine.tokenizer import Tokenizer
from batchllm.models import resolve_model

Prompt = str | Sequence[int] | np.ndarray
Progress = Callable[[int, int], None]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SEED_MASK = (1 << 63) - 1


@dataclass
class _Request:
    """One unique (prompt, params) to run, and the inputs that receive its answer."""

    tokens: np.ndarray
    params: SamplingParams
    inputs: list[int]
    seed: int
    seq: Seq | None = None
    first_token_s: float = 0.0
    finish_reason: str = "length"
    stop_text: str | None = None  # output text cut before a stop string
    cached_tokens: int = 0
    latency_s: float = 0.0
    error: str | None = None  # the scheduler rejected it (it can never fit)
    probs: list[float] = field(default_factory=list)


class Engine:
    """A model loaded for offline batch inference.

    model: "default" or an HF folder of a Llama-family model. device: "cpu" or
    "cuda" (dtype float32 on CPU, bfloat16 on CUDA unless given).
    enable_sharing: plan prompts by shared prefix, compute each prefix once and
    identical requests once (False runs every request as a plain one, in input
    order). kv_cache_gb sizes the paged KV pool; max_num_batched_tokens is the
    token budget of one step (decode tokens plus prefill chunks).
    decode_reserve: share of each request's max_tokens reserved in KV at
    admission (1.0 never preempts; less admits more and may preempt, then
    recompute). seed: base of the per-request seeds of unseeded sampling.
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
        max_num_batched_tokens: int | None = None,
        enable_sharing: bool = True,
        decode_reserve: float = 1.0,
        seed: int | None = None,
    ) -> None:
        if str(device).split(":")[0] not in ("cpu", "cuda"):
            raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available")
        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.folder = resolve_model(model)
        self.config = ModelConfig.from_folder(self.folder)
        self.tokenizer = Tokenizer(self.folder)
        limit = self.config.max_context
        if max_model_len is not None and not 0 < max_model_len <= limit:
            raise ValueError(f"max_model_len: must be in [1, {limit}] for this model, got {max_model_len}")
        self.max_model_len = max_model_len or limit
        self.model = load_model(self.folder, self.max_model_len, self.device, _DTYPES[dtype])
        self.block_size = block_size
        gb = kv_cache_gb if kv_cache_gb is not None else (2.0 if self.device.type == "cpu" else 16.0)
        num_blocks = int(gb * (1 << 30)) // kv_bytes_per_block(self.model, block_size, _DTYPES[dtype])
        if num_blocks < 1:
            raise ValueError(f"kv_cache_gb: {gb} GB holds no KV block")
        self.num_kv_blocks = num_blocks
        self.max_num_batched_tokens = max_num_batched_tokens or (1024 if self.device.type == "cpu" else 8192)
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")
        self.runner = ModelRunner(self.model, num_blocks, block_size)
        self.enable_sharing = enable_sharing
        if not 0.0 < decode_reserve <= 1.0:
            raise ValueError(f"decode_reserve: must be in (0, 1], got {decode_reserve}")
        self.decode_reserve = decode_reserve
        self._rng = random.Random(seed)
        self._stats = EngineStats(num_kv_blocks=num_blocks)

    @property
    def stats(self) -> EngineStats:
        """Statistics of the last generate/classify call."""
        return self._stats

    # ---- public API -----------------------------------------------------------------

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: Progress | None = None,
        enable_sharing: bool | None = None,
    ) -> list[Result]:
        """Generate for every prompt (text or token ids); results in input order.

        A bad request (empty, too long, unknown token ids) gets an error result;
        the rest of the batch still runs.
        """
        t0 = time.perf_counter()
        token_lists = self._tokenize(prompts)
        per_input = self._params_list(params, len(token_lists))
        results = [Result(index=i, prompt_tokens=len(t)) for i, t in enumerate(token_lists)]
        errors = {i: e for i, t in enumerate(token_lists) if (e := self._check_prompt(t))}
        for i, e in errors.items():
            results[i].error, results[i].finish_reason = e, "error"
        sharing = self.enable_sharing if enable_sharing is None else enable_sharing
        requests = self._requests(token_lists, per_input, errors, sharing)
        self._run(requests, sharing, t0, progress, len(token_lists))
        for req in requests:
            seq = req.seq
            assert seq is not None
            ids = seq.completion_token_ids
            text = req.stop_text if req.stop_text is not None else self.tokenizer.decode(ids)
            for n, i in enumerate(req.inputs):
                r = results[i]
                r.token_ids, r.text, r.finish_reason = list(ids), text, req.finish_reason  # type: ignore[assignment]
                r.cached_tokens = req.cached_tokens if n == 0 else r.prompt_tokens
                r.latency_s, r.first_token_s, r.error = req.latency_s, req.first_token_s, req.error
        self._stats.num_errors = sum(r.error is not None for r in results)
        return results

    def classify(
        self,
        prompts: Prompt | Sequence[Prompt],
        labels: Sequence[str],
        *,
        progress: Progress | None = None,
        enable_sharing: bool | None = None,
    ) -> list[ClassifyResult]:
        """Label distribution at each prompt's last position, over the labels' first tokens.

        Each label is tokenized as a reply would start (no leading space) and
        scored by its first token only, so first tokens must be distinct. Only
        ``W_lm[label_ids] @ h_last`` is computed, never the full vocabulary.
        """
        t0 = time.perf_counter()
        label_ids = self._label_ids(labels)
        token_lists = self._tokenize(prompts)
        results = [ClassifyResult(index=i, prompt_tokens=len(t)) for i, t in enumerate(token_lists)]
        errors = {i: e for i, t in enumerate(token_lists) if (e := self._check_prompt(t))}
        for i, e in errors.items():
            results[i].error, results[i].status = e, "error"
        params = [SamplingParams(max_tokens=1)] * len(token_lists)
        sharing = self.enable_sharing if enable_sharing is None else enable_sharing
        requests = self._requests(token_lists, params, errors, sharing)
        label_tensor = torch.tensor(label_ids, dtype=torch.int64, device=self.device)
        self._run(requests, sharing, t0, progress, len(token_lists), label_tensor)
        for req in requests:
            for n, i in enumerate(req.inputs):
                r = results[i]
                r.latency_s = req.latency_s
                if req.error is not None:
                    r.error, r.status = req.error, "error"
                    continue
                best = max(range(len(labels)), key=lambda j: req.probs[j])
                r.label, r.probs = labels[best], dict(zip(labels, req.probs, strict=True))
                r.cached_tokens = req.cached_tokens if n == 0 else r.prompt_tokens
        self._stats.num_errors = sum(r.error is not None for r in results)
        return results

    # ---- request preparation ----------------------------------------------------------

    def _tokenize(self, prompts: Prompt | Sequence[Prompt]) -> list[np.ndarray]:
        """Token id arrays of a prompt or a batch (texts, id lists, 1-D arrays, or a 2-D array of rows)."""
        if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
            prompts = list(prompts)
        elif isinstance(prompts, str | np.ndarray) or (
            isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int | np.integer)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        out: list[np.ndarray] = []
        texts: dict[int, str] = {}  # position -> text prompt, encoded in one batch below
        for p in prompts:  # type: ignore[union-attr]
            if isinstance(p, str):
                texts[len(out)] = p
                out.append(np.empty(0, dtype=np.int64))
                continue
            arr = np.asarray(p)
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(
                    f"prompts: each prompt must be a str or a 1-D sequence of token ids, got {p!r}"
                )
            out.append(arr.astype(np.int64))
        encoded = self.tokenizer.encode_batch(list(texts.values()))
        for i, ids in zip(texts, encoded, strict=True):
            out[i] = ids.astype(np.int64)
        return out

    def _params_list(
        self, params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * n
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise ValueError(f"params: got {len(params)} SamplingParams for {n} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise ValueError(f"params: expected SamplingParams, got {type(p).__name__}")
        return params

    def _check_prompt(self, tokens: np.ndarray) -> str | None:
        if tokens.size == 0:
            return "prompt: empty prompt (0 tokens)"
        if tokens.size > self.max_model_len:
            return f"prompt: {tokens.size} tokens is longer than max_model_len={self.max_model_len}"
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            return f"prompt: token id {bad} is outside the vocabulary [0, {self.config.vocab_size})"
        return None

    def _requests(
        self, tokens: list[np.ndarray], params: list[SamplingParams], errors: dict[int, str], sharing: bool
    ) -> list[_Request]:
        """Unique requests; with sharing, identical prompts with identical deterministic params run once."""
        requests: list[_Request] = []
        by_key: dict[tuple[bytes, SamplingParams], _Request] = {}
        for i, (t, p) in enumerate(zip(tokens, params, strict=True)):
            if i in errors:
                continue
            seed = (p.seed if p.seed is not None else self._rng.getrandbits(63)) & _SEED_MASK
            deterministic = p.is_greedy or p.seed is not None
            key = (t.tobytes(), p)
            if sharing and deterministic and key in by_key:
                by_key[key].inputs.append(i)
                continue
            req = _Request(tokens=t, params=p, inputs=[i], seed=seed)
            requests.append(req)
            if sharing and deterministic:
                by_key[key] = req
        return requests

    def _label_ids(self, labels: Sequence[str]) -> list[int]:
        if isinstance(labels, str) or not labels:
            raise ValueError("labels: give a non-empty list of label strings")
        ids: list[int] = []
        for label in labels:
            if not isinstance(label, str) or not label:
                raise ValueError(f"labels: every label must be a non-empty str, got {label!r}")
            enc = self.tokenizer.encode(label)
            if not enc:
                raise ValueError(f"labels: {label!r} encodes to no token")
            ids.append(enc[0])
        first: dict[int, str] = {}
        for label, tid in zip(labels, ids, strict=True):
            if tid in first:
                raise ValueError(
                    f"labels: {first[tid]!r} and {label!r} start with the same token "
                    f"{self.tokenizer.decode([tid], skip_special_tokens=False)!r}; use labels whose first tokens differ"
                )
            first[tid] = label
        return ids

    # ---- execution --------------------------------------------------------------------

    def _plan_groups(
        self, requests: list[_Request], sharing: bool
    ) -> tuple[list[tuple[int, list[int]]], float | None]:
        """(prefix_len, request indices) per group in execution order, and the planned physical tokens."""
        if not sharing or not requests:
            return [(0, [k]) for k in range(len(requests))], None
        from batchllm.plan import build_plan

        plan = build_plan(
            [r.tokens.astype(np.int32) for r in requests],
            np.array([r.params.max_tokens for r in requests], dtype=np.int64),
            self.block_size,
            dedup=False,  # identical prompts were merged above (only where their params allow it)
        )
        groups = [(int(g.prefix_len), [int(m) for m in g.members]) for g in plan.iter_groups()]
        return groups, float(plan.stats.physical_tokens)

    def _run(
        self,
        requests: list[_Request],
        sharing: bool,
        t0: float,
        progress: Progress | None,
        total: int,
        label_ids: torch.Tensor | None = None,
    ) -> None:
        """Plan, schedule and run requests to completion; with label_ids, score labels instead of sampling."""
        stats = self._stats = EngineStats(num_requests=total, num_kv_blocks=self.num_kv_blocks)
        logical = stats.prompt_tokens_logical = sum(int(r.tokens.size) * len(r.inputs) for r in requests)
        groups, physical = self._plan_groups(requests, sharing)
        stats.plan_s = time.perf_counter() - t0
        stats.num_groups = len(groups)
        if physical is not None and logical:
            stats.planned_saving_ratio = 1.0 - physical / logical
        scheduler = Scheduler(
            self.num_kv_blocks,
            self.block_size,
            self.max_num_batched_tokens,
            self.max_model_len,
            decode_fraction=self.decode_reserve,
        )
        by_seq = self._submit(scheduler, requests, groups)
        num_done = total - sum(len(r.inputs) for r in requests)  # invalid inputs are done already
        for seq in scheduler.rejected:
            num_done += self._reject(by_seq[seq.seq_id], scheduler.rejection_reasons[seq.seq_id])
        if progress is not None and num_done:
            progress(num_done, total)
        while scheduler.has_unfinished():
            batch = scheduler.schedule()
            finished = self._step(batch.chunks, by_seq, t0, label_ids)
            if done := scheduler.on_step_done(batch, finished):
                now = time.perf_counter() - t0
                for seq in done:
                    by_seq[seq.seq_id].latency_s = now
                    num_done += len(by_seq[seq.seq_id].inputs)
                if progress is not None:
                    progress(num_done, total)
        if progress is not None and num_done < total:
            progress(total, total)
        s = scheduler.stats
        stats.steps, stats.tokens_computed = s.num_steps, s.num_tokens
        stats.prompt_tokens_computed = s.num_prompt_tokens_computed
        stats.output_tokens = sum(r.seq.num_generated * len(r.inputs) for r in requests if r.seq is not None)
        stats.mean_tokens_per_step, stats.max_tokens_per_step = s.mean_tokens_per_step, s.max_tokens_per_step
        stats.peak_kv_blocks, stats.preemptions = s.peak_kv_blocks, s.num_preemptions
        stats.prefixes_computed = len(s.prefix_computations)
        stats.prefix_recomputations = sum(n - 1 for n in s.prefix_computations.values())
        stats.saving_ratio = 1.0 - stats.prompt_tokens_computed / logical if logical else 0.0
        stats.wall_s = time.perf_counter() - t0

    def _submit(
        self, scheduler: Scheduler, requests: list[_Request], groups: list[tuple[int, list[int]]]
    ) -> dict[int, _Request]:
        """One Sequence per request, handed to the scheduler group by group in plan order."""
        by_seq: dict[int, _Request] = {}
        for prefix_len, members in groups:
            seqs = []
            for k in members:
                req, p = requests[k], requests[k].params
                req.seq = Seq(
                    seq_id=len(by_seq),
                    request_index=req.inputs[0],
                    token_ids=req.tokens.tolist(),
                    num_prompt_tokens=int(req.tokens.size),
                    max_tokens=p.max_tokens,
                    params=SeqSampling(p.temperature, p.top_p, p.top_k, req.seed),
                )
                by_seq[req.seq.seq_id] = req
                seqs.append(req.seq)
            scheduler.add_group(requests[members[0]].tokens[:prefix_len].tolist(), seqs)
            for seq in seqs:  # the scheduler decides how much of the prefix is shared (whole blocks)
                by_seq[seq.seq_id].cached_tokens = seq.num_shared_tokens
        return by_seq

    def _step(
        self, chunks: Sequence, by_seq: dict[int, _Request], t0: float, label_ids: torch.Tensor | None
    ) -> list[int]:
        """Run one batch, append one token per sampled chunk; returns the seq ids that stop here."""
        chunks, hidden = self.runner.forward(chunks)
        rows = [i for i, c in enumerate(chunks) if c.sample]
        if not rows:
            return []
        seqs = [chunks[i].seq for i in rows]
        if label_ids is not None:
            probs = self.runner.label_probs(hidden[rows], label_ids)
            best = label_ids[probs.argmax(dim=-1)].tolist()
            for seq, pr, tok in zip(seqs, probs.tolist(), best, strict=True):
                by_seq[seq.seq_id].probs = pr
                seq.token_ids.append(tok)  # the scheduler expects one token per sampled chunk
            return []
        finished = []
        now = time.perf_counter() - t0
        for seq, tok in zip(seqs, self.runner.sample(hidden[rows], seqs), strict=True):
            seq.token_ids.append(tok)
            req = by_seq[seq.seq_id]
            if not req.first_token_s:
                req.first_token_s = now
            if self._stops(req, seq, tok):
                finished.append(seq.seq_id)
        return finished

    def _reject(self, req: _Request, reason: str) -> int:
        req.finish_reason, req.stop_text, req.error = "error", "", f"prompt: {reason}"
        return len(req.inputs)

    def _stops(self, req: _Request, seq: Seq, token: int) -> bool:
        """True when the engine ends seq now (EOS, a stop token id, a stop string); max_tokens is the scheduler's."""
        p = req.params
        if (not p.ignore_eos and token in self.tokenizer.eos_token_ids) or token in p.stop_token_ids:
            req.finish_reason = "stop"
            return True
        if p.stop:
            # a new match ends in the newest tokens: decode only a tail (a char can take 4 byte tokens)
            tail = seq.completion_token_ids[-(4 * max(len(s) for s in p.stop) + 8) :]
            if not any(s in self.tokenizer.decode(tail) for s in p.stop):
                return False
            text = self.tokenizer.decode(seq.completion_token_ids)
            cut = min((i for s in p.stop if (i := text.find(s)) >= 0), default=-1)
            if cut >= 0:
                req.finish_reason, req.stop_text = "stop", text[:cut]
                return True
        return False
