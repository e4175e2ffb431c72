"""Shared fixtures (the default model folder, one Engine and one HF reference model per session)
and the ``gpu`` marker: tests marked ``gpu`` run where CUDA is visible and are skipped elsewhere.

Without CUDA, Triton kernels run in Triton's interpreter: TRITON_INTERPRET=1 is set here, before
any test imports triton (it is read when @triton.jit decorates a kernel), unless already set."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests without CUDA."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA")
    for item in gpu:
        item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _stop_temporary_prefect_servers() -> Iterator[None]:
    """Stop, before pytest closes its captured stderr, any temporary Prefect server this process started.

    Prefect stops such a server at interpreter exit and logs that through its console
    handler, whose stream is the stderr it found when logging was set up: pytest's
    capture file, closed by then, so the log line became a "--- Logging error ---"
    traceback after a green run. Tests use ``prefect_test_harness`` or a configured
    PREFECT_API_URL; this catches any server started otherwise.
    """
    yield
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        for instance in list(getattr(server.SubprocessASGIServer, "_instances", {}).values()):
            instance.stop()


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
