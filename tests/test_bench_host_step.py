"""bench.host_step runs both modes on a small case and reports the steps it took."""

from __future__ import annotations

import pytest

from batchllm.engine.scheduler import Scheduler
from bench import host_step


def test_host_step_runs_both_modes(capsys: pytest.CaptureFixture[str]) -> None:
    steady = Scheduler.steady
    assert host_step.main(["--case", "32,16,8,4,8", "--runs", "1"]) == 0
    assert Scheduler.steady is steady  # restored for the rest of the process
    lines = capsys.readouterr().out.splitlines()
    loop, fast = (line for line in lines if line.startswith(("loop:", "steady:")))
    assert "32 requests" in loop and "steady steps 0 " in loop
    assert "steady steps 0 " not in fast  # the steady run took steady steps


def test_host_step_with_eos_and_padded_sizes(capsys: pytest.CaptureFixture[str]) -> None:
    """Requests ending at EOS inside steady runs that ride on as padding (stand-in graph sizes)."""
    args = [
        "--case",
        "32,16,24,16,8",
        "--runs",
        "1",
        "--modes",
        "steady",
        "--eos-rate",
        "0.05",
        "--padded",
        "64",
    ]
    assert host_step.main(args) == 0
    (line,) = (line for line in capsys.readouterr().out.splitlines() if line.startswith("steady:"))
    assert "steady steps 0 " not in line and "tokens/request" in line
