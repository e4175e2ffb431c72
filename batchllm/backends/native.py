"""The native engine as a Backend: token-id prompts in, Outcomes out.

The job plans once (``batchllm.plan``); ``run`` takes the shard's groups
(``groups``, from ``batchllm.engine.requests.groups_from_plan``) and the engine
runs them as given. Without groups the engine plans the shard itself.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from batchllm.backends.base import Outcome, Progress
from batchllm.spec import SamplingSpec, TaskSpec

KINDS = ("generate", "classify", "score")
GroupSpec = tuple[int, Sequence[int]]  # (prefix_len, positions in the shard's prompts)


class NativeBackend:
    """batchllm's embedded engine on CPU or CUDA."""

    def __init__(self, model: str, device: str, **engine_options: Any) -> None:
        from batchllm.engine import Engine

        self._engine = Engine(model, device=device, **engine_options)
        self._stats: dict[str, Any] = {}

    @staticmethod
    def supports(kind: str) -> str | None:
        if kind not in KINDS:
            return f"task.kind: {kind!r} is not supported by the native engine yet"
        return None

    @staticmethod
    def check_options(options: Mapping[str, Any], device: str = "cpu") -> str | None:
        """The job's engine options as the Engine will take them on ``device`` (the job's, resolved):
        an unknown name, or a value ``check_options`` refuses, names the option (the device and the
        model are the job's own fields)."""
        from batchllm.engine import Engine
        from batchllm.engine.attention import backend_problem
        from batchllm.engine.options import check_options

        params = inspect.signature(Engine.__init__).parameters
        names = [n for n in params if n not in ("self", "model", "device")]
        for key in options:
            if key in ("model", "device"):
                return f"engine_options.{key}: is the job's own {key!r} field, not an engine option"
            if key not in names:
                near = difflib.get_close_matches(key, names, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else f"; it has {', '.join(names)}"
                return f"engine_options.{key}: the native engine has no such option{hint}"
        try:  # the device is checked with the job's own field
            check_options(device="cpu", **({n: params[n].default for n in names} | dict(options)))
        except ValueError as exc:
            return f"engine_options.{exc}"
        reason = backend_problem(options.get("attention", "auto"), device.split(":")[0])
        return None if reason is None else f"engine_options.{reason}"

    def run(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None = None,
        groups: Iterable[GroupSpec] | None = None,
    ) -> list[Outcome]:
        """Outcomes in input order. groups: the plan's groups for this shard, run as given."""
        if not prompts:
            return []
        if reason := self.supports(task.kind):
            raise ValueError(reason)
        from batchllm.timeline import Timeline

        timeline = Timeline(self._engine.num_kv_blocks)
        with timeline.watch(self._engine.runner, progress) as counted:
            if task.kind == "generate":
                out = self._generate(prompts, task, sampling, counted, groups)
            else:
                out = self._classify(prompts, task, counted, groups)
        self._stats = self._engine.stats.as_dict()
        self._stats["timeline"] = timeline.as_dict()  # the run report's chart
        return out

    def _generate(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None,
        groups: Iterable[GroupSpec] | None,
    ) -> list[Outcome]:
        """generate; with ``task.format``, decoding under the format's grammar (typed output)."""
        from batchllm.constrained import constraint_of
        from batchllm.engine import SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=tuple(sampling.stop),
        )
        constraint = constraint_of(task.format) if task.format is not None else None
        results = self._engine.generate(
            list(prompts), params, progress=progress, groups=groups, constraint=constraint
        )
        return [
            Outcome(
                prompt_tokens=r.prompt_tokens,
                output=None if r.error else r.text,
                output_tokens=len(r.token_ids),
                cached_tokens=r.cached_tokens,
                finish_reason=r.finish_reason,
                error=r.error,
            )
            for r in results
        ]

    def _classify(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        progress: Progress | None,
        groups: Iterable[GroupSpec] | None,
    ) -> list[Outcome]:
        """classify: the most likely label and its probability; score: the first answer's probability."""
        labels = task.answer_labels()
        results = self._engine.classify(
            list(prompts),
            labels,
            pack=task.pack,
            pack_tokens=task.pack_tokens,
            progress=progress,
            groups=groups,
        )
        scored = labels[0] if task.kind == "score" else None
        return [
            Outcome(
                prompt_tokens=r.prompt_tokens,
                label=None if r.error else r.label,
                score=None if r.error or r.label is None else float(r.probs[scored or r.label]),
                label_probs=None if r.error else {k: float(v) for k, v in r.probs.items()},
                cached_tokens=r.cached_tokens,
                finish_reason="error" if r.error else "stop",
                error=r.error,
            )
            for r in results
        ]

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def close(self) -> None:
        self._engine = None  # type: ignore[assignment]
