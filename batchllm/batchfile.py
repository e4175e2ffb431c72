"""OpenAI-style batch files: `batchllm batch IN.jsonl -o OUT.jsonl`.

Each input line is one chat-completions request (``custom_id``, ``body.messages``,
``body.max_tokens``/``temperature``/``top_p``/``seed``/``stop``); each output line
answers one ``custom_id`` with ``response`` (status 200, a chat.completion body)
or ``error``. The requests run through the job's own steps: messages go through
the model's chat template and are hashed, deduplicated and length-checked as table
rows are (render.py), requests with equal sampling parameters are planned together
by shared prefix (``job.plan_prompts``) on one loaded model.

Reruns are idempotent by custom_id: lines already answered ok are kept and their
requests not run again; everything else (errors, a torn last line) is dropped and
redone, so a custom_id appears at most once. The plan runs in chunks of about
``shard_size`` prompts in plan order (a larger prefix group is split); each
chunk's lines are appended and flushed as soon as it finishes, so a crash loses
at most the chunk that was running, never a finished line.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from batchllm import job, render
from batchllm.backends.base import Backend, GroupSpec, Outcome, create_backend
from batchllm.spec import SamplingSpec, TaskSpec

URL = "/v1/chat/completions"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_TEMPERATURE = 1.0  # the OpenAI API's default when a body gives none
# (max_tokens, temperature, top_p, seed, stop): requests with equal keys share one engine call
ParamsKey = tuple[int, float, float, int | None, tuple[str, ...]]


class BatchFileError(ValueError):
    """An input or output file that cannot be used at all (not a bad line: those get error lines)."""


@dataclass(frozen=True)
class Request:
    custom_id: str
    messages: list[dict[str, str]]
    params: ParamsKey


@dataclass
class Parsed:
    """The runnable requests of an input file, and one error line per bad input line."""

    requests: list[Request] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def error_line(custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def parse_requests(path: Path, default_max_tokens: int) -> Parsed:
    """Read the input file; a bad line (not JSON, no custom_id, a duplicate, no messages) becomes an
    error line naming its line number, and the other lines still run."""
    parsed = Parsed()
    first_line: dict[str, int] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise BatchFileError(f"batch: cannot read {str(path)!r}: {exc}") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            parsed.errors.append(error_line(None, "invalid_json", f"line {lineno}: not JSON ({exc.msg})"))
            continue
        cid = obj.get("custom_id") if isinstance(obj, dict) else None
        if not isinstance(cid, str) or not cid:
            parsed.errors.append(
                error_line(None, "missing_custom_id", f"line {lineno}: no custom_id (a non-empty string)")
            )
            continue
        if cid in first_line:
            message = f"line {lineno}: duplicate custom_id {cid!r} (first on line {first_line[cid]})"
            parsed.errors.append(error_line(None, "duplicate_custom_id", message))
            continue
        first_line[cid] = lineno
        try:
            parsed.requests.append(_request(obj, cid, default_max_tokens))
        except ValueError as exc:
            parsed.errors.append(error_line(cid, "invalid_request", f"line {lineno}: {exc}"))
    return parsed


def _request(obj: dict[str, Any], cid: str, default_max_tokens: int) -> Request:
    if obj.get("method", "POST") != "POST" or obj.get("url", URL) != URL:
        raise ValueError(f"only POST {URL} is supported")
    body = obj.get("body")
    if not isinstance(body, dict):
        raise ValueError("no body object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise ValueError("body.messages is missing or empty")
    messages = [_message(i, m) for i, m in enumerate(raw)]
    if body.get("n", 1) != 1:
        raise ValueError("body.n: only one choice per request is supported")
    stop = body.get("stop") or []
    try:
        sampling = SamplingSpec(
            max_tokens=_given(body, "max_completion_tokens", "max_tokens", default=default_max_tokens),
            temperature=_given(body, "temperature", default=DEFAULT_TEMPERATURE),
            top_p=_given(body, "top_p", default=1.0),
            seed=body.get("seed"),
            stop=[stop] if isinstance(stop, str) else stop,
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ValueError(f"body.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    key = (sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.seed, tuple(sampling.stop))
    return Request(cid, messages, key)


def _given(body: dict[str, Any], *names: str, default: Any) -> Any:
    """The first of ``names`` the body sets to a value; null means the default, as in OpenAI's API."""
    return next((body[n] for n in names if body.get(n) is not None), default)


def _message(i: int, m: Any) -> dict[str, str]:
    if not isinstance(m, dict) or m.get("role") not in ROLES:
        raise ValueError(f"body.messages[{i}]: needs a role among {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            raise ValueError(f"body.messages[{i}].content: only text parts are supported")
        content = "".join(str(p.get("text", "")) for p in content)
    if not isinstance(content, str):
        raise ValueError(f"body.messages[{i}].content: must be a string")
    return {"role": ROLES[m["role"]], "content": content}


def read_answered(path: Path) -> dict[str, str]:
    """Lines of an earlier output already answered ok, by custom_id (anything else is redone)."""
    answered: dict[str, str] = {}
    if not path.is_file():
        return answered
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line of a crashed run
        ok = isinstance(obj, dict) and obj.get("error") is None and obj.get("response") is not None
        if ok and isinstance(obj.get("custom_id"), str):
            answered.setdefault(obj["custom_id"], line)
    return answered


def _rewrite(path: Path, lines: list[str]) -> None:
    """Replace ``path`` by ``lines`` atomically (temporary file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it (mkstemp makes it 0600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _response_line(cid: str, model: str, outcome: Outcome) -> dict[str, Any]:
    if outcome.error is not None:
        return error_line(cid, "engine_error", outcome.error)
    body = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": outcome.output or ""},
                "finish_reason": outcome.finish_reason or "stop",
            }
        ],
        "usage": {
            "prompt_tokens": outcome.prompt_tokens,
            "completion_tokens": outcome.output_tokens,
            "total_tokens": outcome.prompt_tokens + outcome.output_tokens,
        },
    }
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": cid,
        "response": {"status_code": 200, "request_id": body["id"], "body": body},
        "error": None,
    }


def run_batch(
    input_path: str | Path,
    output_path: str | Path,
    model: str = "default",
    device: str = "auto",
    default_max_tokens: int = 256,
    block_size: int = 16,
    engine_options: dict[str, Any] | None = None,
    backend: Callable[..., Backend] = create_backend,
    shard_size: int = 512,
) -> dict[str, int]:
    """Answer every request of ``input_path`` not yet answered ok in ``output_path``.

    The model is loaded only when something is left to run. Returns counts:
    requests, skipped (answered before), ran, ok, errors (error lines written).
    """
    input_path, output_path = Path(input_path), Path(output_path)
    if output_path.is_dir():
        raise BatchFileError(f"batch: the output {str(output_path)!r} is a folder")
    if output_path.exists() and output_path.samefile(input_path):
        raise BatchFileError("batch: the output must not be the input file")
    parsed = parse_requests(input_path, default_max_tokens)
    answered = read_answered(output_path)
    # a request answered ok before keeps that answer, even if its line is now invalid: one line per id
    parsed.errors = [e for e in parsed.errors if e["custom_id"] not in answered]
    todo = [r for r in parsed.requests if r.custom_id not in answered]
    _rewrite(output_path, list(answered.values()))
    counts = {"requests": len(parsed.requests), "skipped": len(parsed.requests) - len(todo)}
    counts |= {"ran": 0, "ok": 0, "errors": 0}
    with output_path.open("a", encoding="utf-8") as out:

        def write(lines: list[dict[str, Any]]) -> None:
            out.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
            out.flush()
            os.fsync(out.fileno())
            counts["errors"] += sum(line["error"] is not None for line in lines)
            counts["ok"] += sum(line["error"] is None for line in lines)

        write(parsed.errors)
        if todo:
            options = engine_options or {}
            _run(todo, model, device, (block_size, shard_size), options, backend, write, counts)
    return counts


def _run(
    todo: list[Request],
    model: str,
    device: str,
    sizes: tuple[int, int],
    engine_options: dict[str, Any],
    backend: Callable[..., Backend],
    write: Callable[[list[dict[str, Any]]], None],
    counts: dict[str, int],
) -> None:
    """Render every request, then run each group of equal sampling parameters on one loaded model."""
    from batchllm.engine.tokenizer import Tokenizer
    from batchllm.models import resolve_model

    folder = resolve_model(model)
    tokenizer = Tokenizer(folder)
    config = job.model_config(folder)
    limit = config.max_context - 1 if config else None
    by_params: dict[ParamsKey, list[Request]] = {}
    for r in todo:
        by_params.setdefault(r.params, []).append(r)
    loaded: Backend | None = None
    try:
        for key, requests in by_params.items():
            prompts = render.tokenize(_rows(requests, tokenizer), tokenizer, limit)
            errors = prompts.rows.column("error").to_pylist()
            write(
                [
                    error_line(r.custom_id, "invalid_prompt", e)
                    for r, e in zip(requests, errors, strict=True)
                    if e
                ]
            )
            if not prompts.token_ids:
                continue
            block_size = engine_options.get("block_size", sizes[0])  # the plan's blocks are the engine's
            loaded = loaded or backend(
                "native", model, device, **{**engine_options, "block_size": block_size}
            )
            info = job.plan_prompts(prompts.token_ids, key[0], block_size)
            order, planned = info.shards[0], info.groups(0) or [(0, list(range(len(info.shards[0]))))]
            sampling = SamplingSpec(
                max_tokens=key[0], temperature=key[1], top_p=key[2], seed=key[3], stop=list(key[4])
            )
            for chunk in _chunks(planned, sizes[1]):
                positions = [p for _, members in chunk for p in members]
                local = {p: k for k, p in enumerate(positions)}
                groups = [(prefix, [local[p] for p in members]) for prefix, members in chunk]
                token_ids = [prompts.token_ids[order[p]] for p in positions]
                outcomes = loaded.run(token_ids, TaskSpec(kind="generate"), sampling, groups=groups)
                by_prompt = {order[p]: o for p, o in zip(positions, outcomes, strict=True)}
                lines = [
                    _response_line(r.custom_id, model, by_prompt[int(j)])
                    for r, j in zip(requests, prompts.row_prompt, strict=True)
                    if int(j) in by_prompt
                ]
                counts["ran"] += len(lines)
                write(lines)
    finally:
        if loaded is not None:
            loaded.close()


def _chunks(groups: list[GroupSpec], size: int) -> list[list[GroupSpec]]:
    """The plan's groups (execution order) in runs of about ``size`` prompts, each written when done;
    a larger group is split, each part computing its shared prefix once more."""
    size = max(size, 1)
    out: list[list[GroupSpec]] = []
    current: list[GroupSpec] = []
    count = 0
    for prefix_len, members in groups:
        for start in range(0, len(members), size):
            part = list(members[start : start + size])
            if count and count + len(part) > size:
                out.append(current)
                current, count = [], 0
            current.append((prefix_len, part))
            count += len(part)
    if current:
        out.append(current)
    return out


def _rows(requests: list[Request], tokenizer: Any) -> pa.Table:
    """Requests as render's rows (id, prompt_hash, prompt, error): the chat template applied, the
    model's control tokens refused in message text as they are in table fields."""
    control = render._chat_control(tokenizer)
    hashes: list[str | None] = []
    texts: list[str | None] = []
    errors: list[str | None] = []
    for r in requests:
        try:
            render._check_control(
                {f"messages[{i}].content": m["content"] for i, m in enumerate(r.messages)}, control
            )
            text = tokenizer.apply_chat_template(r.messages)
        except Exception as exc:  # this request only
            hashes.append(None)
            texts.append(None)
            errors.append(str(exc) if isinstance(exc, render.RowError) else f"chat template: {exc}")
            continue
        # identical prompts are computed once only where the answer is deterministic: requests repeated
        # to draw several samples (temperature > 0, no seed) each get their own, as OpenAI's batches do
        sampled = r.params[1] > 0 and r.params[3] is None
        hashes.append(render.prompt_hash(text + ("\0" + r.custom_id if sampled else "")))
        texts.append(text)
        errors.append(None)
    return pa.table(
        {
            "id": pa.array([r.custom_id for r in requests], pa.string()),
            "prompt_hash": pa.array(hashes, pa.string()),
            "prompt": pa.array(texts, pa.large_string()),
            "error": pa.array(errors, pa.string()),
        }
    )
