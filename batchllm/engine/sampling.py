"""Sampling parameters and the token sampler.

Sampling is keyed, not streamed: the random numbers for a token depend only on
(request seed, position, vocab id), computed by an integer hash. A request
therefore gets the same tokens whatever batch it runs in, on CPU or CUDA, and
after a preemption that recomputes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from batchllm.engine.attention.base import to_device

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    """How to generate one request. temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", _as_tuple(self.stop, "stop"))
        object.__setattr__(self, "stop_token_ids", _as_tuple(self.stop_token_ids, "stop_token_ids"))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed: must be an integer or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop: every stop string must be a non-empty str, got {s!r}")
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise ValueError(f"stop_token_ids: every id must be an integer >= 0, got {t!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos: must be a bool, got {self.ignore_eos!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _as_tuple(value: object, name: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str | int):
        return (value,)
    if isinstance(value, Iterable):
        return tuple(value)
    raise ValueError(f"{name}: must be a list, got {value!r}")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (values kept below 2**32 inside int64, so nothing overflows)."""
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    x = ((x ^ (x >> 16)) * 0x45D9F3B) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sampled row from its request seed (int64) and token position."""
    lo, hi = seeds & _MASK32, (seeds >> 32) & _MASK32
    return _mix32(lo ^ _mix32(hi ^ _mix32(positions.to(torch.int64) + 0x9E3779B9)))


def exponential_noise(keys: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] that depends only on each row's key and the vocab id."""
    vocab = torch.arange(vocab_size, dtype=torch.int64, device=keys.device)
    h = _mix32(keys[:, None] ^ _mix32(vocab[None, :] + 0x7F4A7C15))
    u = ((h >> 8).to(torch.float32) + 0.5) / float(1 << 24)  # uniform in (0, 1)
    return -torch.log(u)


def sample(
    logits: torch.Tensor,
    temperatures: np.ndarray,
    top_ps: np.ndarray,
    top_ks: np.ndarray,
    keys: torch.Tensor,
) -> torch.Tensor:
    """Next token per row of logits [rows, vocab]; rows with temperature 0 take the argmax.

    The per-row parameters are host arrays, so which rows draw and whether any truncates are
    decided on the host: nothing here waits for the device (the engine reads tokens back a step
    late). keys: one per row, on the logits' device (``row_keys``).
    """
    temperatures, top_ps, top_ks = np.asarray(temperatures), np.asarray(top_ps), np.asarray(top_ks)
    greedy = logits.argmax(dim=-1)
    random = np.flatnonzero(temperatures > 0)
    if not random.size:
        return greedy
    dev = logits.device
    rows = to_device(random.astype(np.int64), dev)
    temps = to_device(temperatures[random].astype(np.float32), dev)
    x = logits[rows].float() / temps[:, None]
    ks, ps = top_ks[random], top_ps[random]
    # only the rows that ask for it are truncated: what a row draws never depends on the other rows
    if (cut := np.flatnonzero((ks > 0) | (ps < 1.0))).size:
        at = to_device(cut.astype(np.int64), dev)
        x[at] = _apply_top_k_top_p(
            x[at], to_device(ks[cut].astype(np.int64), dev), to_device(ps[cut].astype(np.float32), dev)
        )
    probs = torch.softmax(x, dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p without a device sync
    token = (probs / exponential_noise(keys[rows], x.shape[-1])).argmax(dim=-1)
    return greedy.index_put((rows,), token)


def _apply_top_k_top_p(x: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    sorted_x, order = x.sort(dim=-1, descending=True)
    vocab = x.shape[-1]
    k = torch.where(top_ks > 0, top_ks.clamp(max=vocab), vocab)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_x.masked_fill(drop, -math.inf), dim=-1)
    # keep the smallest set whose mass reaches top_p (the first token always stays); top_p 1 keeps all,
    # though a float32 running sum may round to 1 before the last token
    drop |= ((probs.cumsum(dim=-1) - probs) >= top_ps[:, None]) & (top_ps < 1.0)[:, None]
    sorted_x = sorted_x.masked_fill(drop, -math.inf)
    return torch.full_like(x, -math.inf).scatter(-1, order, sorted_x)
