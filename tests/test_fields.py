"""Per-row field reordering (batchllm.plan.fields, DESIGN 4.4): GGR and the level-synchronous greedy."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm import render
from batchllm.plan.fields import METHODS, FieldTable, encode, prefix_hits, reorder
from batchllm.spec import parse_spec
from tests.product_fixtures import spec_dict

PLANNERS = [m for m in METHODS if m != "none"]

# Small tables: up to 5 columns, values drawn from a small alphabet so rows share some.
tables = st.integers(min_value=1, max_value=5).flatmap(
    lambda m: st.lists(
        st.tuples(*[st.sampled_from(["", "a", "bb", "ccc", "dddddd", None]) for _ in range(m)]),
        min_size=0,
        max_size=40,
    ).map(lambda rows, m=m: {f"c{j}": [r[j] for r in rows] for j in range(m)})
)


def _brute_hits(table: FieldTable, order: np.ndarray) -> int:
    """Trie saving by definition: each row's longest whole-field prefix shared with an earlier row."""
    seqs = [tuple(table.codes[i, order[i]]) for i in range(table.shape[0])]
    total = 0
    for i, s in enumerate(seqs):
        best = 0
        for t in seqs[:i]:
            k = 0
            while k < len(s) and s[k] == t[k]:
                k += 1
            best = max(best, int(table.lengths[list(s[:k])].sum()))
        total += best
    return total


@pytest.mark.parametrize("method", PLANNERS)
def test_hand_checked_example(method: str) -> None:
    # "city" values are long and shared by rows 0-2; "name" is unique; "tag" x is shared by rows 0,1,3.
    cols = {
        "name": ["ann", "bob", "cyd", "dee"],
        "tag": ["x", "x", "y", "x"],
        "city": ["amsterdam", "amsterdam", "amsterdam", "berlin"],
    }
    ft = encode(cols)
    planned = reorder(ft, method)
    names = planned.names(ft.names)
    # city first where it is shared, then tag for the rows that also share x, name (unique) last.
    assert names[:2] == [["city", "tag", "name"]] * 2
    assert names[2][0] == "city"  # then nothing shared: any order of tag, name
    # Declared order shares nothing (names are unique); reordered: rows 1 and 2 reuse
    # "city"+"amsterdam" (4+9), row 1 also "tag"+"x" (3+1).
    assert reorder(ft, "none").hits == 0
    assert planned.hits == 13 * 2 + 4 == _brute_hits(ft, planned.order)
    rows = planned.rows.tolist()
    assert abs(rows.index(0) - rows.index(1)) == 1  # the rows sharing the longest prefix run together


@settings(max_examples=60, deadline=None)
@given(tables, st.sampled_from(PLANNERS))
def test_orders_are_permutations_and_never_worse(cols: dict[str, list], method: str) -> None:
    if not cols or not next(iter(cols.values())):
        return
    ft = encode(cols)
    n, m = ft.shape
    planned = reorder(ft, method)
    assert (np.sort(planned.order, axis=1) == np.arange(m)).all()  # every row keeps its set of fields
    assert sorted(planned.rows.tolist()) == list(range(n))
    assert planned.hits == prefix_hits(ft, planned.order) == _brute_hits(ft, planned.order)
    assert planned.hits >= reorder(ft, "none").hits
    again = reorder(encode(cols), method)  # deterministic
    assert (again.order == planned.order).all() and (again.rows == planned.rows).all()


def _clustered(rng: np.random.Generator, n: int, m: int) -> dict[str, list[str]]:
    """Columns with skewed value counts and lengths, shuffled declared order: reordering pays."""
    out = {}
    for j in range(m):
        distinct = int(rng.integers(2, max(3, n // (1 + j * 3))))
        values = [f"{j}-{k}-" + "v" * int(rng.integers(1, 40)) for k in range(distinct)]
        out[f"c{j}"] = [values[int(k)] for k in rng.zipf(1.6, n) % distinct]
    return out


@pytest.mark.parametrize("seed", range(5))
def test_ggr_beats_declared_on_constructed_tables(seed: int) -> None:
    ft = encode(_clustered(np.random.default_rng(seed), 300, 5))
    declared = reorder(ft, "none").hits
    ggr = reorder(ft, "ggr")
    assert ggr.method == "ggr" and ggr.hits > declared
    level = reorder(ft, "level")
    assert level.hits >= declared and level.hits >= 0.95 * ggr.hits


def test_row_order_keeps_shared_prefixes_adjacent() -> None:
    cols = {"a": ["p", "q", "p", "q", "p"], "b": ["long-one", "x", "long-one", "y", "long-one"]}
    ft = encode(cols)
    for method in PLANNERS:
        rows = reorder(ft, method).rows.tolist()
        pos = sorted(rows.index(i) for i in (0, 2, 4))
        assert pos == list(range(pos[0], pos[0] + 3))


def test_encode_nulls_and_arrow_types() -> None:
    ft = encode({"n": pa.array([1, None, 1]), "s": pa.chunked_array([["x"], [None, "x"]])})
    assert ft.codes[0, 0] == ft.codes[2, 0] != ft.codes[1, 0]
    assert ft.codes[0, 1] == ft.codes[2, 1] != ft.codes[1, 1]
    assert ft.lengths[ft.codes[1, 0]] == len("n") + len("None")


def test_render_gives_fields_in_planned_order(tmp_path: Path) -> None:
    spec = parse_spec(
        spec_dict(
            tmp_path / "w.duckdb",
            prompt={
                "template": "{% for n, v in fields %}{{ n }}={{ v }};{% endfor %}",
                "reorderable": ["review", "plot"],
            },
        )
    )
    plot = "a long shared plot description"
    table = pa.table(
        {"id": pa.array([0, 1, 2], pa.int32()), "plot": [plot, plot, "x"], "review": list("abc")}
    )
    rows = render.render_rows(spec, table, None)
    assert rows.column("prompt").to_pylist() == [
        f"plot={plot};review=a;",
        f"plot={plot};review=b;",
        "review=c;plot=x;",  # shares nothing: declared order
    ]
    assert render.render_rows(spec, table, None).equals(rows)  # deterministic


@pytest.mark.slow
def test_scales_to_100k_rows() -> None:
    ft = encode(_clustered(np.random.default_rng(0), 100_000, 8))
    times = {}
    for method in PLANNERS:
        t0 = time.perf_counter()
        planned = reorder(ft, method)
        times[method] = time.perf_counter() - t0
        assert planned.method == method
    assert times["level"] < 10 and times["ggr"] < 30, times
