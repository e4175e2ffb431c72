"""The score and classify tasks as jobs: spec checks before any model loads, a SQL join of queries and
candidates scored into a results table that keeps both keys, bad rows as per-row errors, packing on/off.

The job's steps run directly (extract -> prepare -> plan -> infer -> stage -> load), as the flow calls them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from batchllm import job, report, results, warehouse
from batchllm.spec import SpecError, parse_spec
from tests.product_fixtures import query

QUERIES = [
    (1, "I love space travel, robots and films about astronauts."),
    (2, "I only watch cooking shows and romantic comedies."),
    (3, "Horror fan: haunted houses, ghosts and slashers."),
    (4, "A user whose candidates were all filtered out."),
]
DOCS = [
    ("a", "A crew of astronauts finds that their ship's computer has been lying to them."),
    ("b", "Two rival chefs open restaurants on the same street and fall in love."),
    ("c", "A family moves into an old house where something lives in the walls."),
    ("d", "A documentary about the history of the shipping container."),
    ("long", "Once upon a time there was a very long candidate. " * 40),
]
JOIN = """
SELECT q.qid || '/' || coalesce(d.doc_id, '-') AS id, q.qid, q.profile, d.doc_id, d.text
FROM queries AS q LEFT JOIN docs AS d ON q.qid <> 4
ORDER BY q.qid, d.doc_id
"""


def make_db(path: Path) -> Path:
    con = duckdb.connect(str(path))
    try:
        con.execute("CREATE TABLE queries (qid INTEGER, profile VARCHAR)")
        con.execute("CREATE TABLE docs (doc_id VARCHAR, text VARCHAR)")
        con.executemany("INSERT INTO queries VALUES (?, ?)", QUERIES)
        con.executemany("INSERT INTO docs VALUES (?, ?)", DOCS)
    finally:
        con.close()
    return path


def score_spec(db: Path, **task: Any) -> dict[str, Any]:
    return {
        "name": "test-rank",
        "source": {"database": str(db), "query": JOIN},
        "prompt": {
            "system": "You recommend films. The user says: {{ profile }}",
            "user": "Film: {{ text }}\nWould this user enjoy the film? Answer Yes or No.",
        },
        "task": {"kind": "score", "query_key": "qid", "candidate_key": "doc_id", **task},
        "model": "default",
        "device": "cpu",
        "output": {"table": "ranked", "mode": "replace"},
        "limits": {"max_prompt_tokens": 160},  # the long candidate does not fit
    }


def run_job(spec_data: dict[str, Any]) -> dict[str, Any]:
    """The flow's steps without Prefect; returns the run record."""
    spec = parse_spec(spec_data)
    job.validate(spec)
    prepared = job.prepare(spec, warehouse.extract(spec))
    info = job.plan(spec, prepared)
    warehouse.stage(spec, results.error_rows(spec, prepared))
    stats = []
    for k, indices in enumerate(info.shards):
        token_ids = [prepared.prompts.token_ids[i] for i in indices]
        outcomes, st = job.infer_shard(spec, token_ids, groups=info.groups(k))
        warehouse.stage(spec, results.result_rows(spec, prepared, indices, outcomes))
        stats.append(st)
    run = report.run_record(spec, prepared, info, stats, {}, {"infer_s": 1.0}, "cpu")
    warehouse.load(spec, run)
    return run


@pytest.mark.parametrize(
    ("task", "message"),
    [
        ({"query_key": None}, "task.query_key: 'score' needs the column"),
        ({"candidate_key": "qid"}, "task.candidate_key: must differ"),
        ({"yes": "Yes", "no": "Yes"}, "task.no: must differ from task.yes"),
        ({"yes": ""}, "task.yes: must be a non-empty answer"),
        ({"labels": ["Yes", "No"], "yes": "Sure"}, "task.labels: give either labels or yes/no"),
        ({"labels": ["Yes", "Yes"]}, "task.labels: labels must be distinct"),
        ({"labels": ["Yes", ""]}, "task.labels: every label must be a non-empty string"),
        ({"pack_tokens": 0}, "task.pack_tokens"),
    ],
)
def test_score_spec_errors_name_the_field(tmp_path: Path, task: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message.replace(".", r"\.")):
        parse_spec(score_spec(tmp_path / "w.duckdb", **task))


def test_classify_spec_errors(tmp_path: Path) -> None:
    spec = score_spec(tmp_path / "w.duckdb")
    for task, message in [
        ({"kind": "classify", "labels": ["a"]}, "task.labels: 'classify' needs at least two labels"),
        ({"kind": "classify", "labels": ["a", "b", "a"]}, "'a' given twice"),
        ({"kind": "classify", "labels": ["a", "b"], "yes": "a"}, "task.yes: only used with kind 'score'"),
        ({"kind": "generate", "pack": True}, "task.pack: only used with kinds"),
        ({"kind": "generate", "pack_tokens": 512}, "task.pack_tokens: only used with kinds"),
    ]:
        with pytest.raises(SpecError, match=message):
            parse_spec({**spec, "task": task})


def test_generate_specs_keep_the_default_pack_tokens_through_updated(tmp_path: Path) -> None:
    from batchllm.engine.prefill import PACK_TOKENS as ENGINE_PACK_TOKENS
    from batchllm.spec import PACK_TOKENS

    spec = parse_spec({**score_spec(tmp_path / "w.duckdb"), "task": {"kind": "generate"}})
    assert spec.updated(limits={"max_rows": 5}).task.pack_tokens == PACK_TOKENS == ENGINE_PACK_TOKENS


def test_checks_that_need_the_data_or_the_tokenizer_fail_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = make_db(tmp_path / "w.duckdb")
    monkeypatch.setattr(job, "create_backend", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SpecError, match=r"task\.candidate_key: column 'doc' is not in the query result"):
        job.validate(parse_spec(score_spec(db, candidate_key="doc")))

    class NoTokens:
        def encode(self, text: str) -> list[int]:
            return [] if text == "Nope" else [1, 2]  # every other label: the same tokens

    spec = parse_spec(score_spec(db, yes="Yup", no="Nope"))
    with pytest.raises(SpecError, match=r"task\.no: 'Nope' encodes to no token"):
        job.check_labels(spec, NoTokens())
    spec = parse_spec({**score_spec(db), "task": {"kind": "classify", "labels": ["A", "B"]}})
    with pytest.raises(SpecError, match=r"task\.labels: 'A' and 'B' encode to the same tokens"):
        job.check_labels(spec, NoTokens())


def test_score_job_ranks_candidates_per_query_and_keeps_both_keys(tmp_path: Path) -> None:
    db = make_db(tmp_path / "w.duckdb")
    run = run_job(score_spec(db))
    engine = run["engine"][0]
    assert engine["packs"] >= 3 and engine["packed_items"] == 12  # 3 queries x 4 candidates that fit
    assert engine["decode_steps"] == 0 and engine["output_tokens"] == 0
    rows = query(
        db, "SELECT id, query_key, candidate_key, status, error, score, label, label_probs FROM ranked"
    )
    by_id = {r[0]: r for r in rows}
    assert len(rows) == 16  # 3 queries x 5 candidates + the query without any
    no_candidates = by_id["4/-"]
    assert no_candidates[1:4] == (4, None, "error") and "query 4 has no candidates" in no_candidates[4]
    for qid in (1, 2, 3):
        too_long = by_id[f"{qid}/long"]
        assert too_long[3] == "error" and "over the limit of 160" in too_long[4]
    ok = [r for r in rows if r[3] == "ok"]
    assert len(ok) == 12
    for r in ok:
        probs = dict(r[7])
        assert 0.0 < r[5] < 1.0 and r[5] == pytest.approx(probs["Yes"])
        assert probs["Yes"] + probs["No"] == pytest.approx(1.0) and r[6] in ("Yes", "No")
    ranked = query(
        db,
        "SELECT query_key, candidate_key FROM ranked WHERE status = 'ok' "
        "QUALIFY row_number() OVER (PARTITION BY query_key ORDER BY score DESC) = 1 ORDER BY query_key",
    )
    assert [q for q, _ in ranked] == [1, 2, 3]

    # the same job unpacked (one sequence per candidate) gives the same scores
    packed = {r[0]: r[5] for r in ok}
    run_job(score_spec(db, pack=False))
    unpacked = dict(query(db, "SELECT id, score FROM ranked WHERE status = 'ok'"))
    assert unpacked.keys() == packed.keys()
    for key, value in packed.items():
        assert unpacked[key] == pytest.approx(value, abs=1e-4)


def test_yaml_yes_and_no_are_strings(tmp_path: Path) -> None:
    """YAML 1.1 reads yes/no as booleans; job specs use YAML 1.2 booleans, so `yes: Yes` means what it says."""
    from batchllm.spec_yaml import load_spec

    path = tmp_path / "job.yaml"
    data = score_spec(tmp_path / "w.duckdb")
    text = yaml_dump(data).replace("kind: score", "kind: score\n  yes: Yes\n  no: No")
    path.write_text(text + "incremental: no\n")
    spec = load_spec(path)
    assert spec.task.answer_labels() == ["Yes", "No"] and spec.incremental is False
    path.write_text(text.replace("  yes: Yes\n  no: No", "  labels: [Yes, No, Maybe]"))
    assert load_spec(path).task.answer_labels() == ["Yes", "No", "Maybe"]


def yaml_dump(data: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def test_ranking_example_is_a_valid_score_job() -> None:
    from batchllm.spec_yaml import load_spec

    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "ranking.yaml")
    assert spec.task.kind == "score" and spec.task.answer_labels() == ["Yes", "No"]
    assert (spec.task.query_key, spec.task.candidate_key) == ("movie", "review_id")
