"""A run's statistics: the runs-table record, and its markdown page and stats table.

The flow publishes the page and the table as Prefect artifacts, the CLI prints
the record; all three read the one dict ``run_record`` builds.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Any

from batchllm import warehouse
from batchllm.chart import chart_png, data_uri

if TYPE_CHECKING:
    from batchllm.job import PlanInfo, Prepared
    from batchllm.spec import JobSpec


def run_record(
    spec: JobSpec,
    prepared: Prepared,
    plan_info: PlanInfo,
    engine_stats: list[dict[str, Any]],
    counts: dict[str, int],
    timings: dict[str, float],
    device: str,
) -> dict[str, Any]:
    """One row of the runs table: what ran, how much, how long, how much was shared."""
    prompt_tokens = prepared.prompts.prompt_tokens_logical
    output_tokens = sum(int(s.get("output_tokens", 0)) for s in engine_stats)
    logical = sum(int(s.get("prompt_tokens_logical", 0)) for s in engine_stats)
    computed = sum(int(s.get("prompt_tokens_computed", 0)) for s in engine_stats)
    infer_s = timings.get("infer_s", 0.0)
    processed = counts.get("rows_processed", 0)
    inferred = max(0, processed - int((prepared.prompts.row_prompt < 0).sum()))  # not failed before inference
    return {
        "run_id": prepared.run_id,
        "job": spec.name,
        "table": spec.output.table,
        "spec_hash": spec.spec_hash,
        "params_hash": spec.params_hash,
        "model": spec.model,
        "task": spec.task.kind,
        "device": device,
        "mode": spec.output.mode,
        "incremental": spec.incremental,
        "started_at": prepared.started_at,
        "finished_at": warehouse.now(),
        "rows_total": prepared.rows_total,
        "rows_skipped": prepared.rows_skipped,
        "rows_recovered": prepared.rows_recovered,
        "rows_processed": processed,
        "rows_ok": counts.get("rows_ok", 0),
        "rows_error": counts.get("rows_error", 0),
        "distinct_prompts": prepared.prompts.num_prompts,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "planned_saving_ratio": float(plan_info.stats.get("saving_ratio", 0.0)),
        "achieved_saving_ratio": (1.0 - computed / logical) if logical else 0.0,
        "rows_per_s": inferred / infer_s if infer_s > 0 else 0.0,
        "tokens_per_s": (prompt_tokens + output_tokens) / infer_s if infer_s > 0 else 0.0,
        "timings": {**prepared.timings, **timings},
        "planner": plan_info.stats,
        "engine": engine_stats,
    }


def markdown_report(run: dict[str, Any], table: str, chart: bool = False) -> str:
    """The run's statistics as a short markdown page (Prefect artifact, terminal).

    ``chart``: embed the metrics-over-time chart as a PNG data URI (the artifact, not the log).
    """
    run = {k: v for k, v in run.items() if v is not None}  # a runs table's older rows lack newer columns
    t = run.get("timings", {})

    def f(key: str, spec: str = "") -> str:
        return "n/a" if key not in run else format(run[key], spec)

    lines = [
        f"# batchllm run `{run['run_id']}` -> `{table}`",
        "",
        f"- model `{f('model')}` on {f('device')}, task {f('task')}, mode {f('mode')}",
        f"- rows: {f('rows_total')} read, {f('rows_skipped')} skipped (done), "
        f"{f('rows_recovered')} recovered, {f('rows_processed')} processed, "
        f"{f('rows_ok')} ok, **{f('rows_error')} errors**",
        f"- tokens: {f('prompt_tokens')} prompt ({f('distinct_prompts')} distinct prompts), "
        f"{f('output_tokens')} output",
        f"- prefix sharing: planned saving {f('planned_saving_ratio', '.1%')}, "
        f"achieved {f('achieved_saving_ratio', '.1%')}",
        f"- throughput: {f('rows_per_s', '.2f')} rows/s, {f('tokens_per_s', '.1f')} tokens/s",
        "- durations: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if v is not None),
    ]
    if run.get("task") in ("classify", "score") and run.get("engine"):
        lines.insert(-1, _prefill_line(run["engine"]))
    if chart and (png := chart_png(run)) is not None:
        lines += ["", f"![metrics over time]({data_uri(png)})"]
    return "\n".join(lines) + "\n"


def html_report(run: dict[str, Any], table: str) -> str:
    """The markdown report and the stats table as one self-contained HTML page (the chart inlined)."""
    title, items, images = "", [], []
    for line in markdown_report(run, table, chart=True).splitlines():
        if line.startswith("![") and "](" in line:
            alt, src = line[2:-1].split("](", 1)
            images.append(f'<p><img alt="{html.escape(alt)}" src="{src}"></p>')
        elif line.startswith("# "):
            title = _inline(line[2:])
        elif line.startswith("- "):
            items.append(f"<li>{_inline(line[2:])}</li>")
    rows = "".join(
        f"<tr><td>{html.escape(r['stat'])}</td><td>{html.escape(r['value'])}</td></tr>"
        for r in stats_table(run)
    )
    head = (
        f'<meta charset="utf-8"><title>batchllm run {html.escape(run["run_id"])}</title><style>{_CSS}</style>'
    )
    parts = [
        f"<h1>{title}</h1>",
        "<ul>",
        *items,
        "</ul>",
        *images,
        "<h2>statistics</h2>",
        f"<table>{rows}</table>",
    ]
    return f"<!DOCTYPE html>\n<html><head>{head}</head><body>\n" + "\n".join(parts) + "\n</body></html>\n"


_CSS = "body{font-family:sans-serif;max-width:960px;margin:2em auto}td{padding:2px 8px;border-bottom:1px solid #ddd}"


def _inline(text: str) -> str:
    """Markdown's inline code and bold, escaped for HTML."""
    text = html.escape(text)
    text = re.sub(r"`([^`]*)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]*)\*\*", r"<b>\1</b>", text)


def _prefill_line(engine_stats: list[dict[str, Any]]) -> str:
    """Prefill-only execution at a glance: steps, tokens computed (label positions), packing."""

    def total(key: str) -> int:
        return sum(int(s.get(key, 0)) for s in engine_stats)

    return (
        f"- prefill only (no decode): {total('steps')} steps, {total('tokens_computed')} tokens computed "
        f"({total('label_tokens_computed')} for multi-token labels), {total('prefixes_computed')} shared "
        f"prefixes, {total('packed_items')} candidates packed into {total('packs')} sequences"
    )


def stats_table(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's scalar statistics as (stat, value) rows for a table artifact."""
    rows = [{"stat": k, "value": v} for k, v in run.items() if not isinstance(v, dict | list)]
    rows += [
        {"stat": f"time.{k}", "value": "n/a" if v is None else round(v, 3)}
        for k, v in (run.get("timings") or {}).items()
    ]
    return [{"stat": r["stat"], "value": str(r["value"])} for r in rows]
