"""Prompt files for `batchllm plan FILE`: JSONL/Parquet, token ids, text and chat messages."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchllm.planfile import PlanFileError, load_prompts, plan_file, plan_file_command


def _has_default_tokenizer() -> bool:
    try:
        from batchllm.models import resolve_model

        return (resolve_model("default") / "tokenizer.json").is_file()
    except Exception:
        return False


needs_tokenizer = pytest.mark.skipif(not _has_default_tokenizer(), reason="default model not provisioned")

STEM = list(range(100, 164))  # 64 shared tokens


def _id_rows() -> list[list[int]]:
    return [[*STEM, 1000 + i, 7] for i in range(10)] + [[5, 6, 7]]


def test_jsonl_token_ids_and_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps({"token_ids": r, "max_tokens": 3}) for r in _id_rows()) + "\n")
    plan_file_command(path, None, 16, None, True)
    out = json.loads(capsys.readouterr().out)
    assert out["prompts"] == 11 and out["groups"] == 1 and out["plain"] == 1
    assert out["decode_tokens"] == 33  # per-row max_tokens column
    logical = 10 * 66 + 3
    assert out["logical_tokens"] == logical
    assert out["physical_tokens"] == logical - 9 * 64
    assert out["saving_ratio"] == pytest.approx(1 - out["physical_tokens"] / logical)


def test_bare_lists_and_parquet_agree(tmp_path: Path) -> None:
    rows = [*_id_rows(), _id_rows()[0]]
    jsonl = tmp_path / "bare.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"input_ids": pa.array(rows, type=pa.list_(pa.int32()))}), parquet)
    a, sa = plan_file(jsonl, block_size=16, max_tokens=4)
    b, sb = plan_file(parquet, block_size=16, max_tokens=4)
    assert sa["duplicates"] == sb["duplicates"] == 1
    assert np.array_equal(a.members, b.members) and np.array_equal(a.prefix_len, b.prefix_len)
    assert sb["column"] == "input_ids" and sa["column"] == "token_ids"


def test_table_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _id_rows()))
    plan_file_command(path, None, 16, 8, False)
    text = capsys.readouterr().out
    assert "saving_ratio" in text and "prefix plan" in text


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanFileError, match="no such file"):
        load_prompts(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"foo": 1}\n')
    with pytest.raises(PlanFileError, match="no prompt column"):
        load_prompts(bad)
    bad.write_text("{not json\n")
    with pytest.raises(PlanFileError, match="not JSON"):
        load_prompts(bad)
    with pytest.raises(SystemExit):
        plan_file_command(bad, None, 16, 8, True)
    csv = tmp_path / "p.csv"
    csv.write_text("a\n")
    with pytest.raises(PlanFileError, match=r"expected a \.jsonl or \.parquet"):
        load_prompts(csv)


@needs_tokenizer
def test_text_and_messages_use_the_tokenizer(tmp_path: Path) -> None:
    from batchllm.engine.tokenizer import Tokenizer
    from batchllm.models import resolve_model

    tok = Tokenizer(resolve_model("default"))
    system = "You are a careful assistant. " * 8
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(6)]
    texts = tmp_path / "t.jsonl"
    texts.write_text("\n".join(json.dumps({"prompt": system + q}) for q in questions))
    loaded = load_prompts(texts, "default")
    assert loaded.kind == "text"
    assert loaded.table.row(2).tolist() == tok.encode(system + questions[2])
    msgs = tmp_path / "m.parquet"
    rows = [[{"role": "system", "content": system}, {"role": "user", "content": q}] for q in questions]
    pq.write_table(pa.table({"messages": rows}), msgs)
    plan, summary = plan_file(msgs, "default", block_size=16, max_tokens=8)
    assert summary["input"] == "messages"
    expected = tok.encode(tok.apply_chat_template(rows[0]))
    assert plan.table.row(0).tolist() == expected
    assert summary["groups"] == 1 and summary["saving_ratio"] > 0.5
