"""The fault suite's fixtures: one Prefect server for every `batchllm run` process it starts,
and the ``soak`` marker, whose tests run only when asked for (``-m soak``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Job


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "soak: long run (>= 20k rows); only with -m soak")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``soak`` tests unless the -m expression names them (a plain `make test` stays short)."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="soak: run with `pytest -m soak`")
    for item in items:
        if item.get_closest_marker("soak"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def run_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Environment of the runs: a real Prefect server shared by all of them (started once, ~15 s)."""
    from tests.test_prefect_server import _start, _stop

    home = tmp_path_factory.mktemp("prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "BATCHLLM_"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    proc, url = _start(env)
    try:
        yield {**env, "PREFECT_API_URL": f"{url}/api", "BATCHLLM_LOCK_TIMEOUT_S": "20"}
    finally:
        _stop(proc)


@pytest.fixture
def make_job(tmp_path: Path, run_env: dict[str, str]):
    """``make_job(name, rows=48, **spec overrides)``: a job folder under this test's tmp_path."""

    def make(name: str = "job", **kwargs) -> Job:
        return Job.create(tmp_path / name, run_env, **kwargs)

    return make
