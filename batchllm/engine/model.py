"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a paged KV cache.

Architecture differences are config switches, not files: attention biases
(Qwen2: q/k/v; Llama/Qwen3 ``attention_bias``: q/k/v/o), per-head q/k RMSNorm
(Qwen3), tied embeddings, RoPE scaling (Llama-3, linear). The model sees token
ids, positions and the attention backend's metadata; it never sees a request.
The runner installs the attention backend (``set_attention``), which owns the
KV cache of every layer.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from batchllm.engine.attention import AttentionBackend
from batchllm.engine.config import ModelConfig, UnsupportedModelError
from batchllm.engine.rope import Rope, rope_table

LOGIT_SLICE = 16384  # vocabulary rows per float32 copy when the CPU computes bf16 logits


class RMSNorm(nn.Module):
    """RMSNorm; with a residual, of x + residual, returning (normed, x + residual) as one fused pass."""

    fused = False  # one Triton kernel (batchllm/kernels/elementwise.py) instead of plain torch; set per model

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        """The sum x + residual is in the residual's dtype (float32 beside 16-bit x: ``residual_dtype``),
        the normed output in x's."""
        if self.fused and x.dim() == 2:
            from batchllm.kernels.elementwise import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            total = x.to(residual.dtype) + residual
            return self._norm(total, x.dtype), total
        return self._norm(x, x.dtype)

    def _norm(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size, self.kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.backend: AttentionBackend | None = None  # installed by the runner

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,
        meta: Any,
        kv: tuple[AttentionBackend, int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Project, store this step's keys/values, attend, project out. kv: (backend, layer) to use
        instead of the runner's backend and this layer's index (hybrid prefill's one-layer cache).
        keep: the token rows to project out (the rest are dropped after attention)."""
        if kv is None:
            assert self.backend is not None, "the runner installs the attention backend"
            kv = (self.backend, self.layer)
        backend, layer = kv
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = backend.rope_store(layer, rope, (q, k, v), meta, fresh_q=self.q_norm is None)  # q_norm's: fresh
        o = backend.forward(layer, q, meta, self.scale).reshape(-1, self.q_size)
        return self.o_proj(o if keep is None else o[keep])


@functools.cache
def has_tma(device: torch.device) -> bool:
    """Hopper (sm_90) and later: Triton turns tensor descriptors into TMA loads there; on earlier GPUs
    into plain loads, and the gate/up kernel's tiles spill (sm_80: ~7.8 KB of spill stores)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    fused = False  # silu(gate) * up as one Triton kernel; set per model
    # from this many rows (prefill steps) the gate/up GEMM writes silu(gate) * up itself
    # (kernels/gate_up.py): half the bytes out, no second pass; below, cuBLAS then silu_mul. On an
    # H100 the kernel ran level with cuBLAS + silu_mul at 4,096 rows and 5-10% ahead at 12,288-16,384
    GEMM_EPILOGUE_MIN_ROWS = 8192

    def gemm_epilogue(self, x: torch.Tensor) -> bool:
        """Whether x's gate/up projection takes the kernel with SiLU-and-mul in its epilogue: fused
        kernels on, a prefill-sized step on a GPU with TMA, TMA-readable x and weight (16-bit: float32
        stays with cuBLAS, as the CPU computes it; 16-byte aligned starts and rows), no bias."""
        w = self.gate_up_proj.weight
        return (
            self.fused
            and x.shape[0] >= self.GEMM_EPILOGUE_MIN_ROWS
            and has_tma(x.device)
            and x.dtype.itemsize == 2
            and w.dtype == x.dtype
            and x.stride(-1) == 1
            and x.stride(0) % 8 == 0
            and x.data_ptr() % 16 == 0
            and w.is_contiguous()
            and w.data_ptr() % 16 == 0
            and self.gate_up_proj.bias is None
            and self.gate_up_proj.in_features % 8 == 0
            and self.down_proj.in_features % 8 == 0
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm_epilogue(x):
            from batchllm.kernels.gate_up import gate_up_silu

            return self.down_proj(gate_up_silu(x, self.gate_up_proj.weight))
        gate_up = self.gate_up_proj(x)
        if self.fused:
            from batchllm.kernels.elementwise import silu_mul

            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class DecoderLayer(nn.Module):
    # the residual stream's dtype (None: the model's); float32 beside 16-bit weights keeps the running
    # sum of 30-odd layer outputs from rounding to 8 bits at every add (``CausalLM.set_residual_dtype``)
    residual_dtype: torch.dtype | None = None

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self,
        rope: Rope,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: Any,
        kv: tuple[AttentionBackend, int] | None = None,
        keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output, residual stream): the add of each block's output into the residual stream
        happens in the next norm, fused with it (x + residual, summed in the same order as before).
        kv, keep: as for ``Attention.forward``; with keep, both outputs hold the kept rows only."""
        if residual is None:
            h, residual = self.input_layernorm(x), x.to(self.residual_dtype or x.dtype)
        else:
            h, residual = self.input_layernorm(x, residual)
        attn = self.self_attn(rope, h, meta, kv, keep)
        if keep is not None:
            residual = residual[keep]
        h, residual = self.post_attention_layernorm(attn, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    """Token ids [T] + positions [T] -> hidden states [T, hidden]; logits only where asked."""

    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("rope", torch.empty(max_len, 2, cfg.head_dim), persistent=False)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head_weight = self.embed_tokens.weight
        else:
            self.lm_head_weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))

    def set_attention(self, backend: AttentionBackend) -> None:
        for layer in self.layers:
            layer.self_attn.backend = backend

    def use_fused_kernels(self, on: bool) -> None:
        """The Triton elementwise kernels (norms, SiLU-and-mul, RoPE) instead of plain torch (CUDA)."""
        self.fused = on
        for m in self.modules():
            if isinstance(m, RMSNorm | MLP):
                m.fused = on

    fused = False
    residual_dtype: torch.dtype | None = None  # the layers' residual stream (None: the model's dtype)

    def set_residual_dtype(self, dtype: torch.dtype | None) -> None:
        """Carry the residual stream in dtype (None: the model's own); norms take and return it."""
        self.residual_dtype = dtype
        for layer in self.layers:
            layer.residual_dtype = dtype

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: Any, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final hidden states [T, hidden], or with keep (token row indices) of those rows only [K, hidden].

        Every layer stores keys and values of all T tokens, which later steps read; the last layer's
        output projection, MLP and norm only matter where a hidden state is read (logits, labels), so
        with keep they run on those rows: a prefill step of 16,384 tokens that samples from 8 saves
        ~88% of one layer's GEMMs (2.8% of a 32-layer model's)."""
        x = self.embed_tokens(input_ids)
        rope = Rope(self.rope, positions, x.dtype, self.fused)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x, residual = layer(rope, x, residual, meta, keep=keep if i == last else None)
        if residual is None:  # no layers
            return self.norm(x) if keep is None else self.norm(x[keep])
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [rows, vocab] in float32 whatever the model dtype. Rounded to bf16 they keep 8 bits:
        0.125 apart near 16, so near-tied greedy picks flip on the rounding alone and label
        log-probabilities move by up to ~6%. On CUDA the bf16 product accumulates and writes float32
        (no float32 copy of the weight); the CPU has no such GEMM and multiplies float32 copies, a
        slice of the vocabulary at a time."""
        w = self.lm_head_weight
        if hidden.dtype == torch.float32:
            return hidden @ w.T
        if hidden.is_cuda:
            return torch.mm(hidden, w.T, out_dtype=torch.float32)
        h = hidden.float()
        return torch.cat([h @ part.float().T for part in w.split(LOGIT_SLICE)], dim=1)


# HF checkpoint name -> (our parameter name, index of the slice in a fused weight or None)
def _hf_name_map(cfg: ModelConfig) -> dict[str, tuple[str, int | None]]:
    names: dict[str, tuple[str, int | None]] = {
        "model.embed_tokens.weight": ("embed_tokens.weight", None),
        "model.norm.weight": ("norm.weight", None),
    }
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = ("lm_head_weight", None)
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            names[f"{hf}{norm}.weight"] = (f"{ours}{norm}.weight", None)
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            for kind in ("weight", "bias"):
                names[f"{hf}self_attn.{proj}.{kind}"] = (f"{ours}self_attn.qkv_proj.{kind}", j)
        for kind in ("weight", "bias"):
            names[f"{hf}self_attn.o_proj.{kind}"] = (f"{ours}self_attn.o_proj.{kind}", None)
            names[f"{hf}mlp.gate_proj.{kind}"] = (f"{ours}mlp.gate_up_proj.{kind}", 0)
            names[f"{hf}mlp.up_proj.{kind}"] = (f"{ours}mlp.gate_up_proj.{kind}", 1)
            names[f"{hf}mlp.down_proj.{kind}"] = (f"{ours}mlp.down_proj.{kind}", None)
        for norm in ("q_norm", "k_norm"):
            names[f"{hf}self_attn.{norm}.weight"] = (f"{ours}self_attn.{norm}.weight", None)
    return names


def _fused_offsets(cfg: ModelConfig, param: str) -> list[int]:
    if "qkv_proj" in param:
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return [0, q, q + kv, q + 2 * kv]
    return [0, cfg.intermediate_size, 2 * cfg.intermediate_size]


def load_model(
    folder: Path, max_len: int, device: torch.device | str, dtype: torch.dtype, dummy: bool = False
) -> CausalLM:
    """Build the model on the meta device, then fill every parameter from the folder's safetensors.

    dummy: random weights from config.json alone (benchmarks of a real architecture without its
    checkpoint; seeded, so runs are repeatable).
    """
    cfg = ModelConfig.from_folder(folder)
    with torch.device("meta"):
        model = CausalLM(cfg, max_len).to(dtype)  # free on meta: no float32 copy of a bf16 model
    model = model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head_weight = model.embed_tokens.weight
    if dummy:
        _fill_random(model)
    else:
        _load_safetensors(model, cfg, folder)
    model.rope = rope_table(cfg, max_len, device)
    model.use_fused_kernels(torch.device(device).type == "cuda")
    return model.eval().requires_grad_(False)


def _fill_random(model: CausalLM) -> None:
    gen = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(0)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
        elif name.endswith("bias"):
            param.data.zero_()
        else:
            param.data.normal_(0.0, 0.02, generator=gen)


def _load_safetensors(model: CausalLM, cfg: ModelConfig, folder: Path) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    names = _hf_name_map(cfg)
    expected = {(ours, part) for ours, part in names.values() if ours in params}
    loaded: set[tuple[str, int | None]] = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key not in names:
                    if key == "lm_head.weight" or "rotary_emb" in key:
                        continue
                    raise UnsupportedModelError(f"model: unexpected weight {key!r} in {path.name}")
                ours, part = names[key]
                if ours not in params:  # e.g. q/k/v biases where the config has none
                    raise UnsupportedModelError(
                        f"model: weight {key!r} in {path.name} has no place in this config"
                    )
                tensor = f.get_tensor(key)
                dest = params[ours].data
                if part is not None:
                    lo, hi = _fused_offsets(cfg, ours)[part : part + 2]
                    dest = dest[lo:hi]
                if tensor.shape != dest.shape:  # copy_ would broadcast a wrong shape silently
                    raise UnsupportedModelError(
                        f"model: weight {key!r} in {path.name} has shape {list(tensor.shape)}, "
                        f"the config gives {list(dest.shape)}"
                    )
                dest.copy_(tensor)
                loaded.add((ours, part))
    if missing := sorted(f"{n}[{p}]" if p is not None else n for n, p in expected - loaded):
        raise UnsupportedModelError(f"model: weights missing from {str(folder)!r}: {missing[:5]}")
