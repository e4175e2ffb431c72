"""The GPU benchmarks' command lines, run end to end on the CPU with a tiny model and no peer: a defect in
their setup, their tables or their results.json shows here rather than in a device call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(module: str, out: Path, *args: str) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        module,
        "--model",
        "tiny",
        "--device",
        "cpu",
        "--peer",
        "none",
        "--out",
        str(out),
    ]
    proc = subprocess.run([*cmd, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())
    assert "error" not in result
    assert (out / "table.md").read_text() == result["table"] and result["table"] in proc.stdout
    return result


def test_generate_bench_on_cpu(tmp_path: Path) -> None:
    result = run_bench("bench.generate", tmp_path, "--case", "64,16,4,4,2", "--repeat", "2")
    meta = result["meta"]
    assert meta["dtype"] == "float32" and meta["commit"] and meta["total_s"] > 0
    (case,) = result["cases"]
    run = case["native"]
    assert run["requests"] == 8 and run["errors"] == 0 and run["wrong_length"] == 0
    assert run["output_tokens"] == 8 * 4 and len(run["walls_s"]) == 2
    assert run["allocator"] == [{}, {}]  # the CUDA allocator's counters, per run; none on the CPU
    stats = run["stats"]
    assert stats["planned_saving_ratio"] == pytest.approx(stats["saving_ratio"]) and stats["saving_ratio"] > 0
    assert case["floor"]["total_s"] > 0 and 0 < run["efficiency"] < 1
    assert case["vllm"] == {}  # --peer none: not run, and said so in the table
    assert "| vLLM sorted | not run |" in result["table"]


def test_score_bench_on_cpu(tmp_path: Path) -> None:
    result = run_bench("bench.score", tmp_path, "--case", "64,16,4,2")
    assert result["meta"]["labels"] == "single"
    (case,) = result["cases"]
    assert set(case["native"]) == {"packed", "members"}
    for run in case["native"].values():
        assert run["requests"] == 8 and run["errors"] == 0 and run["mfu"] > 0
    computed = {mode: run["prompt_tokens_computed"] for mode, run in case["native"].items()}
    assert computed["packed"] == computed["members"] == 2 * 64 + 8 * 16  # each prefix once


def test_a_terminated_generate_bench_keeps_what_it_measured(tmp_path: Path) -> None:
    """A device call's timeout sends SIGTERM: the run stops, says so, and its results.json stays."""
    import signal
    import time

    cmd = [sys.executable, "-m", "bench.generate", "--model", "tiny", "--device", "cpu", "--peer", "none"]
    cmd += ["--case", "256,64,64,8,8", "--repeat", "50", "--out", str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = tmp_path / "results.json"
    deadline = time.monotonic() + 120
    while not results.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert results.exists() and proc.poll() is None, "no results.json from a running bench within 120 s"
    time.sleep(1.0)  # inside the native runs (the whole run takes ~15 s here)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    result = json.loads(results.read_text())
    assert "SystemExit" in result["error"] and result["meta"]["total_s"] > 0
    assert result["hardware"]["peak_flops"] > 0 and result["cases"][0]["floor"]["total_s"] > 0
    assert result["native_engine"]["engine_kwargs"]["device"] == "cpu"  # stopped in the native runs
    assert result["cases"][0]["native"] == {}  # unfinished: nothing claimed for it
    assert not (tmp_path / "results.json.part").exists()


def test_config_ab_sets_the_engine_settings_and_restores_them(tmp_path: Path, monkeypatch) -> None:
    """A/B of engine settings (bench.config_ab's SETTINGS: a model threshold, two-level attention on or
    off) beside an attention override: each run sees its own configuration's values, and the defaults
    are back after the bench."""
    from batchllm.engine.attention import cost
    from batchllm.engine.model import MLP
    from bench import config_ab

    assert config_ab.split_config({"gate_up_epilogue_min_rows": 1, "num_warps": 4, "two_level": 0}) == (
        {"num_warps": 4},
        {
            ("batchllm.engine.model", "MLP.GEMM_EPILOGUE_MIN_ROWS"): 1,
            ("batchllm.engine.attention.cost", "ENABLED"): 0,
        },
    )
    default, seen = MLP.GEMM_EPILOGUE_MIN_ROWS, []
    generate_run = config_ab.generate.native_run

    def recording(*a: Any, **kw: Any) -> dict[str, Any]:
        seen.append((MLP.GEMM_EPILOGUE_MIN_ROWS, cost.ENABLED))
        return generate_run(*a, **kw)

    out = tmp_path / "ab.json"
    both = '{"gate_up_epilogue_min_rows": 1, "two_level": 0}'
    argv = ["generate", "--config", "{}", "--config", both, "--rounds", "1", "--json", str(out)]
    argv += ["--model", "tiny", "--device", "cpu", "--case", "64,16,2,2,2"]
    monkeypatch.setattr(config_ab.generate, "native_run", recording)
    assert config_ab.main(argv) == 0
    assert seen == [(default, True), (1, False)]
    assert (default, True) == (MLP.GEMM_EPILOGUE_MIN_ROWS, cost.ENABLED)  # restored
    assert [r["errors"] for r in json.loads(out.read_text())["runs"]] == [0, 0]
