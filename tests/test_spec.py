"""JobSpec validation: every bad spec fails before any model work, with a message naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from batchllm.spec import JobSpec, SpecError, parse_spec, validate_columns
from batchllm.spec_yaml import load_spec
from tests.product_fixtures import spec_dict

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["labeling.yaml", "summarizing.yaml"])
def test_examples_load(name: str) -> None:
    spec = load_spec(EXAMPLES / name)
    assert isinstance(spec, JobSpec)
    # Relative database paths resolve against the YAML file's folder.
    assert Path(spec.source.database).is_absolute()
    assert Path(spec.source.database).parent == (EXAMPLES.parent / "demo").resolve()


def test_defaults(tmp_path: Path) -> None:
    spec = parse_spec(spec_dict(tmp_path / "w.duckdb"))
    assert spec.output.mode == "merge"
    assert spec.incremental is False
    assert spec.output_database == str(tmp_path / "w.duckdb")
    assert spec.prompt.fields() == {"plot", "review"}


def _error(data: dict) -> str:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return str(exc.value)


def test_unknown_fields_are_named(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb")
    d["sampling"] = {"max_tokenz": 5}
    assert "sampling.max_tokenz: unknown field" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", colour="blue")
    assert "colour: unknown field" in _error(d)


def test_template_syntax_error_names_the_template(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb")
    d["prompt"] = {"user": "Review: {{ review "}
    msg = _error(d)
    assert msg.count("prompt.user: template error") == 1


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ({"user": "{{ review | nosuchfilter }}"}, "prompt.user: template error at line 1: No filter named"),
        (
            {"user": "{% if id %}{{ review | nosuchfilter }}{% endif %}"},
            "prompt.user: no filter named nosuchfilter",
        ),
        ({"user": "{% if review is nosuchtest %}x{% endif %}"}, "prompt.user: no test named nosuchtest"),
        ({"user": "{% include 'x.txt' %}"}, "prompt.user: include, extends and import"),
        ({"template": "{% extends 'x.txt' %}"}, "prompt.template: include, extends and import"),
        ({"user": "{% from 'x' import y %}{{ review }}"}, "prompt.user: include, extends and import"),
        ({"template": ""}, "prompt.template: empty"),
        ({"user": "  \n", "system": "s"}, "prompt.user: empty"),
    ],
)
def test_templates_that_no_row_could_render_are_spec_errors(
    tmp_path: Path, prompt: dict[str, str], message: str
) -> None:
    """Every row would fail alike (Jinja defers unknown filters and tests inside blocks to render
    time; include and the like have no loader): the spec is refused, naming the template."""
    d = spec_dict(tmp_path / "w.duckdb")
    d["prompt"] = prompt
    assert message in _error(d)


def test_empty_stop_strings_are_refused(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb", sampling={"stop": ["\n\n", ""]})
    assert "sampling.stop.1: String should have at least 1 character" in _error(d)


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("output", "table"), 'labels"; DROP TABLE reviews; --', "output.table"),
        (("output", "table"), "a.b.c", "output.table"),
        (("output", "runs_table"), "runs tbl", "output.runs_table"),
        (("source", "id_column"), "id)--", "source.id_column"),
    ],
)
def test_unsafe_identifiers(tmp_path: Path, path: tuple[str, str], value: str, field: str) -> None:
    d = spec_dict(tmp_path / "w.duckdb")
    d[path[0]] = {**d[path[0]], path[1]: value}
    msg = _error(d)
    assert field in msg
    assert "safe" in msg


def test_schema_qualified_table_is_allowed(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb")
    d["output"] = {"table": "enrich.labels"}
    assert parse_spec(d).output.table == "enrich.labels"


def test_task_shapes(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb", task={"kind": "classify"})
    assert "task.labels" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", task={"kind": "classify", "labels": ["a", "a"]})
    assert "task.labels" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", task={"kind": "generate", "labels": ["a", "b"]})
    assert "task.labels" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", task={"kind": "score"})
    assert "task.query_key" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", task={"kind": "score", "query_key": "plot", "candidate_key": "id"})
    assert parse_spec(d).task.answer_labels() == ["Yes", "No"]
    d = spec_dict(tmp_path / "w.duckdb", task={"kind": "rank"})
    assert "task.kind" in _error(d)


def test_inconsistent_options(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb", incremental=True)
    d["output"] = {"table": "labels", "mode": "replace"}
    assert _error(d).count("incremental") >= 1
    d = spec_dict(":memory:")
    assert "output.database" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", device="tpu")
    assert "device" in _error(d)
    d = spec_dict(tmp_path / "w.duckdb", sampling={"max_tokens": 0})
    assert "sampling.max_tokens" in _error(d)


def test_prompt_needs_user_or_template(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb")
    d["prompt"] = {"system": "hi"}
    assert "prompt.user" in _error(d)
    d["prompt"] = {"template": "{{ review }}", "user": "x"}
    assert "prompt" in _error(d)


def test_missing_columns_name_the_template(tmp_path: Path) -> None:
    spec = parse_spec(spec_dict(tmp_path / "w.duckdb"))
    validate_columns(spec, ["id", "plot", "review"])
    with pytest.raises(SpecError, match=r"prompt.system: uses 'plot'"):
        validate_columns(spec, ["id", "review"])
    with pytest.raises(SpecError, match=r"source.id_column: column 'id'"):
        validate_columns(spec, ["plot", "review"])


def test_hashes(tmp_path: Path) -> None:
    a = parse_spec(spec_dict(tmp_path / "w.duckdb"))
    b = parse_spec(spec_dict(tmp_path / "w.duckdb", output={"table": "other"}))
    c = parse_spec(spec_dict(tmp_path / "w.duckdb", sampling={"max_tokens": 9}))
    assert a.spec_hash == parse_spec(spec_dict(tmp_path / "w.duckdb")).spec_hash
    assert a.spec_hash != b.spec_hash
    assert a.params_hash == b.params_hash  # where results go does not change them
    # classify decodes nothing: sampling does not change its results (nor rerun its rows)
    assert a.params_hash == c.params_hash and a.spec_hash != c.spec_hash
    gen = {"kind": "generate"}
    d, e = (
        parse_spec(spec_dict(tmp_path / "w.duckdb", task=gen, sampling={"max_tokens": m})) for m in (8, 9)
    )
    assert d.params_hash != e.params_hash and d.params_hash != a.params_hash


def test_a_key_given_twice_is_an_error(tmp_path: Path) -> None:
    """PyYAML keeps the last of two equal keys: one of two task blocks would vanish silently."""
    path = tmp_path / "twice.yaml"
    base = yaml.safe_dump(spec_dict("w.duckdb"))
    path.write_text(base + "task:\n  kind: generate\n")
    with pytest.raises(
        SpecError, match=r"(?s)not valid YAML \(key 'task' given twice in one mapping.*line 22"
    ):
        load_spec(path)
    path.write_text(base.replace("task:\n", "task:\n  labels: [a, b]\n", 1))
    with pytest.raises(SpecError, match="key 'labels' given twice"):
        load_spec(path)


def test_load_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("source: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(listy)
    typo = tmp_path / "typo.yaml"
    d = spec_dict("w.duckdb")
    d["output"] = {"tabel": "x"}
    typo.write_text(yaml.safe_dump(d))
    with pytest.raises(SpecError) as exc:
        load_spec(typo)
    msg = str(exc.value)
    assert "output.tabel: unknown field" in msg
    assert "output.table: Field required" in msg
    assert str(typo) in msg


def test_reorderable_fields(tmp_path: Path) -> None:
    d = spec_dict(tmp_path / "w.duckdb")
    d["prompt"] = {
        "template": "{% for n, v in fields %}{{ n }}: {{ v }}\n{% endfor %}{{ review }}",
        "reorderable": ["plot"],
    }
    spec = parse_spec(d)
    assert spec.prompt.fields() == {"review"}
    validate_columns(spec, ["id", "plot", "review"])
    with pytest.raises(SpecError, match=r"prompt\.reorderable: 'plot' not in the query result"):
        validate_columns(spec, ["id", "review"])
    d["prompt"] = {"template": "{{ review }}", "reorderable": ["plot", "plot"]}
    assert "prompt.reorderable" in _error(d)


def test_updated_revalidates_and_rehashes(tmp_path: Path) -> None:
    spec = parse_spec(spec_dict(tmp_path / "w.duckdb"))
    before = (spec.spec_hash, spec.params_hash)
    changed = spec.updated(sampling={"max_tokens": 3}, limits={"max_rows": 7})
    assert changed.sampling.max_tokens == 3 and changed.limits.max_rows == 7
    assert changed.sampling.temperature == spec.sampling.temperature
    assert changed.spec_hash != before[0] and changed.params_hash == before[1]  # classify: no sampling
    assert spec.updated(task={"labels": ["x", "y"]}).params_hash != before[1]
    assert (spec.spec_hash, spec.params_hash) == before
    with pytest.raises(SpecError, match=r"sampling\.max_tokens"):
        spec.updated(sampling={"max_tokens": -1})
