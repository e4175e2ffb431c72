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

    Rates are per sampling interval (the first from the shard's start); prompts done add up
    over shards, which run one after another.
    """
    shards = [
        s["timeline"] for s in engine_stats if isinstance(s.get("timeline"), dict) and s["timeline"]["t"]
    ]
    if not shards:
        return None
    first = min(float(s["started"]) for s in shards)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("t", *(p[0] for p in PANELS))}
    done_before = 0
    for s in sorted(shards, key=lambda s: float(s["started"])):
        t = np.asarray(s["t"], dtype=np.float64)
        tokens = np.asarray(s["tokens"], dtype=np.float64)
        steps = np.asarray(s["steps"], dtype=np.float64)
        dt = np.diff(t, prepend=0.0)
        dtok = np.diff(tokens, prepend=0.0)
        dsteps = np.diff(steps, prepend=0.0)
        rows = np.asarray(s["prompts_done"], dtype=np.float64) + done_before
        parts["t"].append(t + float(s["started"]) - first)
        parts["prompts_done"].append(rows)
        parts["tokens_per_s"].append(np.divide(dtok, dt, out=np.zeros_like(dt), where=dt > 0))
        parts["tokens_per_step"].append(np.divide(dtok, dsteps, out=np.zeros_like(dt), where=dsteps > 0))
        total = max(int(s.get("kv_blocks_total") or 0), 1)
        parts["kv_use"].append(100.0 * np.asarray(s["kv_blocks"], dtype=np.float64) / total)
        done_before = int(rows[-1])
    return {k: np.concatenate(v) for k, v in parts.items()}


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
