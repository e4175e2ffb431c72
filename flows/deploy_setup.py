"""Create what the deployments in deploy/prefect.yaml expect on a Prefect server.

    PREFECT_API_URL=http://prefect-host:4200/api python -m batchllm.flows.deploy_setup

makes the work pool the deployments name (``gpu-pool``, a process pool) and the
global concurrency limits ``gpu`` and ``cpu`` that the flow's inference task
holds a slot of. Idempotent, so it can run on every deploy: what exists is
kept, a limit whose size differs is set to the size asked for, and a pool of
another type is an error (Prefect cannot change a pool's type in place).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

DEFAULT_POOL = "gpu-pool"
POOL_TYPE = "process"


class SetupError(RuntimeError):
    """The server cannot be set up as asked (no server configured, a pool of another type)."""


@dataclass(frozen=True)
class Action:
    """One thing the setup looked at, and what it did about it."""

    kind: str  # "work pool" or "concurrency limit"
    name: str
    outcome: str  # "created", "exists" or "updated"
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name!r}: {self.outcome}" + (f" ({self.detail})" if self.detail else "")


def setup(pool: str = DEFAULT_POOL, gpu_limit: int = 1, cpu_limit: int = 1) -> list[Action]:
    """Make the work pool and the ``gpu``/``cpu`` limits exist on the configured server."""
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # Without a server URL the client would start a throwaway server and the setup would vanish.
        raise SetupError("no Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)")
    if gpu_limit < 1 or cpu_limit < 1:
        raise SetupError("concurrency limits must be at least 1")
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        actions = [_work_pool(client, pool)]
        actions += [_limit(client, name, size) for name, size in (("gpu", gpu_limit), ("cpu", cpu_limit))]
    return actions


def _work_pool(client: SyncPrefectClient, name: str) -> Action:
    """Create the process work pool with Prefect's default job template, unless it exists."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    try:
        existing = client.read_work_pool(name)
    except ObjectNotFound:
        template = ProcessWorker.get_default_base_job_template()
        client.create_work_pool(WorkPoolCreate(name=name, type=POOL_TYPE, base_job_template=template))
        return Action("work pool", name, "created", POOL_TYPE)
    if existing.type != POOL_TYPE:
        raise SetupError(
            f"work pool {name!r} exists with type {existing.type!r}, not {POOL_TYPE!r}: "
            "delete it (prefect work-pool delete) or choose another --pool"
        )
    return Action("work pool", name, "exists", POOL_TYPE)


def _limit(client: SyncPrefectClient, name: str, size: int) -> Action:
    """Create the global concurrency limit, or set its size when it differs."""
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    try:
        existing = client.read_global_concurrency_limit_by_name(name)
    except ObjectNotFound:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=size))
        return Action("concurrency limit", name, "created", f"limit {size}")
    if existing.limit != size or not existing.active:
        client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=size, active=True))
        return Action("concurrency limit", name, "updated", f"limit {existing.limit} -> {size}")
    return Action("concurrency limit", name, "exists", f"limit {size}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m batchllm.flows.deploy_setup",
        description="Create the work pool and the gpu/cpu concurrency limits that deploy/prefect.yaml uses.",
    )
    parser.add_argument("--pool", default=DEFAULT_POOL, help=f"work pool name (default {DEFAULT_POOL})")
    parser.add_argument(
        "--gpu-limit", type=int, default=1, help="inference tasks at once on GPUs: the GPUs the workers have"
    )
    parser.add_argument("--cpu-limit", type=int, default=1, help="inference tasks at once on CPU workers")
    args = parser.parse_args(argv)
    try:
        actions = setup(args.pool, args.gpu_limit, args.cpu_limit)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for action in actions:
        print(action)
    return 0


if __name__ == "__main__":
    sys.exit(main())
