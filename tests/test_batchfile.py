"""OpenAI-style batch files: bad lines, a round trip on the default model, idempotent reruns, the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from batchllm.backends.base import create_backend
from batchllm.batchfile import parse_requests, read_answered, run_batch
from batchllm.cli import app
from batchllm.engine.tokenizer import Tokenizer

SYSTEM = "You answer in one short sentence."
ENGINE = {"kv_cache_gb": 0.25, "max_num_batched_tokens": 512}


def request(cid: str, user: str, **body: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    return {
        "custom_id": cid,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "default", "messages": messages, "max_tokens": 6, "temperature": 0, **body},
    }


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_model(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the model was loaded although every request was answered")


def test_bad_lines_get_error_lines_and_the_rest_parse(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "in.jsonl",
        [
            request("a", "hi"),
            "{not json",
            {"body": {"messages": [{"role": "user", "content": "x"}]}},
            request("a", "again"),
            {"custom_id": "b", "body": {"max_tokens": 3}},
            request("c", "x", max_tokens=0),
            {"custom_id": "d", "body": {"messages": [{"role": "tool", "content": "x"}]}},
            request("e", "x", stop="\n", seed=3, temperature=0.5),
        ],
    )
    parsed = parse_requests(path, default_max_tokens=9)
    assert [r.custom_id for r in parsed.requests] == ["a", "e"]
    assert parsed.requests[1].params == (6, 0.5, 1.0, 3, ("\n",))
    codes = [(e["custom_id"], e["error"]["code"]) for e in parsed.errors]
    assert codes == [
        (None, "invalid_json"),
        (None, "missing_custom_id"),
        (None, "duplicate_custom_id"),
        ("b", "invalid_request"),
        ("c", "invalid_request"),
        ("d", "invalid_request"),
    ]
    messages = [e["error"]["message"] for e in parsed.errors]
    assert messages[0].startswith("line 2: not JSON")
    assert "duplicate custom_id 'a' (first on line 1)" in messages[2]
    assert "messages is missing" in messages[3]
    assert messages[4].startswith("line 6: body.max_tokens")
    assert all(e["response"] is None for e in parsed.errors)


def test_round_trip_then_reruns_only_what_is_missing(tmp_path: Path, default_model_path: Path) -> None:
    rows = [
        request("r1", "Say hello."),
        request("r2", "Name a color."),
        request("r3", "Say hello.", max_tokens=3),
    ]
    src = write_jsonl(tmp_path / "in.jsonl", [*rows, "oops"])
    out = tmp_path / "out.jsonl"
    loads: list[str] = []

    def backend(*args: Any, **kwargs: Any) -> Any:
        loads.append(args[1])
        return create_backend(*args, **kwargs)

    kw = {"model": str(default_model_path), "device": "cpu", "engine_options": ENGINE}
    counts = run_batch(src, out, backend=backend, **kw)
    assert counts == {"requests": 3, "skipped": 0, "ran": 3, "ok": 3, "errors": 1}
    lines = read_lines(out)
    assert sorted(str(x["custom_id"]) for x in lines) == ["None", "r1", "r2", "r3"]
    by_id = {x["custom_id"]: x for x in lines}
    tok = Tokenizer(default_model_path)
    for row in rows:
        line = by_id[row["custom_id"]]
        assert line["error"] is None and line["response"]["status_code"] == 200
        body = line["response"]["body"]
        choice = body["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
        assert choice["finish_reason"] in ("stop", "length")
        usage = body["usage"]
        prompt = tok.apply_chat_template(row["body"]["messages"])  # the chat template, as rows get it
        assert usage["prompt_tokens"] == len(tok.encode(prompt))
        assert 1 <= usage["completion_tokens"] <= row["body"]["max_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert by_id["r3"]["response"]["body"]["usage"]["completion_tokens"] <= 3

    # everything answered: no model work, ok lines kept as they were, the bad line reported once
    before = {k: json.dumps(v) for k, v in by_id.items() if k}
    counts = run_batch(src, out, backend=no_model, **kw)
    assert counts == {"requests": 3, "skipped": 3, "ran": 0, "ok": 0, "errors": 1}
    again = read_lines(out)
    assert (
        len(again) == 4 and {k: json.dumps(v) for k, v in ((x["custom_id"], x) for x in again) if k} == before
    )

    # r2's answer lost and a torn line left by a crash: only r2 runs, greedy gives the same text
    kept = [line for line in out.read_text().splitlines() if '"r2"' not in line]
    out.write_text("\n".join(kept) + '\n{"id": "batch_req_x", "custom_id": "r2", "respo')
    counts = run_batch(src, out, backend=backend, **kw)
    assert counts["ran"] == 1 and counts["skipped"] == 2 and len(loads) == 2
    final = read_lines(out)
    ids = [x["custom_id"] for x in final if x["custom_id"]]
    assert sorted(ids) == ["r1", "r2", "r3"]
    content = {
        x["custom_id"]: x["response"]["body"]["choices"][0]["message"]["content"]
        for x in final
        if x["custom_id"]
    }
    assert content["r2"] == by_id["r2"]["response"]["body"]["choices"][0]["message"]["content"]
    assert set(read_answered(out)) == {"r1", "r2", "r3"}


def test_cli_batch_keeps_answered_lines(tmp_path: Path) -> None:
    answered = {
        "id": "batch_req_1",
        "custom_id": "r1",
        "response": {"status_code": 200, "body": {"choices": []}},
        "error": None,
    }
    src = write_jsonl(tmp_path / "in.jsonl", [request("r1", "hi"), "[1, 2"])
    out = write_jsonl(
        tmp_path / "out.jsonl", [answered, {**answered, "custom_id": "old", "error": {"code": "x"}}]
    )
    result = CliRunner().invoke(app, ["batch", str(src), "-o", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "skipped 1, ran 0" in result.output
    lines = read_lines(out)
    assert [x["custom_id"] for x in lines] == ["r1", None]  # the old error line is dropped, not duplicated
    assert lines[1]["error"]["code"] == "invalid_json"
    missing = CliRunner().invoke(app, ["batch", str(tmp_path / "nope.jsonl"), "-o", str(out)])
    assert missing.exit_code == 2 and "no such file" in missing.output


@pytest.mark.parametrize("body", [{"n": 2}, {"temperature": "hot"}])
def test_unsupported_bodies_are_bad_lines(tmp_path: Path, body: dict[str, Any]) -> None:
    parsed = parse_requests(write_jsonl(tmp_path / "in.jsonl", [request("x", "hi", **body)]), 8)
    assert not parsed.requests and parsed.errors[0]["custom_id"] == "x"


class TokenCountBackend:
    """Answers from prompt lengths (no weights) and fails on its ``crash_at``-th run: a crash mid-file."""

    def __init__(self, crash_at: int = 0) -> None:
        self.crash_at = crash_at
        self.runs: list[int] = []

    def __call__(self, *args: Any, **kwargs: Any) -> TokenCountBackend:
        return self

    def run(
        self, prompts: list[Any], task: Any, sampling: Any, progress: Any = None, groups: Any = None
    ) -> list[Any]:
        from batchllm.backends.base import Outcome

        assert groups is not None and sampling.max_tokens == 6
        self.runs.append(len(prompts))
        if len(self.runs) == self.crash_at:
            raise RuntimeError("device lost")
        return [
            Outcome(prompt_tokens=len(p), output=f"n={len(p)}", output_tokens=1, finish_reason="stop")
            for p in prompts
        ]

    def close(self) -> None:
        pass


def test_a_crash_keeps_finished_shards_and_the_rerun_does_the_rest(
    tmp_path: Path, default_model_path: Path
) -> None:
    users = ["a", "a b", "a b c", "a b c d", "a b c d e", "a b c d e f"]
    src = write_jsonl(tmp_path / "in.jsonl", [request(f"q{i}", u) for i, u in enumerate(users)])
    out = tmp_path / "out.jsonl"
    kw = {"model": str(default_model_path), "device": "cpu", "shard_size": 2}
    crashing = TokenCountBackend(crash_at=2)
    with pytest.raises(RuntimeError, match="device lost"):
        run_batch(src, out, backend=crashing, **kw)
    assert crashing.runs == [2, 2]  # three shards of two prompts; the second one failed
    first = read_lines(out)
    assert len(first) == 2 and all(x["error"] is None for x in first)
    counts = run_batch(src, out, backend=TokenCountBackend(), **kw)
    assert counts == {"requests": 6, "skipped": 2, "ran": 4, "ok": 4, "errors": 0}
    final = read_lines(out)
    assert final[:2] == first and sorted(x["custom_id"] for x in final) == [f"q{i}" for i in range(6)]
    lengths = [
        x["response"]["body"]["usage"]["prompt_tokens"] for x in sorted(final, key=lambda x: x["custom_id"])
    ]
    assert lengths == sorted(lengths) and len(set(lengths)) == 6  # each answer belongs to its own prompt


def test_chunks_keep_plan_order_and_split_only_large_groups() -> None:
    from batchllm.batchfile import _chunks

    groups = [(32, [0, 1, 2]), (0, [3]), (16, [4, 5])]
    assert _chunks(groups, 2) == [[(32, [0, 1])], [(32, [2]), (0, [3])], [(16, [4, 5])]]
    assert _chunks(groups, 10) == [groups]


def test_repeated_sampled_requests_are_each_answered(tmp_path: Path, default_model_path: Path) -> None:
    """Identical requests share one computation where the answer is deterministic (greedy, or seeded);
    repeated to draw several samples (temperature > 0, no seed), each is its own prompt."""
    from batchllm import render
    from batchllm.batchfile import _rows

    sampled = [request(f"s{i}", "Say hello.", temperature=1.0) for i in range(3)]
    greedy = [request(f"g{i}", "Say hello.") for i in range(2)]
    seeded = [request(f"k{i}", "Say hello.", temperature=1.0, seed=7) for i in range(2)]
    tok = Tokenizer(default_model_path)
    for rows, distinct in ((sampled, 3), (greedy, 1), (seeded, 1)):
        parsed = parse_requests(write_jsonl(tmp_path / "in.jsonl", rows), 6)
        assert render.tokenize(_rows(parsed.requests, tok), tok, None).num_prompts == distinct


def test_null_fields_take_the_defaults(tmp_path: Path) -> None:
    """OpenAI's API reads a null max_tokens, temperature or top_p as "not given"."""
    row = request("n", "hi", max_tokens=None, temperature=None, top_p=None, stop=None, seed=None)
    parsed = parse_requests(write_jsonl(tmp_path / "in.jsonl", [row]), default_max_tokens=9)
    assert not parsed.errors and parsed.requests[0].params[:3] == (9, 1.0, 1.0)


def test_a_rerun_keeps_one_line_per_custom_id(tmp_path: Path) -> None:
    """A request answered ok before and now invalid keeps its answer; no error line joins it."""
    answered = {"id": "batch_req_1", "custom_id": "a", "response": {"status_code": 200}, "error": None}
    src = write_jsonl(tmp_path / "in.jsonl", [request("a", "hi", max_tokens=0)])
    out = write_jsonl(tmp_path / "out.jsonl", [answered])
    counts = run_batch(src, out, backend=no_model)
    assert [x["custom_id"] for x in read_lines(out)] == ["a"] and counts["errors"] == 0


def test_output_file_mode_and_bad_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import stat

    from batchllm.batchfile import BatchFileError

    src = write_jsonl(tmp_path / "in.jsonl", ["[1, 2"])
    out = tmp_path / "out.jsonl"
    old = os.umask(0o022)
    try:
        run_batch(src, out, backend=no_model)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # as any file the user creates, not mkstemp's 0600
    (tmp_path / "folder").mkdir()
    with pytest.raises(BatchFileError, match="is a folder"):
        run_batch(src, tmp_path / "folder", backend=no_model)
    with pytest.raises(BatchFileError, match="must not be the input"):
        run_batch(src, src, backend=no_model)
    assert src.read_text() == "[1, 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "in.jsonl", "out.jsonl"]  # no temp left


def test_cli_batch_checks_max_tokens(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [request("a", "hi")])
    result = CliRunner().invoke(
        app, ["batch", str(src), "-o", str(tmp_path / "o.jsonl"), "--max-tokens", "0"]
    )
    assert result.exit_code == 2 and "--max-tokens must be between 1 and 32768" in result.output
    assert not (tmp_path / "o.jsonl").exists()
