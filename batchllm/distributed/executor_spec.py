"""The ``executor`` section of a job spec: where the shards run (this process, or Ray actors).

A section of ``batchllm.spec.JobSpec``, kept here with the code it configures;
it imports nothing of batchllm, so the spec module can import it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ExecutorSpec(BaseModel):
    """Where the shards run: ``local`` (this process, one after another) or ``ray`` (engine actors of
    a Ray cluster, fed whole prefix groups; see docs/ray.md). The other fields are Ray's only.

    address: the cluster to join ("auto", "host:6379", "ray://host:10001"); unset: ``RAY_ADDRESS``,
    else a local cluster in this process. actors: engine actors; unset: one per GPU of the cluster
    (device cuda), else one per ``cpus_per_actor`` CPUs. gpus_per_actor: unset: 1 on CUDA (vllm:
    tensor x pipeline parallel size), 0 on CPU. max_attempts: a shard that fails this often becomes
    per-row errors. runtime_env: passed to the actors as is (env_vars, pip, working_dir ...).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["local", "ray"] = "local"
    address: str | None = None
    actors: int | None = Field(default=None, ge=1, le=4096)
    cpus_per_actor: float = Field(default=1.0, gt=0, le=1024)
    gpus_per_actor: float | None = Field(default=None, ge=0, le=64)
    max_attempts: int = Field(default=2, ge=1, le=10)
    start_timeout_s: float = Field(default=600.0, gt=0)
    runtime_env: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _ray_only(self) -> ExecutorSpec:
        if self.kind == "local":  # a value other than the default (a dumped spec repeats the defaults)
            for name, info in type(self).model_fields.items():
                if name != "kind" and getattr(self, name) != info.default:
                    raise ValueError(f"executor.{name}: only used with kind 'ray' (kind is 'local')")
        if self.address is not None and not self.address.strip():
            raise ValueError(
                "executor.address: empty address (leave it out for RAY_ADDRESS or a local cluster)"
            )
        return self
