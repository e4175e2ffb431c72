"""Spec fuzzing: random and mutated YAML specs never reach the model and never crash.

Hypothesis mutates a valid job spec (drops, retypes, misspells and adds
fields, at any depth) and also feeds raw YAML text. Every spec either passes
everything checked before a model loads (``job.validate`` and the dry run
``job.dry_run``, which runs extract, render, tokenize and plan) or fails with a
SpecError/WarehouseError whose message names a field; nothing else escapes.
``batchllm plan`` (the same checks) exits 0, or 2 with an error naming the
field, never a traceback. Model loading is replaced by a tripwire throughout.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from batchllm import job
from batchllm.cli import app
from batchllm.connection import WarehouseError
from batchllm.spec import SpecError
from batchllm.spec_yaml import load_spec
from tests.product_fixtures import make_reviews_db, spec_dict

FIELDS = [
    "name",
    "source",
    "prompt",
    "task",
    "model",
    "device",
    "backend",
    "sampling",
    "output",
    "incremental",
    "limits",
    "shards",
    "block_size",
]
NAMES_A_FIELD = re.compile(r"(?:^|[\s:;(])(" + "|".join(FIELDS) + r")(?:\.[A-Za-z_0-9]+)*[:\s]")
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["", " ", "{{", "{{ nosuch }}", "x; DROP TABLE reviews", "../../etc/passwd", "cuda", "score"]
    ),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
)
settings.register_profile("faults", max_examples=300, deadline=None)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("specfuzz")
    make_reviews_db(folder / "w.duckdb", 4)
    spec = spec_dict("w.duckdb", limits={"max_rows": 4}, incremental=False, shards=1)
    return folder, spec


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    def tripwire(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(job, "create_backend", tripwire)
    monkeypatch.setattr(job, "infer_shard", tripwire)


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(data: Any, spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """One random mutation of a copy of ``spec``; returns it and the top-level field it touched."""
    spec = yaml.safe_load(yaml.safe_dump(spec))  # deep copy
    path = data.draw(st.sampled_from(_paths(spec)))
    *parent_path, last = path
    parent = spec
    for key in parent_path:
        parent = parent[key]
    action = data.draw(st.sampled_from(["drop", "retype", "misspell", "add", "set"]))
    if action == "drop":
        del parent[last]
    elif action == "retype":
        parent[last] = data.draw(VALUES)
    elif action == "misspell" and isinstance(last, str):
        parent[data.draw(st.sampled_from([last + "s", last[:-1] or "x", last.upper(), "_" + last]))] = (
            parent.pop(last)
        )
    elif action == "add":
        target = parent[last] if isinstance(parent[last], dict | list) else parent
        if isinstance(target, list):
            target.append(data.draw(SCALARS))
        else:
            target[data.draw(st.text(min_size=1, max_size=10))] = data.draw(SCALARS)
    else:
        parent[last] = data.draw(_plausible(path))
    return spec, str(path[0])


def _plausible(path: tuple) -> st.SearchStrategy[Any]:
    """Values of the right kind but maybe wrong: the mutations a person makes."""
    name = str(path[-1])
    if name in ("max_tokens", "max_rows", "max_prompt_tokens", "shards", "block_size", "seed"):
        return st.integers(min_value=-5, max_value=1 << 40)
    if name in ("temperature", "top_p"):
        return st.floats(min_value=-1, max_value=20)
    if name in ("query", "user", "system", "template"):
        return st.sampled_from(
            [
                "SELECT 1",
                "SELECT id FROM reviews",
                "SELECT * FROM nosuch",
                "{{ review",
                "{% if %}",
                "{{ id }}",
            ]
        )
    if name in ("table", "runs_table", "id_column", "database"):
        return st.sampled_from(
            ["labels", "batchllm_runs", "a.b.c", "1x", "x-y", ":memory:", "", "w.duckdb", "no.duckdb"]
        )
    if name in ("kind", "mode", "device", "model", "backend"):
        return st.sampled_from(
            ["generate", "classify", "score", "merge", "replace", "cpu", "cuda", "default", "x"]
        )
    return VALUES


def _check(path: Path) -> None:
    """Everything a run does before loading a model."""
    spec = load_spec(path)
    job.validate(spec)
    job.dry_run(spec)


def _assert_names_a_field(exc: Exception, path: Path) -> str:
    """The message (after the file's name) starts with the field it is about; returns that field."""
    message = str(exc).replace(str(path), "<spec>").removeprefix("<spec>: ")
    if message.startswith(("expected a mapping of fields", "not valid YAML")):
        return "<file>"
    if re.match(r"^.+?: unknown field", message, re.S):  # a misspelled or invented field, by its name
        return "<unknown field>"
    found = NAMES_A_FIELD.match(" " + message)
    assert found, message
    return found.group(0).strip(" :;(")


@settings(settings.get_profile("faults"), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_specs_fail_naming_a_field_or_pass_every_check(base, data) -> None:
    folder, spec = base
    mutated, _ = _mutate(data, spec)
    path = folder / "fuzz.yaml"
    path.write_text(yaml.safe_dump(mutated, allow_unicode=True))
    try:
        _check(path)
        event("passes every check")
    except (SpecError, WarehouseError) as exc:
        event(f"{type(exc).__name__} naming {_assert_names_a_field(exc, path).split('.')[0]}")


@settings(settings.get_profile("faults"), suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=200), st.builds(yaml.safe_dump, VALUES)))
def test_any_yaml_text_is_a_spec_error(base, text: str) -> None:
    folder, _ = base
    path = folder / "raw.yaml"
    path.write_text(text)
    with pytest.raises(SpecError) as caught:
        _check(path)
    assert str(caught.value).startswith(str(path)), caught.value


def test_yaml_bombs_and_tags_are_spec_errors(base) -> None:
    folder, spec = base
    laughs = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join(['*' + chr(97 + k)] * 9)}]\n" for k in range(8)
    )
    cases = {
        "bomb.yaml": laughs + "source: *i\n",
        "tag.yaml": "!!python/object/apply:os.system ['true']\n",
        "deep.yaml": "x: " + "[" * 5000 + "]" * 5000 + "\n",
        "nan.yaml": yaml.safe_dump({**spec, "sampling": {"temperature": math.nan}}),
        "dup.yaml": yaml.safe_dump(spec) + "model: other\n",
    }
    for name, text in cases.items():
        path = folder / name
        path.write_text(text)
        with pytest.raises(SpecError) as caught:
            _check(path)
        _assert_names_a_field(caught.value, path)
        assert len(str(caught.value)) < 2000, (name, len(str(caught.value)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_command_line_never_shows_a_traceback(base, data) -> None:
    folder, spec = base
    mutated, _ = _mutate(data, spec)
    path = folder / "cli.yaml"
    path.write_text(yaml.safe_dump(mutated, allow_unicode=True))
    result = CliRunner().invoke(app, ["plan", str(path), "--json"])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    if result.exit_code == 2:
        assert result.output.startswith("error: "), result.output


def test_a_device_this_machine_lacks_is_a_spec_error(base) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is visible here")
    folder, spec = base
    path = folder / "cuda.yaml"
    path.write_text(yaml.safe_dump({**spec, "device": "cuda"}))
    with pytest.raises(SpecError, match=r"^device: 'cuda' but no CUDA device is visible"):
        _check(path)
