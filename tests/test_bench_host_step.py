"""bench.host_step runs both modes on a small case and reports the steps it took."""

from __future__ import annotations

import re

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


def _schedule(capsys: pytest.CaptureFixture[str], reserve: str) -> tuple[int, int, int, int, int]:
    """(steps, decode steps, steps with prefill, prefill tokens, preemptions) of one loop run of 8 groups
    of 4 in a pool that holds ~4 of them."""
    args = ["--case", "64,32,24,4,8", "--kv-tokens", "1200", "--runs", "1", "--modes", "loop"]
    assert host_step.main([*args, "--decode-reserve", reserve]) == 0
    run, schedule = (
        line for line in capsys.readouterr().out.splitlines() if line.startswith(("loop:", "  "))
    )
    steps = int(re.search(r"(\d+) steps,", run).group(1))  # type: ignore[union-attr]
    decode, mixed = (int(n) for n in re.findall(r"(?:decode steps|steps with prefill) (\d+)", schedule))
    tokens = int(re.search(r"prefill tokens (\d+)", schedule).group(1))  # type: ignore[union-attr]
    preempted = int(re.search(r"preemptions (\d+)", schedule).group(1))  # type: ignore[union-attr]
    return steps, decode, mixed, tokens, preempted


def test_host_step_reports_the_schedule(capsys: pytest.CaptureFixture[str]) -> None:
    """Every step is counted once; the whole reservation computes each prompt token once and preempts
    nothing, half of it admits more, preempts and recomputes."""
    steps, decode, mixed, tokens, preempted = _schedule(capsys, "1.0")
    assert decode + mixed == steps and preempted == 0
    assert tokens == 8 * 64 + 32 * 32  # each group's prefix once, each member's 32-token suffix once
    steps, decode, mixed, more_tokens, preempted = _schedule(capsys, "0.5")
    assert decode + mixed == steps and preempted > 0 and more_tokens > tokens
