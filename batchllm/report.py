"""A run's statistics: the runs-table record, and its markdown page and stats table.

The flow publishes the page and the table as Prefect artifacts, the CLI prints
the record; all three read the one dict ``run_record`` builds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from batchllm import warehouse

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
    return {
        "run_id": prepared.run_id,
        "job": spec.name,
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
        "rows_per_s": processed / infer_s if infer_s > 0 else 0.0,
        "tokens_per_s": (prompt_tokens + output_tokens) / infer_s if infer_s > 0 else 0.0,
        "timings": {**prepared.timings, **timings},
        "planner": plan_info.stats,
        "engine": engine_stats,
    }


def markdown_report(run: dict[str, Any], table: str) -> str:
    """The run's statistics as a short markdown page (Prefect artifact, terminal)."""
    t = run["timings"]
    lines = [
        f"# batchllm run `{run['run_id']}` -> `{table}`",
        "",
        f"- model `{run['model']}` on {run['device']}, task {run['task']}, mode {run['mode']}",
        f"- rows: {run['rows_total']} read, {run['rows_skipped']} skipped (done), "
        f"{run['rows_recovered']} recovered, {run['rows_processed']} processed, "
        f"{run['rows_ok']} ok, **{run['rows_error']} errors**",
        f"- tokens: {run['prompt_tokens']} prompt ({run['distinct_prompts']} distinct prompts), "
        f"{run['output_tokens']} output",
        f"- prefix sharing: planned saving {run['planned_saving_ratio']:.1%}, "
        f"achieved {run['achieved_saving_ratio']:.1%}",
        f"- throughput: {run['rows_per_s']:.2f} rows/s, {run['tokens_per_s']:.1f} tokens/s",
        "- durations: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()),
    ]
    if run["task"] in ("classify", "score") and run["engine"]:
        lines.insert(-1, _prefill_line(run["engine"]))
    return "\n".join(lines) + "\n"


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
    rows += [{"stat": f"time.{k}", "value": round(v, 3)} for k, v in run["timings"].items()]
    return [{"stat": r["stat"], "value": str(r["value"])} for r in rows]
