"""Rotary position embedding (rotate-half): the inverse frequencies with Llama-3 or linear scaling, the
cos/sin table by position, and one forward's RoPE (a Triton kernel on CUDA, plain torch elsewhere)."""

from __future__ import annotations

import math

import torch

from batchllm.engine.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in float32, with Llama-3 or linear scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        return inv_freq / factor
    # Llama 3: keep high frequencies, divide low ones by factor, interpolate in between
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_table(cfg: ModelConfig, max_len: int, device: torch.device | str) -> torch.Tensor:
    """cos/sin [max_len, 2, head_dim] (float32) of rotate-half RoPE, indexed by position."""
    inv_freq = rope_inv_freq(cfg).to(device)
    freqs = torch.arange(max_len, device=device).float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return torch.stack([emb.cos(), emb.sin()], dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim], cos/sin [T, 1, head_dim]."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


class Rope:
    """One forward's rotary embedding: the fused kernel (in place, or into a fresh tensor), or cos/sin
    gathered once for all layers."""

    def __init__(self, table: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, fused: bool) -> None:
        half = table.shape[-1] // 2
        self.fused = fused and (half & (half - 1)) == 0  # the kernel's tl.arange needs a power of two
        self.table, self.positions = table, positions
        if not self.fused:
            cs = table[positions]  # [T, 2, head_dim]
            self.cos, self.sin = cs[:, None, 0].to(dtype), cs[:, None, 1].to(dtype)

    def __call__(self, x: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """fresh: the result in a new contiguous tensor (the queries: FA3 reads plain rows), else in place
        on the fused path (the keys: stored right after)."""
        if self.fused:
            from batchllm.kernels.elementwise import rope_

            out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if fresh else None
            return rope_(x, self.positions, self.table, out)
        return apply_rope(x, self.cos, self.sin)

    def rotate_store(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        caches: tuple[torch.Tensor, torch.Tensor],
        slots: torch.Tensor,
        fresh: bool,
    ) -> torch.Tensor:
        """The fused path's ``self(q, fresh)``, ``self(k)`` and the paged store of k and v into caches
        (k, v) at slots, as one kernel; k is rotated in place. Returns the rotated queries."""
        from batchllm.kernels.elementwise import rope_store

        assert self.fused, "rotate_store is the fused kernel's"
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if fresh else None
        return rope_store(q, k, v, self.positions, self.table, caches[0], caches[1], slots, out)
