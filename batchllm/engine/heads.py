"""Output heads: what the last hidden state of a request's sampled chunk turns into.

A head computes its outputs for the rows of one step (``compute``), records
each into its request and says whether the request ends there (``record``), and
builds the per-input results at the end (``results``). The engine's generation
loop is the same for every head; adding grammar-masked generation means adding
a head, not a flag.

- ``TokenHead``: generation. The next token (greedy, or sampling keyed by
  (seed, position)); ``StopRule`` is the one place that ends a generated
  request: EOS, a stop token id, a stop string, max_tokens, max_model_len.
- ``grammar.GrammarHead``: a TokenHead whose logits are masked by each
  sequence's grammar matcher before the token is chosen.

Classification and scoring need no head of this loop: they run prefill only
(``prefill.run_prefill``: no decode, several read positions per chunk) and
turn the hidden states they read into label probabilities in ``scoring``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from batchllm.engine.attention import to_device
from batchllm.engine.outputs import Result
from batchllm.engine.requests import Batch, Request
from batchllm.engine.sampling import row_keys, sample
from batchllm.engine.sequence import Sequence as Seq

Decode = Callable[[Sequence[int]], str]


class Head(Protocol):
    def compute(self, model: Any, hidden: torch.Tensor, seqs: Sequence[Seq]) -> list[Any]:
        """One output per row of ``hidden`` [rows, hidden] (the last position of each sampled chunk)."""
        ...

    def record(self, req: Request, seq: Seq, output: Any, now: float) -> bool:
        """Store one output in its request; True when the request ends with it."""
        ...

    def results(self, batch: Batch) -> list[Any]:
        """One result per input, in input order."""
        ...


@dataclass
class SeqSampling:
    """Sampling state the engine attaches to ``Sequence.params``."""

    temperature: float
    top_p: float
    top_k: int
    seed: int  # 64-bit; the random numbers of a token depend on (seed, position) only


@dataclass
class RowSampling:
    """The sampling parameters of a step's rows as arrays: built once for a run of steps over the same
    sequences (``steady``), or per step from the sequences (``TokenHead.pick``)."""

    greedy: bool  # every row greedy: argmax, nothing else is read
    temps: np.ndarray  # [rows] float32
    # the rest only when some row samples (None when greedy): a greedy step reads the temperatures only
    top_ps: np.ndarray | None = None  # [rows] float32
    top_ks: np.ndarray | None = None  # [rows] int64
    seeds: torch.Tensor | None = None  # [rows] int64 on the device

    @classmethod
    def of(cls, seqs: Sequence[Seq], device: torch.device) -> RowSampling:
        params: list[SeqSampling] = [s.params for s in seqs]
        n = len(params)
        temps = np.fromiter((p.temperature for p in params), np.float32, n)
        if not temps.any():
            return cls(True, temps)
        return cls(
            False,
            temps,
            np.fromiter((p.top_p for p in params), np.float32, n),
            np.fromiter((p.top_k for p in params), np.int64, n),
            to_device(np.array([p.seed for p in params], dtype=np.int64), device),
        )

    def take(self, rows: np.ndarray) -> RowSampling:
        """The sampling of some rows (indices, in order)."""
        if self.greedy:
            return RowSampling(True, self.temps[rows])
        assert self.top_ps is not None and self.top_ks is not None and self.seeds is not None
        seeds = self.seeds[to_device(rows.astype(np.int64), self.seeds.device)]
        return RowSampling(False, self.temps[rows], self.top_ps[rows], self.top_ks[rows], seeds)

    def pick(self, logits: torch.Tensor, lengths: np.ndarray | None) -> torch.Tensor:
        """The next token per row; lengths [rows]: each sequence's length, the sampled token's position."""
        if self.greedy:
            return logits.argmax(dim=-1)
        assert self.top_ps is not None and self.top_ks is not None and self.seeds is not None
        assert lengths is not None
        keys = row_keys(self.seeds, to_device(lengths.astype(np.int64), logits.device))
        return sample(logits, self.temps, self.top_ps, self.top_ks, keys)


@dataclass
class StopRule:
    """When a generated request ends; sets its finish_reason (and stop_text for a stop string)."""

    eos_token_ids: frozenset[int]
    max_model_len: int
    decode: Decode | None  # needed for stop strings only

    def __call__(self, req: Request, seq: Seq, new: int = 1) -> bool:
        """``new``: tokens added since the last check (jump-forward adds several at once)."""
        if self.by_token(req, seq, new):
            return True
        if self.by_length(seq):
            req.finish_reason = "length"
            return True
        return False

    def by_token(self, req: Request, seq: Seq, new: int = 1) -> bool:
        """The newest token ends the request (EOS, a stop token id, a stop string in the ``new`` newest
        tokens); checked first, so a stop at the last allowed position reads "stop", not "length"."""
        if self.token_ends(req, seq.token_ids[-1]):
            req.finish_reason = "stop"
            return True
        return bool(req.params.stop) and self._stop_string(req, seq, new)

    def token_ends(self, req: Request, token: int) -> bool:
        """This token id ends the request by itself: an EOS (unless ignored) or one of its stop ids."""
        p = req.params
        return (not p.ignore_eos and token in self.eos_token_ids) or token in p.stop_token_ids

    def by_length(self, seq: Seq) -> bool:
        """The sequence ends whatever its newest token is: max_tokens or the context is reached."""
        n = len(seq.token_ids)
        return n - seq.num_prompt_tokens >= seq.max_tokens or n >= self.max_model_len

    def string_end(self, req: Request, seq: Seq, tokens: list[int]) -> int:
        """How many of ``tokens`` (about to be appended at once) are taken before a stop string is
        complete: all of them when none is. Decoding them one by one would end at that token."""
        stops = req.params.stop
        if not stops or len(tokens) < 2:
            return len(tokens)
        assert self.decode is not None, "stop strings need a tokenizer (checked before the run)"
        done = seq.completion_token_ids

        def has_stop(k: int) -> bool:
            text = self.decode([*done, *tokens[:k]])
            return any(s in text for s in stops)

        if not has_stop(len(tokens)):
            return len(tokens)
        lo, hi = 1, len(tokens)  # the shortest run that completes a stop (a stop stays once there)
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
        return lo

    def _stop_string(self, req: Request, seq: Seq, new: int = 1) -> bool:
        assert self.decode is not None, "stop strings need a tokenizer (checked before the run)"
        stops = req.params.stop
        # a new match ends in the newest tokens: decode only a tail (a char can take 4 byte tokens)
        tail = seq.completion_token_ids[-(4 * max(len(s) for s in stops) + 7 + new) :]
        if not any(s in self.decode(tail) for s in stops):
            return False
        text = self.decode(seq.completion_token_ids)
        cut = min((i for s in stops if (i := text.find(s)) >= 0), default=-1)
        if cut < 0:
            return False
        req.finish_reason, req.stop_text = "stop", text[:cut]
        return True


class TokenHead:
    """Generation: one new token per row.

    pipelined: the engine may read a step's tokens back one step late (``launch``, placeholders in
    the sequences meanwhile), because nothing but the token itself depends on it; a grammar head
    needs each token before it can mask the next step's logits.
    """

    pipelined = True

    def __init__(self, stop: StopRule, decode: Decode | None) -> None:
        self.stop = stop
        self.decode = decode  # None (no tokenizer): results carry token ids and empty text

    @torch.inference_mode()
    def compute(self, model: Any, hidden: torch.Tensor, seqs: Sequence[Seq]) -> list[int]:
        return self.launch(model, hidden, seqs).tolist()

    @torch.inference_mode()
    def launch(self, model: Any, hidden: torch.Tensor, seqs: Sequence[Seq]) -> torch.Tensor:
        """The next token per row [rows] int64, on the device and not read back."""
        return self.pick(model.compute_logits(hidden), seqs)

    def pick(self, logits: torch.Tensor, seqs: Sequence[Seq]) -> torch.Tensor:
        """The next token per row of logits [rows, vocab]: greedy, or keyed sampling per (seed, position)."""
        rows = RowSampling.of(seqs, logits.device)
        # the sampled token's position is the current length of the sequence
        lengths = None if rows.greedy else np.fromiter((s.num_tokens for s in seqs), np.int64, len(seqs))
        return rows.pick(logits, lengths)

    def record(self, req: Request, seq: Seq, output: int, now: float) -> bool:
        seq.add_tokens((output,))
        if not req.first_token_s:
            req.first_token_s = now
        return self.stop(req, seq)

    def results(self, batch: Batch) -> list[Result]:
        results = [Result(index=i, prompt_tokens=len(t)) for i, t in enumerate(batch.tokens)]
        for i, e in batch.errors.items():
            results[i].error, results[i].finish_reason = e, "error"
        for req in batch.requests:
            assert req.seq is not None
            ids = req.seq.completion_token_ids
            text = req.stop_text if req.stop_text is not None else self.decode(ids) if self.decode else ""
            for n, i in enumerate(req.inputs):
                r = results[i]
                r.token_ids, r.text, r.finish_reason = list(ids), text, req.finish_reason  # type: ignore[assignment]
                r.cached_tokens = req.cached_tokens if n == 0 else r.prompt_tokens
                r.latency_s, r.first_token_s, r.error = req.latency_s, req.first_token_s, req.error
        return results
