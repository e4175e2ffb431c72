"""Rendering: chat templating, prompt hashes, dedup, per-row errors (null, undecodable, too long)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm import render
from batchllm.engine.tokenizer import Tokenizer
from batchllm.spec import parse_spec
from tests.product_fixtures import spec_dict


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    from batchllm.models import resolve_model

    return Tokenizer(resolve_model("default"))


def _spec(tmp_path: Path, **over):
    return parse_spec(spec_dict(tmp_path / "w.duckdb", **over))


def _table(plots, reviews, ids=None) -> pa.Table:
    ids = list(range(len(plots))) if ids is None else ids
    return pa.table({"id": pa.array(ids, pa.int32()), "plot": plots, "review": reviews})


def test_chat_rendering_and_hash(tmp_path: Path, tokenizer: Tokenizer) -> None:
    spec = _spec(tmp_path)
    rows = render.render_rows(spec, _table(["P1"], ["great"]), tokenizer)
    text = rows.column("prompt")[0].as_py()
    assert text.startswith("<|im_start|>system\nYou label movie reviews")
    assert "Plot of the movie: P1" in text
    assert "Review: great\nIs this review positive or negative?" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert rows.column("prompt_hash")[0].as_py() == hashlib.sha256(text.encode()).hexdigest()[:32]
    assert rows.column("error")[0].as_py() is None


def test_raw_template_skips_chat_template(tmp_path: Path) -> None:
    spec = _spec(tmp_path, prompt={"template": "Plot: {{ plot }} | {{ review }} ->"})
    rows = render.render_rows(spec, _table(["P"], ["R"]), None)
    assert rows.column("prompt").to_pylist() == ["Plot: P | R ->"]


def test_bad_rows_become_errors_and_others_render(tmp_path: Path, tokenizer: Tokenizer) -> None:
    spec = _spec(tmp_path, prompt={"template": "{{ plot }} {{ review }} {{ 10 // n }}"})
    table = pa.table(
        {
            "id": pa.array([1, 2, 3, 4], pa.int64()),
            "plot": pa.array([b"ok", b"\xff\xfe broken", None, b"fine"], pa.binary()),
            "review": ["a", "b", "c", "d"],
            "n": [1, 1, 1, 0],
        }
    )
    rows = render.render_rows(spec, table, tokenizer)
    errors = rows.column("error").to_pylist()
    assert errors[0] is None
    assert "field 'plot' is not valid UTF-8" in errors[1]
    assert errors[2] == "field 'plot' is null"
    assert "template error: ZeroDivisionError" in errors[3]
    assert rows.column("prompt_hash").to_pylist()[1:] == [None, None, None]
    prompts = render.tokenize(rows, tokenizer, None)
    assert prompts.num_prompts == 1
    assert prompts.row_prompt.tolist() == [0, -1, -1, -1]


def test_control_tokens_inside_lists_and_structs_are_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """A chat-structure token inside a LIST or STRUCT field is refused as it is in a plain string."""
    spec = _spec(tmp_path, prompt={"template": "{{ plot }} {{ review }}"})
    table = pa.table(
        {
            "id": pa.array([0, 1, 2, 3], pa.int32()),
            "plot": [["a", "b <|im_end|>"], ["fine"], ["ok"], ["ok"]],
            "review": [{"k": "x"}, {"k": "x"}, {"k": "<|im_start|>user"}, {"k": "x"}],
        }
    )
    errors = render.render_rows(spec, table, tokenizer).column("error").to_pylist()
    assert "field 'plot' contains the model's control token '<|im_end|>'" in errors[0]
    assert errors[1] is None and errors[3] is None
    assert "field 'review' contains the model's control token '<|im_start|>'" in errors[2]


def test_identical_prompts_are_computed_once(tmp_path: Path, tokenizer: Tokenizer) -> None:
    spec = _spec(tmp_path)
    table = _table(["A", "B", "A", "A"], ["x", "y", "x", "z"])
    prompts = render.tokenize(render.render_rows(spec, table, tokenizer), tokenizer, None)
    assert prompts.num_prompts == 3
    assert prompts.row_prompt.tolist() == [0, 1, 0, 2]
    lens = prompts.lengths
    assert prompts.prompt_tokens_logical == int(lens[[0, 1, 0, 2]].sum())
    assert all(t.dtype == np.int32 for t in prompts.token_ids)


def test_too_long_prompts_become_errors(tmp_path: Path, tokenizer: Tokenizer) -> None:
    spec = _spec(tmp_path)
    table = _table(["short", "x " * 3000, "short"], ["a", "b", "c"])
    rows = render.render_rows(spec, table, tokenizer)
    limit = render.prompt_limit(spec, 2048)
    assert limit == 2047
    prompts = render.tokenize(rows, tokenizer, limit)
    errors = prompts.rows.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None
    assert "over the limit of 2047" in errors[1]
    assert prompts.row_prompt.tolist() == [0, -1, 1]
    assert prompts.num_prompts == 2


def test_a_row_rendering_to_no_tokens_is_an_error_row(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """A raw template over an empty field renders nothing: that row fails, the others run."""
    spec = _spec(tmp_path, prompt={"template": "{{ review }}"})
    rows = render.render_rows(spec, _table(["p", "p", "p"], ["good", "", "also good"]), tokenizer)
    prompts = render.tokenize(rows, tokenizer, None)
    errors = prompts.rows.column("error").to_pylist()
    assert errors[0] is None and errors[2] is None and "prompt is empty" in errors[1]
    assert prompts.row_prompt.tolist() == [0, -1, 1] and all(len(t) for t in prompts.token_ids)


def test_drop_done(tmp_path: Path, tokenizer: Tokenizer) -> None:
    spec = _spec(tmp_path)
    rows = render.render_rows(spec, _table(["A", "B", "C"], ["x", "y", "z"]), tokenizer)
    hashes = rows.column("prompt_hash").to_pylist()
    # id 0 done with the same prompt; id 1 done with another prompt (must rerun); both listed twice.
    done = pa.table(
        {"id": pa.array([0, 1, 0, 1], pa.int64()), "prompt_hash": [hashes[0], "other", hashes[0], "other"]}
    )
    kept, skipped = render.drop_done(rows, done)
    assert skipped == 1
    assert kept.column("id").to_pylist() == [1, 2]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "c", None]), min_size=1, max_size=12))
def test_row_prompt_mapping_is_consistent(values: list[str | None]) -> None:
    from batchllm.models import resolve_model

    tok = _tok_cache.setdefault("t", Tokenizer(resolve_model("default")))
    spec = parse_spec(spec_dict("/tmp/w.duckdb", prompt={"template": "v={{ plot }}"}))
    table = pa.table({"id": list(range(len(values))), "plot": values, "review": ["r"] * len(values)})
    prompts = render.tokenize(render.render_rows(spec, table, None), tok, None)
    texts = prompts.rows.column("prompt").to_pylist()
    for i, j in enumerate(prompts.row_prompt):
        if values[i] is None:
            assert j == -1
        else:
            assert tok.decode(prompts.token_ids[j].tolist(), skip_special_tokens=False) == texts[i]
    assert prompts.num_prompts == len({v for v in values if v is not None})


_tok_cache: dict[str, Tokenizer] = {}


def test_reorderable_fields_are_exposed_as_pairs(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        prompt={
            "template": "{% for name, value in fields %}{{ name }}={{ value }};{% endfor %} {{ review }}",
            "reorderable": ["plot", "id"],
        },
    )
    rows = render.render_rows(spec, _table(["P", "Q"], ["r1", "r2"]), None)
    assert rows.column("prompt").to_pylist() == ["plot=P;id=0; r1", "plot=Q;id=1; r2"]


def test_chat_templates_compile_as_hugging_face_does(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """Loop controls and HF's tojson (text as is), rendered as transformers renders them; a template
    that does not compile is named as the model's, not left to fail every row alike."""
    import shutil

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer.folder / name).is_file():
            shutil.copy(tokenizer.folder / name, tmp_path / name)
    source = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m | tojson }}\n{% endfor %}"
    )
    (tmp_path / "chat_template.jinja").write_text(source)
    messages = [
        {"role": "system", "content": "skip"},
        {"role": "user", "content": '<é> & "q"'},
        {"role": "user", "content": "after the break"},
    ]
    ours = Tokenizer(tmp_path).apply_chat_template(messages)
    hf = AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours == hf and '"<é> & \\"q\\""' in ours and "after" not in ours
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"chat template of .* does not compile: TemplateSyntaxError"):
        Tokenizer(tmp_path).apply_chat_template(messages)
