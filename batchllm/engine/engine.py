"""Engine: the public entry point of the native engine (API shape; internals land next)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from batchllm.engine.outputs import ClassifyResult, EngineStats, Result
from batchllm.engine.sampling import SamplingParams

Prompt = str | Sequence[int] | np.ndarray
Progress = Callable[[int, int], None]


class Engine:
    """A model loaded for offline batch inference.

    model: "default" or an HF folder of a Llama-family model. device: "cpu" or
    "cuda" (dtype float32 on CPU, bfloat16 on CUDA unless given).
    enable_sharing: plan prompts by shared prefix and compute each prefix once
    (False runs every request as a plain one, in input order).
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
        seed: int | None = None,
    ) -> None:
        raise NotImplementedError

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        progress: Progress | None = None,
        enable_sharing: bool | None = None,
    ) -> list[Result]:
        """Generate for every prompt (text or token ids); results in input order."""
        raise NotImplementedError

    def classify(
        self,
        prompts: Prompt | Sequence[Prompt],
        labels: Sequence[str],
        *,
        progress: Progress | None = None,
        enable_sharing: bool | None = None,
    ) -> list[ClassifyResult]:
        """Label distribution at each prompt's last position, restricted to the labels' first tokens."""
        raise NotImplementedError

    @property
    def stats(self) -> EngineStats:
        """Statistics of the last generate/classify call."""
        raise NotImplementedError
