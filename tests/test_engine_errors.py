"""Bad input: clear errors that name the problem; per-request errors leave the batch running."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchllm.engine import Engine, SamplingParams
from batchllm.engine.config import UnsupportedModelError
from batchllm.models import ModelError


def test_unknown_model_path(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file or folder"):
        Engine(tmp_path / "missing")


def test_unsupported_architecture(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    save_file({"wte.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(UnsupportedModelError, match=r"unsupported architecture.*GPT2LMHeadModel"):
        Engine(folder)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(seed="x"), "seed"),
        (dict(stop=[""]), "stop"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
        (dict(ignore_eos="yes"), "ignore_eos"),
    ],
)
def test_invalid_sampling_params_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        SamplingParams(**kwargs)


def test_invalid_engine_arguments(default_model_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^device:"):
        Engine(default_model_path, device="tpu")
    with pytest.raises(ValueError, match=r"^max_model_len:"):
        Engine(default_model_path, max_model_len=10**9)
    with pytest.raises(ValueError, match=r"^dtype:"):
        Engine(default_model_path, dtype="int3")


def test_bad_requests_get_error_results_and_the_rest_completes(default_model_path: Path) -> None:
    engine = Engine(default_model_path, max_model_len=64, kv_cache_gb=0.05)
    good = list(range(200, 220))
    prompts = [good, [], list(range(100, 180)), [5, 49152, 7], good[:10], "Hello there"]
    calls: list[tuple[int, int]] = []
    results = engine.generate(
        prompts, SamplingParams(max_tokens=3, ignore_eos=True), progress=lambda d, t: calls.append((d, t))
    )
    assert [r.index for r in results] == list(range(6))
    assert calls[-1] == (6, 6) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert results[1].finish_reason == "error" and "empty prompt" in results[1].error
    assert "80 tokens is longer than max_model_len=64" in results[2].error
    assert "token id 49152 is outside the vocabulary" in results[3].error
    for i in (0, 4, 5):
        assert (
            results[i].error is None
            and len(results[i].token_ids) == 3
            and results[i].finish_reason == "length"
        )
    for i in (1, 2, 3):
        assert results[i].token_ids == [] and results[i].text == ""
    assert engine.stats.num_errors == 3 and engine.stats.num_requests == 6


def test_generation_stops_at_max_model_len(default_model_path: Path) -> None:
    engine = Engine(default_model_path, max_model_len=32, kv_cache_gb=0.05)
    result = engine.generate([list(range(300, 330))], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert result.finish_reason == "length" and len(result.token_ids) == 2


def test_request_larger_than_the_kv_pool(default_model_path: Path) -> None:
    engine = Engine(default_model_path, kv_cache_gb=0.004)  # a handful of blocks
    results = engine.generate(
        [list(range(100, 110)), list(range(100, 600))], SamplingParams(max_tokens=2, ignore_eos=True)
    )
    assert results[0].error is None and len(results[0].token_ids) == 2
    assert results[1].finish_reason == "error" and "KV blocks" in results[1].error


def test_params_list_must_match_prompts(engine) -> None:
    with pytest.raises(ValueError, match=r"^params: got 1 SamplingParams for 2 prompts"):
        engine.generate([[1, 2], [3, 4]], [SamplingParams()])


def test_stop_strings_and_stop_token_ids(engine) -> None:
    tok = engine.tokenizer
    prompt = tok.encode(
        tok.apply_chat_template([{"role": "user", "content": "Count from 1 to 20, comma separated."}])
    )
    full = engine.generate([prompt], SamplingParams(max_tokens=30, ignore_eos=True))[0]
    assert "5" in full.text
    cut = engine.generate([prompt], SamplingParams(max_tokens=30, stop=["5"]))[0]
    assert cut.finish_reason == "stop" and full.text.startswith(cut.text) and "5" not in cut.text
    stop_id = full.token_ids[3]
    by_id = engine.generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=[stop_id]))[0]
    assert (
        by_id.finish_reason == "stop"
        and by_id.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    )


def test_prompt_forms(engine) -> None:
    import numpy as np

    params = SamplingParams(max_tokens=2, ignore_eos=True)
    ids = engine.tokenizer.encode("The sky is")
    single_text = engine.generate("The sky is", params)
    single_ids = engine.generate(ids, params)
    rows = engine.generate(np.array([ids, ids], dtype=np.int32), params)
    assert len(single_text) == len(single_ids) == 1 and len(rows) == 2
    assert single_text[0].token_ids == single_ids[0].token_ids == rows[1].token_ids
    assert engine.generate([], params) == []
    with pytest.raises(ValueError, match=r"^prompts: each prompt must be"):
        engine.generate([[1.5, 2.5]], params)
