"""Joining (or starting) the Ray cluster of a job and sizing its engine actors.

The address is the job's ``executor.address``, else ``RAY_ADDRESS``, else a
local cluster started in this process (stopped again by ``close``). A process
that already called ``ray.init`` keeps its cluster. Actors: one per GPU when
the job runs on CUDA (``gpus_per_actor`` GPUs each: 1, or vLLM's tensor x
pipeline parallel size), else one per ``cpus_per_actor`` CPUs; ``actors`` in
the spec overrides the count. Everything is checked here, before a model loads.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

from batchllm.spec import JobSpec, SpecError

# Ray's own chatter off unless the user set these: no usage-stats banner, no accelerator-env
# FutureWarning for CPU actors, no deduplicated-log notices (actor logs reach Prefect instead).
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "0",
}


@dataclass
class Cluster:
    """The cluster a job's shards run on, and the shape of its engine actors."""

    address: str
    started: bool  # this process started it, so ``close`` stops it
    actors: int
    num_cpus: float
    num_gpus: float
    device: str  # the device the actors' engines load on: "cuda" or "cpu"
    resources: dict[str, float] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "started_here": self.started,
            "actors": self.actors,
            "cpus_per_actor": self.num_cpus,
            "gpus_per_actor": self.num_gpus,
            "device": self.device,
            "cluster_cpus": self.resources.get("CPU", 0.0),
            "cluster_gpus": self.resources.get("GPU", 0.0),
        }


def import_ray() -> Any:
    """Ray, or a spec error saying how to install it (it is the ``ray`` extra)."""
    try:
        import ray
    except ImportError:
        raise SpecError(
            "executor.kind: 'ray' needs Ray: pip install 'batchllm[ray]' (make setup installs it)"
        ) from None
    return ray


def connect(spec: JobSpec) -> Cluster:
    """Join the job's cluster (or start a local one) and size its actors; errors name the field."""
    ray = import_ray()
    executor = spec.executor
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    address = executor.address or os.environ.get("RAY_ADDRESS") or None
    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {
            "logging_level": logging.ERROR,
            "log_to_driver": False,  # actor logs are forwarded to the flow's logger instead
            "include_dashboard": False,
        }
        _check_reachable(address)
        if address is None:  # a local cluster: as many CPUs as the actors need, else all of them
            wanted = (executor.actors or 0) * executor.cpus_per_actor
            options["num_cpus"] = max(math.ceil(wanted), 1) if wanted else os.cpu_count() or 1
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = address or "a local cluster"
            raise SpecError(f"executor.address: cannot join {where}: {exc}") from None
        started = address is None
    resources = {k: float(v) for k, v in ray.cluster_resources().items()}
    device, gpus = _actor_device(spec, resources)
    cpus = executor.cpus_per_actor
    actors = executor.actors or _default_actors(resources, cpus, gpus)
    cluster = Cluster(
        address=address or ("local" if started else "connected"),
        started=started,
        actors=actors,
        num_cpus=cpus,
        num_gpus=gpus,
        device=device,
        resources=resources,
    )
    _check_fits(cluster)
    return cluster


def _check_reachable(address: str | None, timeout_s: float = 10.0) -> None:
    """Fail fast on a ``host:port`` (or ``ray://host:port``) nobody listens on: Ray itself keeps
    retrying such an address for minutes."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise SpecError(f"executor.address: {address!r} is not host:port, ray://host:port or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise SpecError(f"executor.address: nothing answers at {address} ({exc.strerror or exc})") from None


def close(cluster: Cluster) -> None:
    """Stop the cluster if this process started it; leave a joined one running."""
    if cluster.started:
        import ray

        ray.shutdown()


def _actor_device(spec: JobSpec, resources: dict[str, float]) -> tuple[str, float]:
    """(device, GPUs per actor) from the job's device and the cluster's GPUs."""
    has_gpus = resources.get("GPU", 0.0) > 0
    device = spec.device if spec.device != "auto" else ("cuda" if has_gpus else "cpu")
    if device == "cuda" and not has_gpus:
        raise SpecError("device: 'cuda' but the Ray cluster has no GPUs (use 'auto' or 'cpu')")
    gpus = spec.executor.gpus_per_actor
    if gpus is None:
        gpus = _parallel_size(spec) if device == "cuda" else 0.0
    if device == "cuda" and gpus <= 0:
        raise SpecError("executor.gpus_per_actor: a CUDA engine needs at least part of a GPU")
    return device, float(gpus)


def _parallel_size(spec: JobSpec) -> float:
    """GPUs one engine spans: vLLM's tensor x pipeline parallel size, 1 for the native engine."""
    if spec.backend != "vllm":
        return 1.0
    options = spec.engine_options
    return float(int(options.get("tensor_parallel_size", 1)) * int(options.get("pipeline_parallel_size", 1)))


def _default_actors(resources: dict[str, float], cpus: float, gpus: float) -> int:
    """One actor per GPU slot (``gpus`` each), else per CPU slot (``cpus`` each); at least one."""
    if gpus > 0:
        return max(int(resources.get("GPU", 0.0) // gpus), 1)
    return max(int(resources.get("CPU", 0.0) // cpus), 1)


def _check_fits(cluster: Cluster) -> None:
    """One actor must fit the cluster as it is now (an autoscaler may add nodes for the others)."""
    have_cpus, have_gpus = cluster.resources.get("CPU", 0.0), cluster.resources.get("GPU", 0.0)
    if cluster.num_cpus > have_cpus:
        raise SpecError(
            f"executor.cpus_per_actor: {cluster.num_cpus:g} CPUs per actor, the cluster has {have_cpus:g}"
        )
    if cluster.num_gpus > have_gpus:
        raise SpecError(
            f"executor.gpus_per_actor: {cluster.num_gpus:g} GPUs per actor, the cluster has {have_gpus:g}"
        )
