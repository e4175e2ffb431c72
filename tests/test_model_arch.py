"""Architectures without shipped weights, checked against transformers' own classes.

Each case builds a small HF config, initializes the HF model with random
weights (biases and norm weights randomized too, so every switch matters),
saves it as a folder, loads that folder into our model and compares float32
logits at every position: one-shot prefill, chunked prefill over a paged cache
with scattered blocks, and decode steps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from batchllm.engine.config import ModelConfig, UnsupportedModelError
from batchllm.engine.model import load_model
from batchllm.engine.rope import rope_inv_freq
from batchllm.engine.runner import ModelRunner, build_layout
from batchllm.engine.sequence import Sequence

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=211,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
)

CASES = {
    "llama3-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
            tie_word_embeddings=True,
        ),
    ),
    "llama-bias-untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=False, rope_theta=10000.0),
    ),
    "llama-linear-rope": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(rope_scaling=dict(rope_type="linear", factor=4.0), tie_word_embeddings=False),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None, tie_word_embeddings=False)),
}


def _hf_folder(tmp_path: Path, case: str) -> tuple[Path, torch.nn.Module]:
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**SMALL, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    folder = tmp_path / case
    model.save_pretrained(folder)
    return folder, model


@dataclass
class _Chunk:
    seq: Sequence
    start: int
    num_tokens: int
    sample: bool = False
    two_level: bool = True


def _logits_all_positions(runner: ModelRunner, steps: list[list[_Chunk]]) -> dict[int, list[torch.Tensor]]:
    """Run the steps in order; logits of every computed position, per seq_id."""
    out: dict[int, list[torch.Tensor]] = {}
    with torch.inference_mode():
        for chunks in steps:
            layout = build_layout(chunks, runner.block_size)
            meta = runner.attention.prepare(layout)
            ids, pos = torch.from_numpy(layout.input_ids), torch.from_numpy(layout.positions)
            logits = runner.model.compute_logits(runner.model(ids, pos, meta))
            for c, rows in zip(chunks, logits.split([c.num_tokens for c in chunks]), strict=True):
                out.setdefault(c.seq.seq_id, []).append(rows)
    return out


def _seq(seq_id: int, tokens: list[int], blocks: list[int]) -> Sequence:
    return Sequence(seq_id, seq_id, tokens, len(tokens), 1, block_table=blocks)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    folder, hf = _hf_folder(tmp_path, case)
    model = load_model(folder, max_len=512, device="cpu", dtype=torch.float32)
    runner = ModelRunner(model, num_blocks=96, block_size=4)
    gen = torch.Generator().manual_seed(1)
    lengths = [150, 37, 5, 1]  # 150 > the Llama-3 original context (64): scaled frequencies matter
    tokens = [torch.randint(0, SMALL["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    perm = torch.randperm(96, generator=gen).tolist()  # scattered physical blocks
    seqs, used = [], 0
    for i, t in enumerate(tokens):
        nb = -(-len(t) // 4)
        seqs.append(_seq(i, t, perm[used : used + nb]))
        used += nb
    # step 1: seq 0 prefill in two chunks across steps, others in one; step 3: decode-like single tokens
    steps = [
        [_Chunk(seqs[0], 0, 70), _Chunk(seqs[1], 0, 36), _Chunk(seqs[3], 0, 1)],
        [_Chunk(seqs[0], 70, 79), _Chunk(seqs[2], 0, 5)],
        [_Chunk(seqs[0], 149, 1), _Chunk(seqs[1], 36, 1)],
    ]
    ours = _logits_all_positions(runner, steps)
    with torch.no_grad():
        for seq in seqs:
            ref = hf(torch.tensor([seq.token_ids])).logits[0]
            got = torch.cat(ours[seq.seq_id])
            assert got.shape == ref.shape
            err = (got - ref).abs().max().item()
            assert err < 1e-4, f"{case}: seq of {seq.num_tokens} tokens, max abs logit error {err:.2e}"
            assert ref.abs().max() > 1.0  # the weights are not degenerate


def test_two_level_attention_matches_plain(tmp_path: Path) -> None:
    """Members reading a shared prefix through two-level attention give the same logits as plain sequences."""
    folder, hf = _hf_folder(tmp_path, "qwen3")
    model = load_model(folder, max_len=512, device="cpu", dtype=torch.float32)
    runner = ModelRunner(model, num_blocks=64, block_size=4)
    gen = torch.Generator().manual_seed(2)
    prefix = torch.randint(0, 211, (24,), generator=gen).tolist()
    suffixes = [torch.randint(0, 211, (n,), generator=gen).tolist() for n in (9, 1, 4)]
    prefix_seq = Sequence(
        100, None, prefix, len(prefix), 0, is_prefix=True, block_table=[10, 3, 7, 20, 21, 1]
    )
    members = []
    for i, s in enumerate(suffixes):
        own = [30 + 5 * i + j for j in range(-(-len(s) // 4) + 1)]
        seq = Sequence(i, i, prefix + s, len(prefix) + len(s), 1, group_id=0, num_shared_tokens=24)
        seq.block_table = prefix_seq.block_table + own
        members.append(seq)
    steps = [
        [_Chunk(prefix_seq, 0, 24)],
        [_Chunk(members[0], 24, 5), _Chunk(members[1], 24, 1), _Chunk(members[2], 24, 4)],
        [_Chunk(members[0], 29, 4)],
    ]
    ours = _logits_all_positions(runner, steps)
    with torch.no_grad():
        for seq in members:
            ref = hf(torch.tensor([seq.token_ids])).logits[0, 24:]
            err = (torch.cat(ours[seq.seq_id]) - ref).abs().max().item()
            assert err < 1e-4, f"member {seq.seq_id}: max abs logit error {err:.2e}"


def test_llama3_inv_freq_matches_transformers() -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    _, _, extra = CASES["llama3-rope"]
    config = transformers.LlamaConfig(**SMALL, **extra)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    ours = rope_inv_freq(ModelConfig.from_dict(config.to_dict() | {"architectures": ["LlamaForCausalLM"]}))
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)


def test_unsupported_architecture_is_named() -> None:
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_dict({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match="yarn"):
        ModelConfig.from_dict(
            {
                "architectures": ["LlamaForCausalLM"],
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0},
                **{k: v for k, v in SMALL.items()},
            }
        )


@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("case", ["llama3-rope", "qwen3"])
def test_keep_computes_the_last_layer_on_the_rows_read(tmp_path: Path, case: str, layers: int) -> None:
    """keep (the rows whose hidden state is read): the same rows as the whole forward gives, in keep's
    order (duplicates and no rows too), and the keys and values of every token still stored."""
    config_cls, model_cls, extra = CASES[case]
    config = getattr(transformers, config_cls)(**{**SMALL, "num_hidden_layers": layers}, **extra)
    torch.manual_seed(0)
    folder = tmp_path / case
    getattr(transformers, model_cls)(config).save_pretrained(folder)
    model = load_model(folder, max_len=512, device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, SMALL["vocab_size"], (48,), generator=gen).tolist()
    chunks = [
        _Chunk(_seq(0, tokens[:30], list(range(8))), 0, 30),
        _Chunk(_seq(1, tokens[30:], [8, 9, 10, 11, 12]), 0, 18),
    ]
    for keep in ([47, 3, 29, 3, 0], [29, 47], []):
        results, caches = [], []
        for rows in (None, keep):
            runner = ModelRunner(model, num_blocks=16, block_size=4, attention="torch")
            layout = build_layout(chunks, runner.block_size)
            meta = runner.attention.prepare(layout)
            ids, pos = torch.from_numpy(layout.input_ids), torch.from_numpy(layout.positions)
            with torch.inference_mode():
                kept = None if rows is None else torch.tensor(rows, dtype=torch.int64)
                results.append(model(ids, pos, meta, kept))
            caches.append(runner.kv_cache.clone())
        full, part = results
        assert part.shape == (len(keep), SMALL["hidden_size"])
        torch.testing.assert_close(part, full[keep], atol=1e-5, rtol=1e-5)
        assert torch.equal(caches[0], caches[1])  # every token's keys and values, both ways


def test_checkpoint_weights_that_do_not_fit_the_config_are_named(tmp_path: Path) -> None:
    """q/k/v biases under a config without them, and a weight of the wrong shape (copy_ would broadcast
    it): a clear error naming the weight, never a KeyError or a silently wrong model."""
    from safetensors.torch import load_file, save_file

    config = transformers.LlamaConfig(**SMALL, attention_bias=True)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"attention_bias": False}))
    with pytest.raises(UnsupportedModelError, match=r"self_attn\.[qkv]_proj\.bias.*has no place"):
        load_model(tmp_path, 64, "cpu", torch.float32)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.0.input_layernorm.weight"] = torch.tensor([2.0])
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match=r"input_layernorm\.weight.*shape \[1\]"):
        load_model(tmp_path, 64, "cpu", torch.float32)
