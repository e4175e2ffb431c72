"""Screenshots of a deployed enrich run in the Prefect UI, for docs/operations.md.

    .venv/bin/python deploy/ui_screenshots.py --out docs

Runs the operations path end to end in a temporary PREFECT_HOME: a real
`prefect server start`, `python -m batchllm.flows.deploy_setup`, `prefect deploy` of
the nightly deployment (pulled into this checkout), a real worker, and one run
of the demo's labeling job on a copy of the demo warehouse (``--rows``
reviews). Then headless Chromium (Debian's ``chromium`` package) captures the
flow-run page, the markdown report (chart) and the stats table, and everything
is stopped. A documentation step, not part of the tests.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from uuid import UUID

import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOYMENT = "nightly-review-sentiment"
PULL_STEP = "prefect.deployments.steps.set_working_directory"


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("prefect server exited; see server.log")
        try:
            urllib.request.urlopen(f"{url}/api/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("prefect server did not answer")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _job(work: Path, rows: int) -> Path:
    """The demo's labeling job on a fresh copy of the demo warehouse, limited to ``rows`` reviews."""
    import duckdb

    from batchllm.demo import build_warehouse

    database = work / "warehouse.duckdb"
    demo = REPO / "demo" / "warehouse.duckdb"
    if demo.exists():
        shutil.copyfile(demo, database)
        with duckdb.connect(str(database)) as con:  # a fresh copy: no earlier results
            con.execute("DROP TABLE IF EXISTS review_sentiment")
            con.execute("DROP TABLE IF EXISTS batchllm_runs")
    else:
        build_warehouse(database)
    spec = yaml.safe_load((REPO / "examples" / "labeling.yaml").read_text())
    spec["source"]["database"] = str(database)
    spec["limits"]["max_rows"] = rows
    spec["device"] = "cpu"
    path = work / "labeling.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _deploy(work: Path, env: dict[str, str]) -> None:
    """`prefect deploy` of the nightly deployment, its pull step pointed at this checkout."""
    config = yaml.safe_load((REPO / "deploy" / "prefect.yaml").read_text())
    config["pull"][0][PULL_STEP]["directory"] = str(REPO)
    prefect_file = work / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        _bin("prefect"),
        "--no-prompt",
        "deploy",
        "--prefect-file",
        str(prefect_file),
        "--name",
        DEPLOYMENT,
    ]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def _run(api_url: str, spec: Path) -> str:
    """Run the deployment once and wait for it; return the flow run id."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        run = run_deployment(
            f"enrich/{DEPLOYMENT}",
            parameters={"spec": str(spec)},
            timeout=900,
            poll_interval=2,
            as_subflow=False,
        )
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"flow run {run.id} ended {run.state}")
    return str(run.id)


def _artifacts(api_url: str, run_id: str) -> dict[str, Any]:
    """The flow run's report (markdown) and stats (table) artifact ids."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(run_id)]))
        )
    by_type = {a.type: a.id for a in artifacts}
    return {"run": run_id, "report": by_type["markdown"], "stats": by_type["table"]}


class Browser:
    """Headless Chromium driven over the DevTools protocol: load a page, wait for a text, click, capture.

    Chromium's one-shot ``--screenshot`` cannot click: the stats table shows 10 rows a page until its
    page size is changed, so the pages are driven instead.
    """

    def __init__(self, chromium: str, profile: Path) -> None:
        self.proc = subprocess.Popen(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # running as root
                "--disable-gpu",
                "--hide-scrollbars",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as response:
            target = json.load(response)
        from websockets.sync.client import connect

        self.ws = connect(target["webSocketDebuggerUrl"], max_size=None)
        self.next_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, width: int, height: int, ready: str, timeout_s: float = 60) -> None:
        """Load ``url`` in a window of that size and wait until the JS expression ``ready`` is true."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        self.call("Page.navigate", url=url)
        self.wait(ready, timeout_s)

    def wait(self, ready: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.js(ready):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the page never got ready: {ready}")
            time.sleep(0.5)
        time.sleep(2)  # charts and fonts settle after the data arrives

    def click(self, selector: str, timeout_s: float = 20) -> None:
        """A real mouse click in the middle of the first element matching ``selector``."""
        find = (
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return null;"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        deadline = time.monotonic() + timeout_s
        while (point := self.js(find)) is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"no element {selector!r}")
            time.sleep(0.3)
        x, y = point
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)
        time.sleep(0.5)

    def capture(self, path: Path) -> None:
        self.js("window.scrollTo(0, 0)")
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.ws.close()
        _stop(self.proc)


def _screenshots(browser: Browser, url: str, ids: dict[str, Any], out: Path) -> list[Path]:
    """The flow run (graph and task runs), the markdown report (chart) and the whole stats table."""

    def shows(text: str) -> str:
        return f"!!document.body && document.body.innerText.includes({json.dumps(text)})"

    shots = []
    browser.open(f"{url}/runs/flow-run/{ids['run']}?tab=TaskRuns", 1400, 1000, shows("report-"))
    shots.append(out / "ui-flow-run.png")
    browser.capture(shots[-1])
    browser.open(
        f"{url}/artifacts/artifact/{ids['report']}",
        1400,
        1250,
        "!!document.querySelector('img[alt=\"metrics over time\"]')?.complete",
    )
    shots.append(out / "ui-run-report.png")
    browser.capture(shots[-1])
    browser.open(f"{url}/artifacts/artifact/{ids['stats']}", 1400, 2000, shows("spec_hash"))
    browser.click('button[aria-label="Items per page"]')
    browser.click('[role="option"]:last-child')  # the largest page size (50): every row on one page
    browser.wait(shows("time.infer_s"))
    height = browser.js(
        "Math.ceil(document.querySelector('[data-testid=table-display]').getBoundingClientRect().bottom) + 120"
    )
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=int(height),
        deviceScaleFactor=1,
        mobile=False,
    )
    time.sleep(1)
    shots.append(out / "ui-run-stats.png")
    browser.capture(shots[-1])
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNGs (docs)")
    parser.add_argument("--rows", type=int, default=48, help="reviews to label (default 48)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, database)")
    parser.add_argument(
        "--server",
        help="instead: capture FLOW_RUN on this running server (http://HOST:PORT), nothing started",
    )
    parser.add_argument("--flow-run", help="the flow run id for --server")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("error: no chromium (Debian: apt-get install -y chromium)", file=sys.stderr)
        return 2
    if bool(args.server) != bool(args.flow_run):
        parser.error("--server and --flow-run go together")
    work = Path(tempfile.mkdtemp(prefix="batchllm-ui-"))
    started: list[subprocess.Popen] = []
    try:
        if args.server:
            url = args.server.rstrip("/")
            ids = _artifacts(f"{url}/api", args.flow_run)
        else:
            url, ids = _stack_run(work, args.rows, started)
        shots = _capture(chromium, work, url, ids, args.out)
    finally:
        for proc in started:
            _stop(proc)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for shot in shots:
        print(f"{shot} ({shot.stat().st_size // 1024} KB)")
    return 0


def _capture(chromium: str, work: Path, url: str, ids: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    browser = Browser(chromium, work / "chromium")
    try:
        return _screenshots(browser, f"{url}/v2", ids, out)  # v2: the UI that Prefect 3.8 serves by default
    finally:
        browser.close()


def _stack_run(work: Path, rows: int, started: list[subprocess.Popen]) -> tuple[str, dict[str, Any]]:
    """Server, setup, deploy, worker, one run; returns the server URL and the run's ids.

    The server is left running for the screenshots: ``main`` stops it (it is in ``started``).
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_HOME": str(work / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    server_env = {
        **env,
        "PREFECT_UI_API_URL": f"{url}/api",  # the UI asks this URL; its default assumes port 4200
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # no nightly runs next to ours
    }
    env["PREFECT_API_URL"] = f"{url}/api"
    with (work / "server.log").open("w") as log:
        server = subprocess.Popen(
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=server_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    started.append(server)
    _wait_healthy(url, server)
    subprocess.run([sys.executable, "-m", "batchllm.flows.deploy_setup"], env=env, check=True)
    _deploy(work, env)
    spec = _job(work, rows)
    with (work / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            [_bin("prefect"), "worker", "start", "--pool", "gpu-pool"],
            env=env,
            cwd=work,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # see tests/test_deploy.py
        )
    try:
        run_id = _run(env["PREFECT_API_URL"], spec)
    finally:
        _stop(worker)
    print(f"flow run {run_id} completed")
    return url, _artifacts(env["PREFECT_API_URL"], run_id)


if __name__ == "__main__":
    sys.exit(main())
