"""A real `prefect server start`, as a user runs it to watch jobs in the UI.

Prefect's test harness runs the API in a mode that tolerates what a standalone
server rejects (with fastapi >= 0.151 the filter endpoints answer 422 to the
null fields that Prefect's client and UI send), so the pinned stack is checked
against the real command here.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("prefect server did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_ui_is_served(server_url: str) -> None:
    with urllib.request.urlopen(server_url + "/", timeout=10) as response:
        assert response.status == 200
        assert b"<html" in response.read().lower()


def test_client_filters_are_accepted(server_url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterLevel

    with get_client(sync_client=True, httpx_settings={"base_url": server_url + "/api"}) as client:
        assert client.read_flows(limit=5) == []
        assert client.read_flow_runs(limit=5) == []
        assert client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["x"]))) == []
        assert client.read_logs(log_filter=LogFilter(level=LogFilterLevel(ge_=10)), limit=5) == []
