"""RoPE tables of random angles for kernel tests: rows of (cos, sin), halves repeated as in
``batchllm.engine.rope.rope_table``. Real rotations, so bf16 queries and keys keep their size and their
rounding (random cos and sin values would scale them by up to ~3x)."""

from __future__ import annotations

import torch


def random_rope_table(rows: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, 2, head_dim] float32 on the CPU: row p holds the cos and the sin of position p's angles."""
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 2 * torch.pi
    half = torch.stack([angles.cos(), angles.sin()], dim=1)
    return torch.cat([half, half], dim=-1)
