"""Engine options checked before a model loads, and the model folder they name.

Kept apart from the engine so every option's rule (and its error message,
which names the option) is in one place.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from batchllm.models import DEFAULT_MODEL, ModelError, resolve_model

if TYPE_CHECKING:
    import torch

DTYPES = ("float32", "bfloat16", "float16")
LOAD_FORMATS = ("safetensors", "dummy")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(device: str) -> torch.device:
    """The engine's device with its index: "cuda" is the GPU current when the engine is built, kept for
    its life (``runner.on_device`` makes it current for each run)."""
    import torch

    dev = torch.device(device)
    return (
        torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" and dev.index is None else dev
    )


def check_options(
    *,
    device: str,
    dtype: str | None,
    max_model_len: int | None,
    block_size: int,
    kv_cache_gb: float | None,
    kv_cache_tokens: int | None,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int | None,
    enable_sharing: bool,
    decode_reserve: float,
    seed: int | None,
    attention: str,
    load_format: str,
    cuda_graphs: bool,
    measured_padding: bool,
    hybrid_prefill: bool,
    pipelined_decode: bool,
    float32_residual: bool,
) -> None:
    """Every Engine option that can be checked before the model loads; a ValueError names the option."""
    if not isinstance(device, str) or device.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"device: must be 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not _cuda_available():
        raise ValueError("device: 'cuda' requested but CUDA is not available")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: must be one of {list(DTYPES)}, got {dtype!r}")
    for name, value, low in (
        ("max_model_len", max_model_len, 1),
        ("kv_cache_tokens", kv_cache_tokens, 1),
        ("max_num_batched_tokens", max_num_batched_tokens, 1),
    ):
        if value is not None and (not _is_int(value) or value < low):
            raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    if not _is_int(block_size) or block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size: must be a power of two (1, 2, 4, 8, 16, ...), got {block_size!r}")
    if kv_cache_gb is not None and not (
        _is_real(kv_cache_gb) and math.isfinite(kv_cache_gb) and kv_cache_gb > 0
    ):
        raise ValueError(f"kv_cache_gb: must be a number > 0, got {kv_cache_gb!r}")
    if not _is_real(gpu_memory_utilization) or not 0.0 < gpu_memory_utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization: must be in (0, 1], got {gpu_memory_utilization!r}")
    if not _is_real(decode_reserve) or not 0.0 < decode_reserve <= 1.0:
        raise ValueError(f"decode_reserve: must be in (0, 1], got {decode_reserve!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed: must be an integer or None, got {seed!r}")
    if not isinstance(attention, str):  # the name and its device: attention.resolve_name
        raise ValueError(f"attention: must be a backend name, got {attention!r}")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format: must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}")
    for name, flag in (
        ("enable_sharing", enable_sharing),
        ("cuda_graphs", cuda_graphs),
        ("measured_padding", measured_padding),
        ("hybrid_prefill", hybrid_prefill),
        ("pipelined_decode", pipelined_decode),
        ("float32_residual", float32_residual),
    ):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: must be a bool, got {flag!r}")


def model_folder(model: str | os.PathLike[str], load_format: str) -> Path:
    """The HF folder; dummy weights need only its config.json (no safetensors)."""
    if load_format == "dummy" and str(model) != DEFAULT_MODEL:
        path = Path(model).expanduser()
        if not (path / "config.json").is_file():
            raise ModelError(f"model: {str(path)!r} has no config.json; expected an HF model folder")
        return path
    return resolve_model(model)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)
