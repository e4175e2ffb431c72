"""Soak: the demo's labeling job over >= 20k rows of the demo warehouse, memory sampled throughout.

Not part of `make test` (marker ``soak``; run it with `pytest -m soak tests/faults`; rows with
BATCHLLM_SOAK_ROWS, default 20000). The ~4.9k demo reviews are repeated with a copy number
appended (distinct prompts, the few-shot prefix still shared), run as 8 shards (8 model loads
in one process). Checks: every id once, all ok, and the process's resident memory at the end of
inference within a stated bound of its level after the first shard (no leak across shards).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
import yaml

from tests.faults.harness import runs

pytestmark = [pytest.mark.soak, pytest.mark.slow]

LEAK_BOUND_MB = 300  # RSS growth allowed between the first and the last shard's end


def _rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmRSS:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else None


def test_soak_20k_rows_no_leak(make_job) -> None:
    from batchllm import demo

    rows = int(os.environ.get("BATCHLLM_SOAK_ROWS", "20000"))
    job = make_job(rows=1)
    demo.build_warehouse(job.db)
    example = yaml.safe_load(demo.EXAMPLE.read_text())
    copies = -(-rows // 4000)
    job.spec = {
        **example,
        "source": {
            "database": "w.duckdb",
            "query": (
                f"SELECT id + 100000 * k AS id, review || ' (' || k || ')' AS review "
                f"FROM reviews, range({copies}) AS c(k) ORDER BY k, id"
            ),
        },
        "device": "cpu",
        "incremental": False,
        "shards": 8,
        "limits": {"max_rows": rows, "max_prompt_tokens": 1024},
    }
    job.write_spec()
    run = job.start()
    samples: list[tuple[float, float, int]] = []  # (time, rss MB, shards done)
    t0 = time.monotonic()
    while run.proc.poll() is None:
        rss = _rss_mb(run.proc.pid)
        if rss is not None:
            samples.append((time.monotonic() - t0, rss, run.stderr.count("shard done:")))
        time.sleep(2.0)
    assert run.wait() == 0, run.stderr[-3000:]
    ids = job.ids("review_sentiment")
    assert len(ids) == len(set(ids)) == rows
    (record,) = runs(job.db)
    assert record["rows_ok"] + record["rows_error"] == rows and record["rows_error"] < rows * 0.01
    after_first = [rss for _, rss, done in samples if done == 1]
    before_end = [rss for _, rss, done in samples if done == 7]  # the last shard running
    first, last = max(after_first), max(before_end)
    report = {
        "rows": rows,
        "wall_s": round(samples[-1][0], 1),
        "rows_per_s": round(record["rows_per_s"], 2),
        "rss_start_mb": round(samples[0][1]),
        "rss_after_first_shard_mb": round(first),
        "rss_last_shard_mb": round(last),
        "rss_peak_mb": round(max(s[1] for s in samples)),
    }
    print("soak:", json.dumps(report))
    (job.folder / "soak.json").write_text(json.dumps({**report, "samples": samples}))
    assert last - first < LEAK_BOUND_MB, report
