"""Grammar-constrained generation (DESIGN 4.5) with xgrammar, the library vLLM and SGLang use.

A ``Constraint`` (a JSON schema, a regex or an EBNF grammar) is compiled once
per tokenizer and cached by its hash (``GrammarCache``). ``GrammarHead`` is the
generation head with one matcher per sequence: each step it fills a token
bitmask for the sampled rows (xgrammar's batch filler, threads in C++), applies
it to the logits of the whole batch in one vectorized op (CPU or CUDA), then
chooses tokens exactly as ``TokenHead`` does, so greedy and seeded sampling (top_p
1; a nucleus is taken after the mask) pick the same token as unconstrained
decoding whenever that token is allowed.
Each chosen token advances its matcher. With ``jump_forward`` the tokens the
grammar forces next are appended without sampling them (their KV is computed
as a chunk of the next step).

A matcher lives as long as its sequence and counts the tokens it accepted; if
that count ever disagrees with the sequence's generated tokens (a recompute
that rebuilt the sequence differently), it is reset and replays them.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from batchllm.engine.heads import Decode, StopRule, TokenHead
from batchllm.engine.requests import Request
from batchllm.engine.sequence import Sequence as Seq

GrammarKind = Literal["json_schema", "regex", "ebnf"]


@dataclass(frozen=True)
class Constraint:
    """What every generated token must keep valid. any_whitespace: free JSON whitespace (else compact)."""

    kind: GrammarKind
    source: str
    any_whitespace: bool = True
    jump_forward: bool = False

    @property
    def key(self) -> str:
        """The compiled grammar's cache key (jump_forward changes decoding, not the grammar)."""
        text = f"{self.kind}\0{self.any_whitespace}\0{self.source}"
        return hashlib.sha256(text.encode()).hexdigest()


def build_grammar(constraint: Constraint) -> Any:
    """The tokenizer-independent grammar (``xgrammar.Grammar``); raises ValueError when it cannot be built."""
    import xgrammar as xgr

    try:
        if constraint.kind == "json_schema":
            return xgr.Grammar.from_json_schema(
                constraint.source, any_whitespace=constraint.any_whitespace, strict_mode=True
            )
        if constraint.kind == "regex":
            return xgr.Grammar.from_regex(constraint.source)
        return xgr.Grammar.from_ebnf(constraint.source)
    except (RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [repr(exc)])[0]
        raise ValueError(re.sub(r"^\[[\d:]+\] \S+: ", "", first)) from None  # drop the C++ log prefix


class GrammarCache:
    """Compiled grammars of one model's tokenizer, by constraint key (one compile per job and schema)."""

    def __init__(self, folder: Path, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.folder, self.vocab_size, self.eos_token_ids = Path(folder), vocab_size, eos_token_ids
        self._compiler: Any = None
        self._compiled: dict[str, Any] = {}
        self.compile_s = 0.0

    def _get_compiler(self) -> Any:
        if self._compiler is None:
            import xgrammar as xgr
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast(tokenizer_file=str(self.folder / "tokenizer.json"))
            stop = sorted(self.eos_token_ids)
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=self.vocab_size, stop_token_ids=stop)
            # special tokens (<|im_start|>, ...) as empty strings, which xgrammar never allows: as text
            # they could fill a JSON string, and decoding skips them (the stored value would differ)
            vocab = [""] * self.vocab_size
            special = {i for i, added in tok.added_tokens_decoder.items() if added.special} - set(stop)
            for text, i in tok.get_vocab().items():
                if i < self.vocab_size and i not in special:
                    vocab[i] = text
            info = xgr.TokenizerInfo(
                vocab, info.vocab_type, vocab_size=self.vocab_size, stop_token_ids=stop,
                add_prefix_space=info.add_prefix_space,
            )  # fmt: skip
            self._compiler = xgr.GrammarCompiler(info)
        return self._compiler

    def get(self, constraint: Constraint) -> Any:
        """The compiled grammar (``xgrammar.CompiledGrammar``), compiled on first use."""
        key = constraint.key
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self._get_compiler().compile_grammar(build_grammar(constraint))
            self.compile_s += time.perf_counter() - t0
        return self._compiled[key]


@dataclass
class _State:
    matcher: Any  # xgrammar.GrammarMatcher
    accepted: int = 0  # generated tokens the matcher has accepted


class GrammarHead(TokenHead):
    """Generation under a grammar: masked logits, one matcher per sequence, optional jump-forward."""

    pipelined = False  # each step's mask needs the tokens of the step before

    def __init__(
        self, stop: StopRule, decode: Decode | None, compiled: Any, vocab_size: int, jump_forward: bool
    ) -> None:
        import xgrammar as xgr

        super().__init__(stop, decode)
        self._xgr = xgr
        self.compiled, self.vocab_size, self.jump_forward = compiled, vocab_size, jump_forward
        self._states: dict[int, _State] = {}
        self._filler = xgr.BatchGrammarMatcher()
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.mask_s = 0.0  # filling and applying masks (host + device)
        self.forced_tokens = 0  # tokens appended by jump-forward

    @torch.inference_mode()
    def compute(self, model: Any, hidden: torch.Tensor, seqs: Sequence[Seq]) -> list[int]:
        logits = model.compute_logits(hidden)
        t0 = time.perf_counter()
        self.apply_mask(logits, seqs)
        self.mask_s += time.perf_counter() - t0
        return self.pick(logits, seqs).tolist()

    def apply_mask(self, logits: torch.Tensor, seqs: Sequence[Seq]) -> None:
        """Set the logits of every token a row's grammar forbids to -inf, in place (one op per batch)."""
        n = len(seqs)
        if self._bitmask.shape[0] < n:
            self._bitmask = self._xgr.allocate_token_bitmask(
                max(n, 2 * self._bitmask.shape[0]), self.vocab_size
            )
            if logits.is_cuda:
                self._bitmask = self._bitmask.pin_memory()
        bitmask = self._bitmask[:n]
        self._filler.batch_fill_next_token_bitmask([self._state(s).matcher for s in seqs], bitmask)
        self._xgr.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size
        )

    def _state(self, seq: Seq) -> _State:
        state = self._states.get(seq.seq_id)
        if state is None:
            state = self._states[seq.seq_id] = _State(self._xgr.GrammarMatcher(self.compiled))
        if state.accepted != seq.num_generated:  # rebuilt: replay the sequence's own tokens
            state.matcher.reset()
            for token in seq.completion_token_ids:
                if not state.matcher.accept_token(token):
                    break
            state.accepted = seq.num_generated
        return state

    def record(self, req: Request, seq: Seq, output: int, now: float) -> bool:
        state = self._states[seq.seq_id]
        if not state.matcher.accept_token(output):  # only if the mask and the matcher disagree
            seq.add_tokens((output,))
            req.finish_reason, req.error = "error", f"grammar: token {output} was not allowed"
            return self._end(seq)
        state.accepted += 1
        if super().record(req, seq, output, now):
            return self._end(seq)
        if self.jump_forward and (forced := self._forced(state, seq)):
            # a stop id (or EOS) among them ends the request there, as decoding them one by one would
            ends = next((k + 1 for k, t in enumerate(forced) if self.stop.token_ends(req, t)), len(forced))
            forced = forced[: self.stop.string_end(req, seq, forced[:ends])]
            seq.add_tokens(forced)
            state.accepted += len(forced)
            self.forced_tokens += len(forced)
            if self.stop(req, seq, new=len(forced)):
                return self._end(seq)
        return False

    def _forced(self, state: _State, seq: Seq) -> list[int]:
        """Tokens the grammar forces next, cut to the room left before max_tokens or the context end."""
        room = min(seq.max_tokens - seq.num_generated, self.stop.max_model_len - seq.num_tokens)
        forced = state.matcher.find_jump_forward_tokens()[: max(room, 0)]
        for k, token in enumerate(forced):
            if not state.matcher.accept_token(token):
                return forced[:k]
        return forced

    def _end(self, seq: Seq) -> bool:
        self._states.pop(seq.seq_id, None)
        return True
