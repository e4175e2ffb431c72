"""Planned saving ratio R on the real LLM-SQL tables (shared/data/llm_sql) with the paper's prompts.

    python -m bench.plan_real [--data ../shared/data] [--model default] [--reorder none|ggr|level|all] [--json]

Prompts follow queries.json (Liu et al.): system = the data-analyst system
prompt; user = "Answer the below query:\\n{query}\\n Given the following data:\\n
{fields}" where fields is the Python dict repr of {column: value} of the row
(empty values -> None); both rendered with the model's chat template and
tokenized. max_tokens: 5 for filter queries, 1024 otherwise (the paper's).

Two field orders per query:
- paper: the paper table's column order (restricted to the columns present);
- shared-first: columns by ascending number of distinct values, a static
  stand-in for GGR reordering (DESIGN 4.4), which puts the values rows share
  ahead of the ones they do not.
With ``--reorder ggr|level|all``, also per-row orders planned from the paper
order by batchllm.plan.fields (DESIGN 4.4): GGR (Liu et al.) and the
level-synchronous greedy, with their planning time (reorder_seconds) and
field-granular prefix-hit rate (field_hit_rate, fields.prefix_hits / total).
Row order does not matter to the global planner (the tree is built over the
whole batch); the benchmark checks that on a shuffled copy.
The data is read in place; nothing is copied into the repository.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from batchllm.plan import build_plan
from batchllm.plan.fields import encode, reorder

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
MOVIES_COLUMNS = {
    "review_content": "reviewcontent",
    "movie_info": "movieinfo",
    "movie_title": "movietitle",
    "rotten_tomatoes_link": "rottentomatoeslink",
}


def read_csv(path: Path, rename: dict[str, str] | None = None) -> dict[str, list[str]]:
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    names = list(rows[0].keys()) if rows else []
    rename = rename or {}
    return {rename.get(c, c): [r[c] for r in rows] for c in names}


def workloads(data: Path) -> list[dict[str, Any]]:
    """(table, query name, query text, filter?, columns, rows) for the queries we can run here."""
    spec = json.loads((data / "llm_sql" / "queries.json").read_text())
    beer = read_csv(data / "llm_sql" / "beer.csv")
    movies = read_csv(data / "llm_sql" / "movies_demo.csv", MOVIES_COLUMNS)
    out = []
    for table, cols in (("beer", beer), ("movies", movies)):
        tspec = spec["tables"][table]
        paper_cols = [c for c in tspec["columns"] if c in cols]
        for qname, q in tspec["queries"].items():
            if qname == "Q3_multi_llm":
                text, fields, is_filter = q["step1_on_filtering_field"], [tspec["filtering_field"]], True
                qname = "Q3_step1_sentiment"
            elif isinstance(q, dict):
                text, fields, is_filter = q["prompt"], paper_cols, qname.startswith("Q2")
            else:
                text, fields, is_filter = q, paper_cols, False
            out.append(
                {
                    "table": table,
                    "query": qname,
                    "text": text,
                    "filter": is_filter,
                    "fields": fields,
                    "data": cols,
                }
            )
    return out


def render(
    tok: Any,
    system: str,
    user_template: str,
    query: str,
    data: dict[str, list[str]],
    fields: list[str] | list[list[str]],
) -> list[str]:
    """One prompt per row; ``fields`` is one column order for all rows or one per row."""
    per_row = isinstance(fields[0], list)
    n = len(next(iter(data.values())))
    texts = []
    for i in range(n):
        cols = fields[i] if per_row else fields
        row = {c: (data[c][i] if data[c][i] != "" else None) for c in cols}
        user = user_template.format(query=query, fields_json=str(row))
        texts.append(
            tok.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": user}]
            )
        )
    return texts


def shared_first(data: dict[str, list[str]], fields: list[str]) -> list[str]:
    return sorted(fields, key=lambda c: (len(set(data[c])), fields.index(c)))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from batchllm.engine.tokenizer import Tokenizer
    from batchllm.models import resolve_model

    data = Path(args.data)
    spec = json.loads((data / "llm_sql" / "queries.json").read_text())
    system = spec["prompt_construction"]["system_prompt"]
    user_template = spec["prompt_construction"]["user_prompt_template"]
    decoding = spec["prompt_construction"]["decoding"]
    tok = Tokenizer(resolve_model(args.model))
    results = []
    rng = np.random.default_rng(0)
    for w in workloads(data):
        orders: dict[str, Any] = {"paper": w["fields"], "shared-first": shared_first(w["data"], w["fields"])}
        if orders["shared-first"] == w["fields"]:
            del orders["shared-first"]
        ft = encode({c: [v if v != "" else None for v in w["data"][c]] for c in w["fields"]})
        total = max(int(ft.lengths[ft.codes].sum()), 1)
        planned = {"paper": (0.0, reorder(ft, "none").hits / total)}
        for method in ("ggr", "level") if args.reorder == "all" else (args.reorder,):
            if method != "none":
                t0 = time.perf_counter()
                fo = reorder(ft, method)
                planned[method] = (time.perf_counter() - t0, fo.hits / total)
                orders[method] = fo.names(ft.names)
        for order_name, fields in orders.items():
            texts = render(tok, system, user_template, w["text"], w["data"], fields)
            ids = tok.encode_batch(texts)
            mt = decoding["max_tokens_filter_queries"] if w["filter"] else decoding["max_tokens_other"]
            t0 = time.perf_counter()
            plan = build_plan(ids, mt, block_size=args.block_size)
            secs = time.perf_counter() - t0
            perm = rng.permutation(len(ids))
            shuffled = build_plan([ids[k] for k in perm], mt, block_size=args.block_size)
            s = plan.stats
            results.append(
                {
                    "table": w["table"],
                    "query": w["query"],
                    "field_order": order_name,
                    "fields": "per row" if order_name in ("ggr", "level") else fields,
                    "rows": s.prompts,
                    "duplicates": s.duplicates,
                    "mean_prompt_tokens": round(s.logical_tokens / max(s.prompts, 1), 1),
                    "logical_tokens": s.logical_tokens,
                    "physical_tokens": s.physical_tokens,
                    "saving_ratio": round(s.saving_ratio, 4),
                    "saving_ratio_first_level": round(s.saving_ratio_first_level or 0.0, 4),
                    "groups": s.groups,
                    "plain": s.plain,
                    "saving_ratio_rows_shuffled": round(shuffled.stats.saving_ratio, 4),
                    "plan_seconds": round(secs, 3),
                    "reorder_seconds": round(planned[order_name][0], 3) if order_name in planned else None,
                    "field_hit_rate": round(planned[order_name][1], 4) if order_name in planned else None,
                }
            )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default=str(DEFAULT_DATA), help="folder holding llm_sql/ (default ../shared/data)"
    )
    p.add_argument("--model", default="default", help="model whose tokenizer and chat template to use")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument(
        "--reorder",
        choices=["none", "ggr", "level", "all"],
        default="none",
        help="also plan per-row field orders (batchllm.plan.fields); all = ggr and level",
    )
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"planned saving ratio R (block {args.block_size}, tokenizer {args.model})")
    cols = ["table", "query", "field_order", "rows", "mean_prompt_tokens", "saving_ratio"]
    cols += ["saving_ratio_first_level", "groups", "plain", "duplicates", "saving_ratio_rows_shuffled"]
    cols += ["field_hit_rate", "reorder_seconds"]
    for c in cols:
        table.add_column(c)
    for r in results:
        table.add_row(*(str(r[c]) for c in cols))
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
