"""Shared fixtures: the default model folder, one Engine and one HF reference model per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from batchllm.models import resolve_model

    return resolve_model("default")


@pytest.fixture(scope="session")
def engine(default_model_path: Path):
    """The default model on CPU (float32) with sharing on; tests pass enable_sharing per call."""
    from batchllm.engine import Engine

    return Engine(default_model_path, device="cpu", kv_cache_gb=0.5, max_num_batched_tokens=512)


@pytest.fixture(scope="session")
def hf_model(default_model_path: Path):
    """The same folder loaded by transformers (float32, CPU), the parity reference."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
