"""The `batchllm` command line: plan (dry run, writes nothing), show, run through the real entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from batchllm.cli import app
from tests.product_fixtures import make_reviews_db, query, spec_dict

runner = CliRunner()
BIN = Path(sys.executable).parent / "batchllm"


def _job(tmp_path: Path, n: int = 12, **over) -> Path:
    db = make_reviews_db(tmp_path / "w.duckdb", n)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec_dict(db.name, **over)))  # relative to the YAML's folder
    return path


def _tables(db: Path) -> list[str]:
    return sorted(r[0] for r in query(db, "SELECT table_name FROM duckdb_tables()"))


def test_plan_is_a_dry_run(tmp_path: Path) -> None:
    job = _job(tmp_path, sampling={"max_tokens": 8})
    result = runner.invoke(app, ["plan", str(job), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_total"] == 12 and summary["rows_to_run"] == 12
    assert summary["distinct_prompts"] == 12
    assert summary["planned_prompt_tokens"] < summary["prompt_tokens"]
    assert 0.2 < summary["saving_ratio"] < 1.0
    assert summary["estimated_compute_tokens"] == summary["planned_prompt_tokens"]  # classify: no decode
    assert summary["estimated_tflop"] > 0
    assert _tables(tmp_path / "w.duckdb") == ["reviews"]  # nothing written
    table = runner.invoke(app, ["plan", str(job)])
    assert table.exit_code == 0 and "saving_ratio" in table.stdout
    # Results going to another database: the dry run does not create it.
    other = _job(tmp_path, output={"table": "labels", "database": "results.duckdb"})
    assert runner.invoke(app, ["plan", str(other), "--json"]).exit_code == 0
    assert not (tmp_path / "results.duckdb").exists()


def test_plan_generate_counts_decode(tmp_path: Path) -> None:
    job = _job(tmp_path, task={"kind": "generate"}, sampling={"max_tokens": 8})
    summary = json.loads(runner.invoke(app, ["plan", str(job), "--json", "--max-tokens", "10"]).stdout)
    assert summary["max_decode_tokens"] == 120
    assert summary["estimated_compute_tokens"] == summary["planned_prompt_tokens"] + 120
    # beyond the model's context (8192 tokens) the engine stops: so does the estimate
    summary = json.loads(runner.invoke(app, ["plan", str(job), "--json", "--max-tokens", "32768"]).stdout)
    assert summary["max_decode_tokens"] == 12 * 8192 - summary["prompt_tokens"]


def test_plan_keeps_the_specs_block_size(tmp_path: Path) -> None:
    """The spec's block_size plans (and names the staging a crashed run left); --block-size overrides it."""
    from batchllm import job as steps
    from batchllm.spec_yaml import load_spec

    path = _job(tmp_path, block_size=64)  # longer than the shared prefixes of these prompts: no saving
    summary = json.loads(runner.invoke(app, ["plan", str(path), "--json"]).stdout)
    assert summary == json.loads(json.dumps(steps.dry_run(load_spec(path))))
    assert summary["saving_ratio"] == 0.0
    override = json.loads(runner.invoke(app, ["plan", str(path), "--json", "--block-size", "16"]).stdout)
    assert override["saving_ratio"] > 0.2


def test_batch_bad_arguments_exit_2_without_a_traceback(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("{}\n")
    for args, message in (
        (
            ["--device", "bogus", "-o", str(tmp_path / "out.jsonl")],
            "--device must be auto, cpu, cuda or cuda:N",
        ),
        (["-o", str(tmp_path / "missing" / "out.jsonl")], "the output's folder"),
    ):
        result = runner.invoke(app, ["batch", str(src), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert "Traceback" not in result.output


def test_plan_prompt_file(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    shared = "You are a careful assistant. Answer in one word. " * 4
    path.write_text("".join(json.dumps({"prompt": shared + f"Question {i}?"}) + "\n" for i in range(20)))
    result = runner.invoke(app, ["plan", str(path), "--tokenizer", "default", "--max-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert "saving_ratio" in result.stdout


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"sampling": {"max_tokenz": 3}}, "sampling.max_tokenz: unknown field"),
        ({"output": {"table": "bad table"}}, "output.table"),
        ({"prompt": {"user": "{{ nosuchcolumn }}"}}, "prompt.user: uses 'nosuchcolumn'"),
        (
            {"task": {"kind": "classify", "labels": ["good", "bad", "good"]}},
            "task.labels: labels must be distinct ('good' given twice)",
        ),
        ({"model": "/nonexistent/model"}, "model: no such file or folder"),
    ],
)
def test_bad_spec_exits_2_naming_the_field(tmp_path: Path, over: dict, message: str) -> None:
    job = _job(tmp_path, n=3, **over)
    for command in ("plan", "run"):
        result = runner.invoke(app, [command, str(job)])
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())


def test_show_missing(tmp_path: Path) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    result = runner.invoke(app, ["show", "nope", "-d", str(db)])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["show", "reviews", "-d", str(db), "-n", "2"])
    assert result.exit_code == 0 and "plot" in result.stdout


@pytest.mark.slow
def test_run_and_show_through_the_entry_point(tmp_path: Path) -> None:
    job = _job(tmp_path, n=6, sampling={"max_tokens": 4})
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    proc = subprocess.run([str(BIN), "run", str(job)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rows_ok" in proc.stdout and "prompts" in proc.stderr  # stats table; progress bar
    assert query(tmp_path / "w.duckdb", "SELECT count(*) FROM labels WHERE status = 'ok'") == [(6,)]
    shown = subprocess.run([str(BIN), "show", str(job), "-n", "3"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0
    assert shown.stdout.count("│ ok ") == 3


def test_show_picks_typed_and_key_columns() -> None:
    import pyarrow as pa

    from batchllm.table_view import useful_columns

    rows = pa.table(
        {
            "id": [1, 2],
            "prompt_hash": ["a", "b"],
            "run_id": ["r", "r"],
            "status": ["ok", "ok"],
            "parsed": [{"sentiment": "positive"}, {"sentiment": "negative"}],
            "output": ['{"sentiment": "positive"}', '{"sentiment": "negative"}'],
            "error": pa.array([None, None], pa.string()),
            "sector": ["x", "y"],
            "created_at": ["t", "t"],
        }
    )
    assert useful_columns(rows) == ["id", "status", "output", "parsed", "sector"]


def test_flag_errors_exit_2_without_a_traceback(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": [1, 2, 3]}\n')
    result = runner.invoke(app, ["plan", str(prompts), "--block-size", "0"])
    assert result.exit_code == 2 and "block_size must be >= 1" in result.output  # not planned at 16
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    result = runner.invoke(app, ["show", "reviews", "-d", str(db), "-n", "-1"])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    for args, message in [
        (["--runs-table", "bad-name"], "not a safe SQL identifier"),
        (["--runs-table", "reviews"], "'reviews' is not a runs table"),
        (["-o", str(tmp_path / "nodir" / "r.html")], "in a folder that exists"),
        (["-o", str(tmp_path / "r.svg")], "--output must be an .html or .png file"),
    ]:
        result = runner.invoke(app, ["report", "abc", "-d", str(db), *args])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)


def test_attached_databases_are_relative_to_the_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from batchllm.spec_yaml import load_spec

    (tmp_path / "jobs").mkdir()
    make_reviews_db(tmp_path / "other.duckdb", 2)
    spec = spec_dict("../w.duckdb")
    spec["source"]["attach"] = [{"alias": "o", "path": "../other.duckdb"}, {"alias": "p", "path": "/abs.db"}]
    (tmp_path / "jobs" / "job.yaml").write_text(yaml.safe_dump(spec))
    for cwd in (tmp_path, tmp_path / "jobs"):
        monkeypatch.chdir(cwd)
        paths = [a.path for a in load_spec(tmp_path / "jobs" / "job.yaml").source.attach]
        assert paths == [str(tmp_path / "other.duckdb"), "/abs.db"]
