"""The run report: metrics over time from the engine's steps, the chart, the HTML/PNG the CLI writes."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import duckdb
import numpy as np
import pytest
from matplotlib.image import imread
from typer.testing import CliRunner

from batchllm import browse, job, report, results, warehouse
from batchllm.chart import chart_png, figure, run_series
from batchllm.cli import app
from batchllm.spec import SpecError, parse_spec
from batchllm.timeline import Timeline
from tests.product_fixtures import make_reviews_db, spec_dict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeRunner:
    """Tells its observers of each step, as ModelRunner.run does."""

    def __init__(self) -> None:
        self.observers: list[Any] = []

    def run(self, tables: list[list[int]], num_tokens: int) -> None:
        width = max(len(t) for t in tables)
        block_tables = np.full((len(tables), width), -1, np.int32)
        for i, t in enumerate(tables):
            block_tables[i, : len(t)] = t
        layout = SimpleNamespace(num_tokens=num_tokens, block_tables=block_tables)
        for observe in self.observers:
            observe(layout)


def test_timeline_counts_every_step_and_stops_observing() -> None:
    runner = FakeRunner()
    timeline = Timeline(kv_blocks_total=10, interval=0.0, max_samples=4)
    seen: list[tuple[int, int]] = []
    with timeline.watch(runner, lambda d, t: seen.append((d, t))) as progress:
        runner.run([[0, 1], [0, 1, 2]], 8)
        progress(1, 2)
        runner.run([[4]], 1)
        progress(2, 2)
    assert runner.observers == []
    runner.run([[5]], 7)  # after the run: not counted
    assert seen == [(1, 2), (2, 2)]
    d = timeline.as_dict()
    # a sample is taken as a step is launched: it counts the steps before it (the chart's rates would
    # otherwise credit a step's tokens to the interval before it ran)
    assert d["steps"] == [0, 1, 2] and d["tokens"] == [0, 8, 9]
    assert d["kv_blocks"] == [3, 1, 0]  # distinct blocks of the step's sequences; none after the run
    assert d["prompts_done"] == [0, 1, 2] and d["kv_blocks_total"] == 10
    for _ in range(5):  # over max_samples: every other sample goes, the interval doubles
        timeline.step(SimpleNamespace(num_tokens=1, block_tables=np.zeros((1, 1), np.int32)))
    assert len(timeline.samples) <= 4 and timeline.interval == 0.0


def _shard(
    started: float, t: list[float], steps: list[int], tokens: list[int], kv: list[int], rows: list[int]
):
    timeline = {"t": t, "steps": steps, "tokens": tokens, "kv_blocks": kv, "prompts_done": rows}
    return {"timeline": {**timeline, "started": started, "kv_blocks_total": 100}}


def test_series_join_shards_and_the_chart_shows_them() -> None:
    engine = [
        _shard(1000.0, [1.0, 2.0], [2, 6], [100, 140], [50, 0], [3, 10]),
        _shard(1010.0, [0.5], [4], [20], [25], [5]),
        {"steps": 3},  # a backend without a timeline adds nothing
    ]
    s = run_series(engine)
    assert s is not None
    np.testing.assert_allclose(s["t"], [1.0, 2.0, 10.5])
    np.testing.assert_allclose(s["prompts_done"], [3, 10, 15])  # the second shard continues the count
    np.testing.assert_allclose(s["tokens_per_s"], [100, 40, 40])
    np.testing.assert_allclose(s["tokens_per_step"], [50, 10, 5])
    np.testing.assert_allclose(s["kv_use"], [50, 0, 25])
    run = {"run_id": "abc", "engine": engine, "rows_processed": 15, "achieved_saving_ratio": 0.5}
    fig = figure(run)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["prompts done", "throughput", "tokens per step", "KV cache in use"]
    np.testing.assert_allclose(fig.axes[1].lines[0].get_ydata(), s["tokens_per_s"])
    png = chart_png(run)
    assert png is not None and png.startswith(PNG_MAGIC)
    assert imread(io.BytesIO(png)).shape[:2] == (440, 720)  # 9 x 5.5 inches at 80 dpi
    assert run_series([{"steps": 1}]) is None and chart_png({"run_id": "x", "engine": []}) is None


def test_series_of_shards_side_by_side() -> None:
    """Ray shards run at once on two engines: one clock in time order, counts and rates summed over
    the shards running, KV use over their two pools."""
    engine = [
        _shard(1000.0, [1.0, 2.0, 4.0], [2, 4, 6], [100, 200, 300], [50, 40, 0], [0, 2, 6]),
        _shard(1000.2, [1.0, 3.0], [1, 3], [30, 90], [30, 0], [1, 4]),
    ]
    s = run_series(engine)
    assert s is not None
    np.testing.assert_allclose(s["t"], [1.0, 1.2, 2.0, 3.2, 4.0])
    np.testing.assert_allclose(s["prompts_done"], [0, 1, 3, 6, 10])  # never backwards
    np.testing.assert_allclose(s["tokens_per_s"], [100, 130, 130, 130, 50])
    np.testing.assert_allclose(s["kv_use"], [25, 40, 35, 20, 0])  # B runs from 0.2, its pool empty
    np.testing.assert_allclose(s["tokens_per_step"], [50, 130 / 3, 130 / 3, 160 / 4, 50])


def test_recorded_run_report_from_the_cli(tmp_path: Path) -> None:
    """A real generate run on the default model (the flow's steps without Prefect), recorded, then
    `batchllm report` writes its HTML page and its chart from the runs table."""
    db = make_reviews_db(tmp_path / "w.duckdb", 4)
    spec = parse_spec(
        spec_dict(
            db, task={"kind": "generate"}, sampling={"max_tokens": 4}, engine_options={"kv_cache_gb": 0.25}
        )
    )
    prepared = job.prepare(spec, warehouse.extract(spec))
    info = job.plan(spec, prepared)
    stats = []
    for k, indices in enumerate(info.shards):
        token_ids = [prepared.prompts.token_ids[i] for i in indices]
        outcomes, shard_stats = job.infer_shard(spec, token_ids, groups=info.groups(k))
        warehouse.stage(spec, results.result_rows(spec, prepared, indices, outcomes))
        stats.append(shard_stats)
    counts = {"rows_processed": 4, "rows_ok": 4, "rows_error": 0}
    run = report.run_record(spec, prepared, info, stats, counts, {"infer_s": 1.0}, "cpu")
    assert run["rows_per_s"] == 4.0
    # rows that failed before inference (row_prompt -1) take no inference time: not in the rate
    one_failed = dataclasses.replace(
        prepared, prompts=dataclasses.replace(prepared.prompts, row_prompt=np.array([0, -1, 1, 2]))
    )
    assert (
        report.run_record(spec, one_failed, info, stats, counts, {"infer_s": 1.0}, "cpu")["rows_per_s"] == 3.0
    )
    warehouse.load(spec, run)
    assert browse.read_run(str(db), run["run_id"])["timings"]["load_s"] > 0  # the table has it too
    timeline = stats[0]["timeline"]
    assert timeline["steps"][-1] >= 4 and timeline["prompts_done"][-1] == prepared.prompts.num_prompts
    assert max(timeline["kv_blocks"]) > 0 and timeline["kv_blocks"][-1] == 0
    assert "data:image/png;base64," in report.markdown_report(run, "labels", chart=True)
    assert "data:image" not in report.markdown_report(run, "labels")  # the log stays readable

    html_out, png_out = tmp_path / "r.html", tmp_path / "r.png"
    runner = CliRunner()
    result = runner.invoke(app, ["report", run["run_id"][:8], "-d", str(db), "-o", str(html_out)])
    assert result.exit_code == 0, result.output
    page = html_out.read_text()
    assert (
        page.startswith("<!DOCTYPE html>")
        and '<img alt="metrics over time" src="data:image/png;base64,' in page
    )
    assert f"batchllm run <code>{run['run_id']}</code> -&gt; <code>labels</code>" in page
    assert "<td>rows_ok</td><td>4</td>" in page
    result = runner.invoke(app, ["report", run["run_id"], "-d", str(db), "-o", str(png_out)])
    assert result.exit_code == 0, result.output
    assert png_out.read_bytes().startswith(PNG_MAGIC) and imread(str(png_out)).ndim == 3
    result = runner.invoke(app, ["report", "nope", "-d", str(db)])
    assert result.exit_code == 2 and "no run with id 'nope'" in result.output

    # a runs table's older rows have NULL in newer columns: shown as n/a
    with duckdb.connect(str(db)) as con:
        con.execute("UPDATE batchllm_runs SET achieved_saving_ratio = NULL, distinct_prompts = NULL")
    result = runner.invoke(app, ["report", run["run_id"], "-d", str(db), "-o", str(html_out)])
    assert result.exit_code == 0, result.output
    page = html_out.read_text()
    assert "achieved n/a" in page and "(n/a distinct prompts)" in page


def test_show_and_report_open_the_warehouse_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot or a read-only mount serves `show` and `report`: neither opens the file for writing."""
    db = make_reviews_db(tmp_path / "w.duckdb", 2)
    modes: list[bool] = []
    opened = warehouse.open_database

    def spy(database: str, read_only: bool = False, wait: bool = True) -> Any:
        modes.append(read_only)
        return opened(database, read_only, wait)

    monkeypatch.setattr(warehouse, "open_database", spy)
    assert browse.show(str(db), "reviews", limit=1).num_rows == 1
    with pytest.raises(SpecError, match="does not exist"):
        browse.read_run(str(db), "x")
    assert modes == [True, True]
