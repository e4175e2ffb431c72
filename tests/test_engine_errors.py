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


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        (dict(block_size=0), "block_size"),
        (dict(block_size=2.0), "block_size"),
        (dict(kv_cache_gb=0), "kv_cache_gb"),
        (dict(kv_cache_gb=float("inf")), "kv_cache_gb"),
        (dict(kv_cache_tokens=0), "kv_cache_tokens"),
        (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
        (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
        (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
        (dict(max_model_len=0), "max_model_len"),
        (dict(decode_reserve=0.0), "decode_reserve"),
        (dict(seed="x"), "seed"),
        (dict(enable_sharing="yes"), "enable_sharing"),
        (dict(attention="flash"), "attention"),
        (dict(load_format="gguf"), "load_format"),
        (dict(cuda_graphs=1), "cuda_graphs"),
    ],
)
def test_invalid_engine_options_name_the_option(default_model_path: Path, kwargs: dict, option: str) -> None:
    with pytest.raises(ValueError, match=rf"^{option}:"):
        Engine(default_model_path, **kwargs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"kv_cache_gbb": 0.5},
            "engine_options.kv_cache_gbb: the native engine has no such option (did you mean ",
        ),
        (
            {"nothing_like_it": 1},
            "engine_options.nothing_like_it: the native engine has no such option; it has ",
        ),
        ({"block_size": 0}, "engine_options.block_size: 0 differs from block_size 16"),
        ({"device": "cuda"}, "engine_options.device: is the job's own 'device' field"),
        ({"attention": "tritonn"}, "engine_options.attention: must be one of auto, torch, triton"),
        (
            {"attention": "fa3"},
            "engine_options.attention: backend 'fa3' runs on CUDA only, the device is 'cpu'",
        ),
    ],
)
def test_job_engine_options_are_checked_before_the_run(tmp_path: Path, options: dict, message: str) -> None:
    """A job's engine_options fail the pre-run check (``job.check``) naming the option, as the Engine
    would refuse them after the rows were read."""
    from batchllm import job
    from batchllm.spec import SpecError, parse_spec
    from tests.product_fixtures import spec_dict

    spec = parse_spec(spec_dict(tmp_path / "w.duckdb", device="cpu", engine_options=options))
    with pytest.raises(SpecError) as err:
        job.check(spec)
    assert str(err.value).startswith(message), str(err.value)
    job.check(
        parse_spec(spec_dict(tmp_path / "w.duckdb", engine_options={"kv_cache_gb": 0.5, "attention": "cpu"}))
    )
    # a CUDA-only backend is refused for a cpu job only: a job on the GPU may ask for it
    from batchllm.backends.base import options_problem

    assert options_problem("native", {"attention": "fa3"}, "cuda") is None
    assert options_problem("native", {"attention": "flashinfer"}, "cuda:1") is None


def test_kv_cache_tokens_sizes_the_pool(default_model_path: Path) -> None:
    engine = Engine(default_model_path, block_size=16, kv_cache_tokens=100, kv_cache_gb=5.0)
    assert engine.num_kv_blocks == 7  # tokens win over GB, rounded up to whole blocks


def test_kv_pool_on_a_gpu_leaves_room_for_activations() -> None:
    from batchllm.engine.kv import pool_blocks

    gib = 1 << 30
    opts = dict(kv_cache_tokens=None, kv_cache_gb=None, gpu_memory_utilization=0.9)
    # 100 GiB GPU, 20 GiB in use after loading: 90 - 20 - 2 (margin) = 68 GiB of 1 MiB blocks
    n = pool_blocks(1 << 20, 16, gpu_memory=(80 * gib, 100 * gib), activation_margin=2 * gib, **opts)
    assert n == 68 * 1024
    with pytest.raises(ValueError, match=r"^gpu_memory_utilization: 0.9 of 100.0 GiB leaves no room"):
        pool_blocks(1 << 20, 16, gpu_memory=(5 * gib, 100 * gib), activation_margin=gib, **opts)
    assert pool_blocks(1 << 20, 16, gpu_memory=None, activation_margin=0, **opts) == 2048  # CPU: 2 GB


@pytest.fixture(scope="module")
def dummy_folder(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with config.json alone (no weights, no tokenizer), as GPU benchmarks use."""
    folder = tmp_path_factory.mktemp("dummy")
    cfg = json.loads((default_model_path / "config.json").read_text())
    cfg.update(num_hidden_layers=2, eos_token_id=[7, 9])
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_dummy_weights_run_token_ids_without_a_tokenizer(dummy_folder: Path) -> None:
    engine = Engine(dummy_folder, load_format="dummy", kv_cache_tokens=512)
    out = engine.generate(
        [[5, 6, 7, 8], list(range(100, 140))], SamplingParams(max_tokens=4, ignore_eos=True)
    )
    assert all(r.ok and len(r.token_ids) == 4 and r.text == "" for r in out)
    eos = out[0].token_ids[1]
    stopped = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, stop_token_ids=[eos]))[0]
    cut = out[0].token_ids.index(eos) + 1
    assert stopped.finish_reason == "stop" and stopped.token_ids == out[0].token_ids[:cut]
    with pytest.raises(ValueError, match=r"^model: .* has no tokenizer.json; text prompts"):
        engine.generate("Hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match=r"^model: .* has no tokenizer.json"):
        engine.classify([[5, 6]], ["yes", "no"])
    with pytest.raises(ValueError, match=r"^params: stop strings need"):
        engine.generate([[5, 6]], SamplingParams(max_tokens=2, stop=["x"]))


def test_dummy_weights_take_eos_ids_from_the_config(dummy_folder: Path) -> None:
    engine = Engine(dummy_folder, load_format="dummy", kv_cache_tokens=512)
    assert engine.eos_token_ids == frozenset({7, 9})


def test_safetensors_need_a_tokenizer(dummy_folder: Path) -> None:
    with pytest.raises(ModelError, match="safetensors"):
        Engine(dummy_folder)


def test_the_engine_takes_the_plans_block_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The native engine's KV blocks are the plan's: set by block_size, refused where they differ."""
    from batchllm import job
    from batchllm.spec import SpecError, parse_spec
    from tests.product_fixtures import spec_dict

    seen: dict = {}
    monkeypatch.setattr(job, "create_backend", lambda name, model, device, **options: seen.update(options))
    job.load_backend(parse_spec(spec_dict(tmp_path / "w.duckdb", block_size=32)))
    assert seen["block_size"] == 32
    spec = parse_spec(spec_dict(tmp_path / "w.duckdb", block_size=32, engine_options={"block_size": 16}))
    with pytest.raises(SpecError, match=r"^engine_options.block_size: 16 differs from block_size 32"):
        job.check(spec)
    with pytest.raises(SpecError, match=r"^block_size: must be a power of two .* got 24"):
        job.check(parse_spec(spec_dict(tmp_path / "w.duckdb", block_size=24)))
