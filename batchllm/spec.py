"""JobSpec: the one description of a batch job (source SQL, prompt, task, model, output).

Loaded from YAML (spec_yaml.py) or built in Python, and validated before any model loads:
unknown fields, template syntax errors, unsafe identifiers and inconsistent
options fail here with a message naming the field. Checks that need the
warehouse (columns of the query result) live in ``validate_columns``, called by
the pipeline right after the query's schema is known.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache, cached_property
from typing import Annotated, Any, Literal

from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batchllm.distributed.executor_spec import ExecutorSpec
from batchllm.shape import FormatSpec

IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
MEMORY = ":memory:"
PACK_TOKENS = 2048  # task.pack_tokens' default, the engine's too (engine.prefill.PACK_TOKENS)


class SpecError(ValueError):
    """A job spec that cannot run; the message names the offending field."""


def check_identifier(value: str, field: str) -> str:
    """Accept ``name`` or ``schema.name`` made of letters, digits and underscores only."""
    parts = value.split(".")
    if len(parts) > 2 or not all(IDENTIFIER.match(p) for p in parts):
        raise ValueError(
            f"{field}: {value!r} is not a safe SQL identifier "
            "(letters, digits and underscores, optionally schema.name)"
        )
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttachSpec(_Strict):
    """Another database made readable to the query as ``alias.table`` (DuckDB ATTACH, read-only)."""

    alias: str
    path: str
    type: Literal["duckdb", "sqlite", "postgres"] = "duckdb"

    @field_validator("alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not IDENTIFIER.match(v):
            raise ValueError(f"source.attach.alias: {v!r} is not a safe SQL identifier")
        return v


class SourceSpec(_Strict):
    """Where rows come from: a DuckDB database and a query over it (or over files DuckDB reads).

    The query may read Parquet/CSV/JSON files directly (``read_parquet('x.parquet')``,
    ``'x.csv'``) and tables of attached databases (``attach``).
    """

    database: str = MEMORY
    query: str
    id_column: str = "id"
    attach: list[AttachSpec] = Field(default_factory=list)

    @field_validator("query")
    @classmethod
    def _query(cls, v: str) -> str:
        v = v.strip().rstrip(";").strip()
        if not v:
            raise ValueError("source.query: empty query")
        return v

    @field_validator("id_column")
    @classmethod
    def _id(cls, v: str) -> str:
        if not IDENTIFIER.match(v):
            raise ValueError(f"source.id_column: {v!r} is not a safe column name")
        return v


class PromptSpec(_Strict):
    """Jinja2 templates over the row's columns: chat messages (system/user) or one raw prompt."""

    system: str | None = None
    user: str | None = None
    template: str | None = None
    reorderable: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shape(self) -> PromptSpec:
        if self.template is not None and (self.system is not None or self.user is not None):
            raise ValueError(
                "prompt: give either 'template' (raw prompt) or 'system'/'user' messages, not both"
            )
        if self.template is None and self.user is None:
            raise ValueError("prompt.user: a user message template is required (or a raw 'template')")
        for name, source in self.templates().items():
            check_template(f"prompt.{name}", source)
        # Column names only (never put into SQL), so any non-empty, distinct names will do.
        if any(not f for f in self.reorderable) or len(set(self.reorderable)) != len(self.reorderable):
            raise ValueError("prompt.reorderable: column names must be non-empty and distinct")
        return self

    def templates(self) -> dict[str, str]:
        """The non-empty templates by field name (system, user, template)."""
        named = {"system": self.system, "user": self.user, "template": self.template}
        return {k: v for k, v in named.items() if v is not None}

    def fields(self, name: str | None = None) -> set[str]:
        """Row columns the templates (or the one named) read; ``fields`` is provided when reorderable."""
        out: set[str] = set()
        for key, source in self.templates().items():
            if name is None or key == name:
                out |= meta.find_undeclared_variables(template_env().parse(source))
        return out - {"fields"} if self.reorderable else out


class TaskSpec(_Strict):
    """What to compute per row: free text, one of ``labels``, or a score per (query, candidate) row.

    classify: the distribution over ``labels``, each scored on its whole token sequence. score: a
    (query, candidate) row of a SQL join (``query_key``/``candidate_key``: its key columns, kept in
    the results) scored P(yes) / (P(yes) + P(no)) (``yes``/``no``, default "Yes"/"No") or, with
    ``labels``, the first one's probability. pack: candidates sharing a prefix in sequences of up to
    ``pack_tokens`` tokens (null: where the backend can). format: typed output (shape.py).
    """

    kind: Literal["generate", "classify", "score"] = "generate"
    labels: list[str] | None = None
    yes: str | None = None
    no: str | None = None
    query_key: str | None = None
    candidate_key: str | None = None
    pack: bool | None = None
    pack_tokens: int = Field(default=PACK_TOKENS, ge=16, le=1 << 20)
    format: FormatSpec | None = None

    @model_validator(mode="after")
    def _shape(self) -> TaskSpec:
        kind = self.kind
        for name in ("yes", "no", "query_key", "candidate_key"):
            if kind != "score" and getattr(self, name) is not None:
                raise ValueError(f"task.{name}: only used with kind 'score' (kind is {kind!r})")
        if kind == "generate" and self.labels is not None:
            raise ValueError("task.labels: not used with kind 'generate'")
        # pack_tokens by value: a dumped and re-parsed spec (updated()) carries the default
        if kind == "generate" and (self.pack is not None or self.pack_tokens != PACK_TOKENS):
            name = "pack" if self.pack is not None else "pack_tokens"
            raise ValueError(f"task.{name}: only used with kinds 'classify' and 'score'")
        if kind != "generate" and self.format is not None:
            raise ValueError(f"task.format: only used with kind 'generate' (kind is {kind!r})")
        if kind == "classify" and (not self.labels or len(self.labels) < 2):
            raise ValueError("task.labels: 'classify' needs at least two labels")
        if self.labels is not None:
            _check_labels(self.labels, "task.labels")
        if kind == "score":
            for name in ("query_key", "candidate_key"):
                value = getattr(self, name)
                if not value or not IDENTIFIER.match(value):
                    raise ValueError(f"task.{name}: 'score' needs the column of the join's {name[:-4]} key")
            if self.query_key == self.candidate_key:
                raise ValueError("task.candidate_key: must differ from task.query_key")
            if self.labels is not None and (self.yes is not None or self.no is not None):
                raise ValueError("task.labels: give either labels or yes/no, not both")
            if self.labels is not None and len(self.labels) < 2:
                raise ValueError("task.labels: 'score' needs at least two answer labels")
            for name in ("yes", "no"):
                if getattr(self, name) == "":
                    raise ValueError(f"task.{name}: must be a non-empty answer")
            if self.labels is None and self.answer_labels()[0] == self.answer_labels()[1]:
                raise ValueError("task.no: must differ from task.yes")
        return self

    def answer_labels(self) -> list[str]:
        """The labels the engine scores: classify's labels, or score's answers (the scored one first)."""
        if self.kind == "score" and self.labels is None:
            return [self.yes if self.yes is not None else "Yes", self.no if self.no is not None else "No"]
        return list(self.labels or [])


def _check_labels(labels: list[str], field: str) -> None:
    if any(not label for label in labels):
        raise ValueError(f"{field}: every label must be a non-empty string")
    dups = sorted({label for label in labels if labels.count(label) > 1})
    if dups:
        raise ValueError(f"{field}: labels must be distinct ({', '.join(map(repr, dups))} given twice)")


class SamplingSpec(_Strict):
    """Decoding parameters (generation); classify and score decode nothing (prefill only)."""

    max_tokens: int = Field(default=64, ge=1, le=32768)
    temperature: float = Field(default=0.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)


class OutputSpec(_Strict):
    """The results table: where, and how a run's rows combine with what is there."""

    database: str | None = None
    table: str
    mode: Literal["merge", "replace"] = "merge"
    runs_table: str = "batchllm_runs"

    @field_validator("table")
    @classmethod
    def _table(cls, v: str) -> str:
        return check_identifier(v, "output.table")

    @field_validator("runs_table")
    @classmethod
    def _runs(cls, v: str) -> str:
        return check_identifier(v, "output.runs_table")


class LimitsSpec(_Strict):
    """Guards: rows taken from the query, and prompt length (longer prompts become error rows)."""

    max_rows: int | None = Field(default=None, ge=1)
    max_prompt_tokens: int | None = Field(default=None, ge=1)


class JobSpec(_Strict):
    """A whole job. ``spec_hash`` identifies it; ``params_hash`` what decides a row's result."""

    name: str | None = None
    source: SourceSpec
    prompt: PromptSpec
    task: TaskSpec = Field(default_factory=TaskSpec)
    model: str = "default"
    device: Literal["cpu", "cuda", "auto"] = "auto"
    backend: Literal["native", "vllm"] = "native"
    # passed as is to the backend's engine (native: Engine options; vllm: LLM/EngineArgs options)
    engine_options: dict[str, Any] = Field(default_factory=dict)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    output: OutputSpec
    incremental: bool = False
    limits: LimitsSpec = Field(default_factory=LimitsSpec)
    shards: int = Field(default=1, ge=1, le=1024)
    block_size: int = Field(default=16, ge=1, le=1024)
    executor: ExecutorSpec = Field(default_factory=ExecutorSpec)

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.output.mode == "replace" and self.incremental:
            raise ValueError(
                "incremental: cannot be combined with output.mode 'replace' (replace rewrites the whole table)"
            )
        if self.output_database == MEMORY:
            raise ValueError(
                "output.database: results would vanish in ':memory:'; set output.database "
                "(or source.database) to a DuckDB file"
            )
        if self.output.table.split(".")[-1].lower() == self.output.runs_table.split(".")[-1].lower():
            raise ValueError("output.runs_table: must differ from output.table")
        return self

    def updated(self, **changes: Any) -> JobSpec:
        """A validated copy with some fields changed; nested sections merge (``limits={"max_rows": 5}``)."""
        data = self.model_dump()
        for key, value in changes.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        return parse_spec(data)

    @property
    def output_database(self) -> str:
        """The database that holds the results and runs tables (default: the source database)."""
        return self.output.database or self.source.database

    @cached_property
    def spec_hash(self) -> str:
        """What the job computes, not where or how (executor, device, engine_options, shards) nor how much
        (limits.max_rows, incremental): a rerun with the engine tuned after a crash finds the staging."""
        exclude = {"executor", "device", "engine_options", "shards", "name", "incremental"}
        dump = self.model_dump(mode="json", exclude={**dict.fromkeys(exclude, True), "limits": {"max_rows"}})
        return _hash({**dump, **self._field_order()})

    @cached_property
    def params_hash(self) -> str:
        """What, besides the prompt and model, decides a row's result: the task, and sampling for generate
        (classify and score decode nothing: a changed max_tokens must not rerun their rows)."""
        parts = {"task": self.task.model_dump(mode="json"), **self._field_order()}
        if self.task.kind == "generate":
            parts["sampling"] = self.sampling.model_dump(mode="json")
        return _hash(parts)

    def _field_order(self) -> dict[str, Any]:
        """A format's grammar, in the hashes beside the sorted dumps: a schema's property order is the
        order the model writes its fields in (reordering them changes the answers)."""
        return {} if self.task.format is None else {"format_grammar": self.task.format.grammar()[1]}


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def check_template(field: str, source: str) -> None:
    """A template every row can render: not blank, compiles, names only known filters and tests (Jinja
    defers those inside blocks to render time: every row would fail alike), reads no other file."""
    if not source.strip():
        raise ValueError(f"{field}: empty")
    env = template_env()
    try:
        tree = env.parse(source)
        env.compile(tree)
    except TemplateSyntaxError as exc:
        raise ValueError(f"{field}: template error at line {exc.lineno}: {exc.message}") from None
    if next(tree.find_all((nodes.Include, nodes.Extends, nodes.Import, nodes.FromImport)), None):
        raise ValueError(f"{field}: include, extends and import read other templates: not supported")
    for kind, known in ((nodes.Filter, env.filters), (nodes.Test, env.tests)):
        if unknown := sorted({n.name for n in tree.find_all(kind)} - set(known)):
            raise ValueError(f"{field}: no {kind.__name__.lower()} named {', '.join(unknown)}")


@cache
def template_env() -> SandboxedEnvironment:
    """The one Jinja2 environment for prompt templates (sandboxed, no autoescape)."""
    from jinja2 import StrictUndefined

    return SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)


def parse_spec(data: Any, origin: str = "job spec") -> JobSpec:
    """Validate a mapping into a JobSpec; errors become one SpecError naming each bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            # a name that would read as none or as a path (an invented field '' or '.') is quoted
            loc = ".".join(repr(p) if p == "" or "." in str(p) else str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            # Our own messages already start with the field name.
            lines.append(msg if loc == "" or msg.startswith(loc.split(".")[0]) else f"{loc}: {msg}")
        raise SpecError(f"{origin}: " + "; ".join(lines)) from None


def validate_columns(spec: JobSpec, columns: list[str]) -> None:
    """Fail with a field-naming message when the query result lacks a column the spec reads."""
    have = set(columns)
    if spec.source.id_column not in have:
        raise SpecError(
            f"source.id_column: column {spec.source.id_column!r} is not in the query result "
            f"(columns: {', '.join(columns)})"
        )
    for name in spec.prompt.templates():
        missing = sorted(spec.prompt.fields(name) - have)
        if missing:
            raise SpecError(
                f"prompt.{name}: uses {', '.join(map(repr, missing))}, not in the query result "
                f"(columns: {', '.join(columns)})"
            )
    missing = sorted(set(spec.prompt.reorderable) - have)
    if missing:
        raise SpecError(f"prompt.reorderable: {', '.join(map(repr, missing))} not in the query result")
    for name in ("query_key", "candidate_key"):
        column = getattr(spec.task, name)
        if column is not None and column not in have:
            raise SpecError(
                f"task.{name}: column {column!r} is not in the query result (columns: {', '.join(columns)})"
            )
