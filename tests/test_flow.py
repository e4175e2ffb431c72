"""End to end: the enrich flow on real DuckDB files with the real default model on CPU.

Runs against a temporary Prefect server (``prefect_test_harness``) and checks
the flow run and its artifacts through the Prefect client. Covers incremental
reruns, added rows, replace mode, bad rows, bad specs and a crash between
inference and load.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml

from batchllm import job, warehouse
from batchllm.spec import SpecError, parse_spec
from tests.product_fixtures import add_reviews, make_reviews_db, query, review_rows, spec_dict

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory: pytest.TempPathFactory):
    """A temporary Prefect server and database for this module; never the user's server."""
    saved = dict(os.environ)
    os.environ.pop("PREFECT_API_URL", None)
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        with get_client(sync_client=True) as client:  # the limit the CPU inference task holds a slot of
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name="cpu", limit=1))
        yield
    os.environ.clear()
    os.environ.update(saved)


def _run(spec: Any) -> tuple[dict[str, Any], Any]:
    """Run the flow; return (its result, the flow run id)."""
    from batchllm.flows.enrich import enrich

    state = enrich(spec, return_state=True)
    return state.result(), state.state_details.flow_run_id


def _snapshot(db: Path, table: str = "labels") -> list[tuple]:
    return query(db, f'SELECT * FROM "{table}" ORDER BY id')


def _staging_rows(db: Path) -> int:
    names = [
        r[0]
        for r in query(
            db, "SELECT table_name FROM duckdb_tables() WHERE table_name LIKE 'batchllm_staging_%'"
        )
    ]
    return sum(query(db, f'SELECT count(*) FROM "{n}"')[0][0] for n in names)


def test_lifecycle(tmp_path: Path, prefect_server: None, monkeypatch: pytest.MonkeyPatch) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 12)
    spec = parse_spec(spec_dict(db, incremental=True))

    # 1. First run: 12 ok rows, with the run's artifacts on the server.
    run, flow_run_id = _run(spec)
    assert run["rows_ok"] == 12 and run["rows_error"] == 0
    rows = query(
        db, "SELECT id, status, label, label_probs, prompt_tokens, model, params_hash FROM labels ORDER BY id"
    )
    assert [r[0] for r in rows] == list(range(12))
    assert all(r[1] == "ok" and r[2] in ("positive", "negative") for r in rows)
    assert all(abs(sum(r[3].values()) - 1.0) < 1e-3 and r[2] == max(r[3], key=r[3].get) for r in rows)
    assert all(r[4] > 20 and r[5] == "default" and r[6] == spec.params_hash for r in rows)
    assert run["planned_saving_ratio"] > 0.2  # the plot is a shared prefix
    _check_prefect_records(flow_run_id)
    first = _snapshot(db)

    # 2. Identical incremental rerun: no model work, results unchanged.
    loads: list[str] = []
    original = job.infer_shard

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append("infer")
        return original(*args, **kwargs)

    monkeypatch.setattr(job, "infer_shard", counting)
    run, noop_run_id = _run(spec)
    assert loads == []
    assert run["rows_skipped"] == 12 and run["rows_processed"] == 0 and run["engine"] == []
    assert _snapshot(db) == first
    assert _progress(noop_run_id) == 100.0  # a run with nothing to do has its progress artifact too

    # 3. Ten new rows: only those run.
    con = duckdb.connect(str(db))
    add_reviews(con, "reviews", review_rows(10, start=12))
    con.close()
    run, _ = _run(spec)
    assert loads == ["infer"]
    assert run["rows_skipped"] == 12 and run["rows_processed"] == 10 and run["rows_ok"] == 10
    after = _snapshot(db)
    assert len(after) == 22
    assert after[:12] == first  # old rows untouched (same run_id, created_at)
    assert len({r[-2] for r in after[12:]}) == 1 and after[12][-2] != first[0][-2]

    # 4. A crash between inference and load leaves the results table unchanged ...
    con = duckdb.connect(str(db))
    add_reviews(con, "reviews", review_rows(4, start=22))
    con.close()

    def crash(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("injected crash before the merge")

    monkeypatch.setattr(warehouse, "load", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        _run(spec)
    monkeypatch.undo()
    monkeypatch.setattr(job, "infer_shard", counting)
    assert _snapshot(db) == after
    assert _staging_rows(db) == 4  # the finished inference is kept
    assert loads == ["infer", "infer"]
    # ... and the rerun completes from staging: no model work, no duplicate ids.
    run, _ = _run(spec)
    assert loads == ["infer", "infer"]
    assert run["rows_recovered"] == 4 and run["rows_processed"] == 0 and run["rows_written"] == 4
    ids = [r[0] for r in query(db, "SELECT id FROM labels ORDER BY id")]
    assert ids == list(range(26))
    assert _staging_rows(db) == 0
    assert query(db, "SELECT count(*) FROM batchllm_runs")[0][0] == 4  # the crashed run left no record

    # 5. Replace mode rewrites the table with this run's rows only.
    replace = parse_spec(
        spec_dict(
            db,
            source={"database": str(db), "query": "SELECT id, plot, review FROM reviews WHERE id < 5"},
            output={"table": "labels", "mode": "replace"},
        )
    )
    run, _ = _run(replace)
    rows = query(db, "SELECT id, run_id, status FROM labels ORDER BY id")
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4]
    assert {r[1] for r in rows} == {run["run_id"]}
    # Same prompts, same model: the labels match the first run's.
    labels = [r[0] for r in query(db, "SELECT label FROM labels ORDER BY id")]
    assert labels == [r[6] for r in first[:5]]


def _progress(flow_run_id: Any) -> float | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return next((a.data for a in artifacts if a.type == "progress"), None)


def _check_prefect_records(flow_run_id: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        assert flow_run.state is not None and flow_run.state.is_completed()
        assert client.read_flow(flow_run.flow_id).name == "enrich"
        # The typed helpers send null for unset filters, as the UI does: the server must accept them.
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        by_type = {a.type: a for a in artifacts}
        assert {"markdown", "table", "progress"} <= set(by_type)
        assert by_type["progress"].data == 100.0
        assert "12 ok" in str(by_type["markdown"].data)
        assert "![metrics over time](data:image/png;base64," in str(by_type["markdown"].data)  # the chart
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_DESC,
            limit=50,
        )
        names = sorted({t.name.rsplit("-", 1)[0] for t in tasks})
        assert names == ["extract", "infer", "load", "plan", "prepare", "report", "stage"]
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200
        )
        messages = [entry.message for entry in logs]
        assert any("holding a slot of concurrency limit 'cpu'" in m for m in messages), messages
        assert any("12 rows read" in m for m in messages)
        assert client.read_global_concurrency_limit_by_name("cpu").active_slots == 0  # released


def test_bad_rows_get_error_status(tmp_path: Path, prefect_server: None) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 6)
    con = duckdb.connect(str(db))
    long_review = "This film goes on and on. " * 1600  # well over the model's 8192-token context
    con.execute(
        "INSERT INTO reviews VALUES (6, 'A plot.', ?, 'negative'), (7, 'A plot.', NULL, 'negative')",
        [long_review],
    )
    con.close()
    source = {
        "database": str(db),
        # Reviews arrive as bytes; id 2's are not UTF-8.
        "query": "SELECT id, plot, CASE WHEN id = 2 THEN '\\xFF\\xFE'::BLOB ELSE review::BLOB END AS review FROM reviews",
    }
    spec = parse_spec(spec_dict(db, source=source, sampling={"max_tokens": 4}))
    run, _ = _run(spec)
    rows = {r[0]: r[1:] for r in query(db, "SELECT id, status, error, label FROM labels")}
    assert sorted(rows) == list(range(8))
    assert "not valid UTF-8" in rows[2][1]
    assert "tokens, over the limit" in rows[6][1]
    assert rows[7][1] == "field 'review' is null"
    for i in (2, 6, 7):
        assert rows[i][0] == "error" and rows[i][2] is None
    for i in (0, 1, 3, 4, 5):
        assert rows[i][0] == "ok" and rows[i][1] is None and rows[i][2] in ("positive", "negative")
    assert run["rows_error"] == 3 and run["rows_ok"] == 5
    # Error rows are retried by an incremental run; ok rows are not.
    again = parse_spec(spec_dict(db, source=source, sampling={"max_tokens": 4}, incremental=True))
    run, _ = _run(again)
    assert run["rows_skipped"] == 5 and run["rows_error"] == 3 and run["engine"] == []


def test_a_report_that_cannot_be_published_does_not_fail_a_recorded_run(
    tmp_path: Path, prefect_server: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report artifacts come after the load's commit: their failure is a warning, not a failed run
    whose results are in fact written."""
    from batchllm.flows import enrich as flow_module

    def unavailable(**kwargs: Any) -> None:
        raise RuntimeError("the API is unavailable")

    monkeypatch.setattr(flow_module, "create_markdown_artifact", unavailable)
    db = make_reviews_db(tmp_path / "w.duckdb", 2)
    run, _ = _run(parse_spec(spec_dict(db, sampling={"max_tokens": 4})))
    assert run["rows_ok"] == 2 and len(_snapshot(db)) == 2
    assert query(db, "SELECT count(*) FROM batchllm_runs") == [(1,)]


def test_bad_spec_fails_before_the_model_loads(tmp_path: Path, prefect_server: None, monkeypatch) -> None:
    db = make_reviews_db(tmp_path / "w.duckdb", 3)
    loaded: list[str] = []
    monkeypatch.setattr(job, "create_backend", lambda *a, **k: loaded.append("model") or None)
    spec = parse_spec(
        spec_dict(db, source={"database": str(db), "query": "SELECT id, review FROM reviews"}),
    )
    with pytest.raises(SpecError, match=r"prompt\.system: uses 'plot', not in the query result"):
        _run(spec)
    path = tmp_path / "job.yaml"  # the flow also takes a path to a spec (as deployments pass it)
    path.write_text(yaml.safe_dump(spec_dict(db, output={"table": "labels", "mode": "sideways"})))
    with pytest.raises(SpecError, match=r"output\.mode: Input should be 'merge' or 'replace'"):
        _run(str(path))
    score = parse_spec(spec_dict(db, task={"kind": "score", "query_key": "plot", "candidate_key": "gold"}))
    with pytest.raises(SpecError, match=r"task\.candidate_key: column 'gold' is not in the query result"):
        _run(score)
    assert loaded == []
    assert not query(db, "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'labels'")[0][0]


def test_supports_says_exactly_what_run_accepts() -> None:
    """The pre-run check (``job.check``) and the loaded backend agree on every task kind: a kind
    that passes the check is run, a refused one is refused by ``run`` with the same reason."""
    import re
    import typing

    import numpy as np

    from batchllm.backends import create_backend, supports
    from batchllm.spec import SamplingSpec, TaskSpec

    shapes = {"classify": {"labels": ["yes", "no"]}, "score": {"query_key": "q", "candidate_key": "c"}}
    kinds = typing.get_args(TaskSpec.model_fields["kind"].annotation)
    backend = create_backend("native", "default", "cpu")
    try:
        for kind in kinds:
            task = TaskSpec(kind=kind, **shapes.get(kind, {}))
            reason = supports("native", kind)
            prompts = [np.arange(1, 9, dtype=np.int32)]
            if reason is None:
                outcomes = backend.run(prompts, task, SamplingSpec(max_tokens=1))
                assert len(outcomes) == 1 and outcomes[0].error is None, (kind, outcomes)
            else:
                with pytest.raises(ValueError, match=re.escape(reason)):
                    backend.run(prompts, task, SamplingSpec(max_tokens=1))
    finally:
        backend.close()


def test_generation_job_from_the_examples(tmp_path: Path, prefect_server: None) -> None:
    from batchllm import demo
    from batchllm.spec_yaml import load_spec

    db = tmp_path / "warehouse.duckdb"
    demo.build_warehouse(db)
    spec = load_spec(Path(__file__).resolve().parent.parent / "examples" / "summarizing.yaml")
    spec = spec.updated(
        source={"database": str(db)}, limits={"max_rows": 3}, sampling={"max_tokens": 8}, device="cpu"
    )
    run, _ = _run(spec)
    assert run["rows_ok"] == 3 and run["output_tokens"] > 0
    rows = query(
        db, "SELECT status, output, output_tokens, finish_reason, label FROM plot_summaries ORDER BY id"
    )
    assert len(rows) == 3
    for status, output, output_tokens, finish_reason, label in rows:
        assert status == "ok" and label is None
        assert output.strip() and 1 <= output_tokens <= 8
        assert finish_reason in ("stop", "length")


def test_deployment_file_points_at_real_flows_and_specs() -> None:
    from prefect.flows import load_flow_from_entrypoint

    from batchllm.spec_yaml import load_spec

    root = Path(__file__).resolve().parent.parent
    config = yaml.safe_load((root / "deploy" / "prefect.yaml").read_text())
    assert config["deployments"]
    for deployment in config["deployments"]:
        entrypoint = deployment["entrypoint"]
        flow = load_flow_from_entrypoint(str(root / entrypoint))
        assert flow.name == "enrich"
        load_spec(root / deployment["parameters"]["spec"])
        assert deployment["work_pool"]["name"]
