"""The run report's chart: prompts done, throughput, tokens per step and KV use over the run's time.

Reads the per-shard timelines the native backend stores in the engine stats
(``batchllm.timeline``), joins them on one clock and draws them with matplotlib's
object API (no pyplot: no global state, safe inside a flow's worker threads).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np

PANELS = (  # (series, title, y label)
    ("prompts_done", "prompts done", "prompts"),
    ("tokens_per_s", "throughput", "tokens/s"),
    ("tokens_per_step", "tokens per step", "tokens"),
    ("kv_use", "KV cache in use", "% of the pool"),
)


def run_series(engine_stats: list[dict[str, Any]]) -> dict[str, np.ndarray] | None:
    """The shards' timelines on one clock (s since the first shard started); None without any.

    Shards run one after another on one engine or side by side on several (Ray actors): every sample
    of every shard, in time order, gives the run's state then. Prompts done add up over all shards;
    throughput and tokens per step over the shards running then (each shard's latest sampling
    interval, the first from its start), KV use over their pools.
    """
    shards = [
        s["timeline"] for s in engine_stats if isinstance(s.get("timeline"), dict) and s["timeline"]["t"]
    ]
    if not shards:
        return None
    first = min(float(s["started"]) for s in shards)
    n = len(shards)
    start = np.array([float(s["started"]) - first for s in shards])
    times = [np.asarray(s["t"], dtype=np.float64) + start[i] for i, s in enumerate(shards)]
    end = np.array([t[-1] for t in times])
    total = np.array([max(int(s.get("kv_blocks_total") or 0), 1) for s in shards], dtype=np.float64)
    done, kv, dtok, dsteps, dt = (np.zeros(n) for _ in range(5))
    order = sorted((t, i, k) for i, ts in enumerate(times) for k, t in enumerate(ts))
    out: dict[str, list[float]] = {k: [] for k in ("t", *(p[0] for p in PANELS))}
    for t, i, k in order:
        s = shards[i]
        done[i], kv[i] = s["prompts_done"][k], s["kv_blocks"][k]
        dtok[i] = s["tokens"][k] - (s["tokens"][k - 1] if k else 0)
        dsteps[i] = s["steps"][k] - (s["steps"][k - 1] if k else 0)
        dt[i] = times[i][k] - (times[i][k - 1] if k else start[i])
        running = (start <= t) & (end >= t)
        rates = np.divide(dtok, dt, out=np.zeros(n), where=dt > 0)
        steps = dsteps[running].sum()
        out["t"].append(t)
        out["prompts_done"].append(done.sum())
        out["tokens_per_s"].append(rates[running].sum())
        out["tokens_per_step"].append(dtok[running].sum() / steps if steps > 0 else 0.0)
        out["kv_use"].append(100.0 * kv[running].sum() / total[running].sum())
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def figure(run: dict[str, Any]) -> Any:
    """A 2x2 matplotlib Figure of the run's series (None when the run has no timeline)."""
    from matplotlib.figure import Figure

    series = run_series(run.get("engine") or [])
    if series is None:
        return None
    fig = Figure(figsize=(9, 5.5), dpi=80, layout="constrained")
    fig.suptitle(
        f"run {run['run_id']}: {run.get('rows_processed', 0)} rows, prefix sharing saved "
        f"{run.get('achieved_saving_ratio', 0.0):.1%} of prompt tokens "
        f"(planned {run.get('planned_saving_ratio', 0.0):.1%})"
    )
    for ax, (key, title, unit) in zip(fig.subplots(2, 2).flat, PANELS, strict=True):
        ax.plot(series["t"], series[key], marker="." if len(series["t"]) < 30 else None, label=key)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.set_xlabel("seconds since the first shard started")
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    return fig


def chart_png(run: dict[str, Any]) -> bytes | None:
    """The chart as PNG bytes (None when the run has no timeline)."""
    fig = figure(run)
    if fig is None:
        return None
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def data_uri(png: bytes) -> str:
    """A PNG as a data URI: Prefect's markdown artifacts and HTML files embed it without a file server."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
