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

pytestmark = pytest.mark.slow  # starts a real server (~15 s)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(env: dict[str, str], attempts: int = 3) -> tuple[subprocess.Popen, str]:
    """Start the server on a free port; when another process takes the port between the probe and
    the server's bind (the server then exits), start again on a new one."""
    prefect = Path(sys.executable).with_name("prefect")
    for _ in range(attempts):
        port = _free_port()
        proc = subprocess.Popen(
            [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=2)
            except OSError:
                time.sleep(0.5)
                continue
            if proc.poll() is None:  # the answer came from our server, not from whoever took the port
                return proc, url
        _stop(proc)
    raise RuntimeError(f"prefect server did not start in {attempts} attempts")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect-server-home")),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("PREFECT_API_URL", None)
    proc, url = _start(env)
    try:
        yield url
    finally:
        _stop(proc)


def test_ui_is_served(server_url: str) -> None:
    with urllib.request.urlopen(server_url + "/", timeout=10) as response:
        assert response.status == 200
        assert b"<html" in response.read().lower()


def test_client_filters_are_accepted(server_url: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterLevel
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Pointing the settings at the server (not only the client's base_url) keeps get_client
    # from starting a temporary server of its own in this process.
    with temporary_settings({PREFECT_API_URL: server_url + "/api"}), get_client(sync_client=True) as client:
        assert client.read_flows(limit=5) == []
        assert client.read_flow_runs(limit=5) == []
        assert client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["x"]))) == []
        assert client.read_logs(log_filter=LogFilter(level=LogFilterLevel(ge_=10)), limit=5) == []
