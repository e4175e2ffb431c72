"""Do reordered fields change the answers? The LLM-SQL filter queries, declared vs planned field order.

For every filter query of ../shared/data/llm_sql (the paper's yes/no style
questions, 5 output tokens, greedy), the first ``--rows`` rows are rendered as
bench.plan_real renders them, once in the paper's column order and once in
the per-row order the planner picks for ``prompt.reorderable`` fields
(batchllm.plan.fields, "level"), and both run on the default model. Reported
per query: the engine's achieved prompt saving and wall time of each order,
and how many rows got the same answer (its words, lower case, punctuation
stripped). Answers that differ are the model's sensitivity to
field order, which is why marking fields reorderable is the user's call.

    python -m bench.reorder_labels [--rows 300] [--data ../shared/data] [--json]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path
from typing import Any

from batchllm.plan.fields import encode, reorder
from bench.plan_real import DEFAULT_DATA, render, workloads


def answer(text: str) -> str:
    """The answer as a filter compares it: its words, lower case, without punctuation."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from batchllm.engine import Engine, SamplingParams

    data = Path(args.data)
    spec = json.loads((data / "llm_sql" / "queries.json").read_text())
    system = spec["prompt_construction"]["system_prompt"]
    user_template = spec["prompt_construction"]["user_prompt_template"]
    max_tokens = spec["prompt_construction"]["decoding"]["max_tokens_filter_queries"]
    engine = Engine(args.model, device="cpu")
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=max_tokens)
    out = []
    for w in workloads(data):
        if not w["filter"]:
            continue
        rows = {c: v[: args.rows] for c, v in w["data"].items()}
        table = encode({c: [v if v != "" else None for v in rows[c]] for c in w["fields"]})
        t0 = time.perf_counter()
        per_row = reorder(table, "level").names(table.names)
        reorder_s = time.perf_counter() - t0
        runs: dict[str, dict[str, Any]] = {}
        for name, fields in (("declared", w["fields"]), ("reordered", per_row)):
            ids = tok.encode_batch(render(tok, system, user_template, w["text"], rows, fields))
            t0 = time.perf_counter()
            results = engine.generate(ids, params)
            runs[name] = {
                "wall_s": round(time.perf_counter() - t0, 2),
                "saving_ratio": round(engine.stats.saving_ratio, 4),
                "answers": [answer(r.text) for r in results],
            }
        a, b = runs["declared"]["answers"], runs["reordered"]["answers"]
        same = sum(x == y for x, y in zip(a, b, strict=True))
        counts = {k: a.count(k) for k in sorted(set(a), key=a.count, reverse=True)[:4]}
        out.append(
            {
                "table": w["table"],
                "query": w["query"],
                "rows": len(a),
                "declared_saving": runs["declared"]["saving_ratio"],
                "reordered_saving": runs["reordered"]["saving_ratio"],
                "declared_s": runs["declared"]["wall_s"],
                "reordered_s": runs["reordered"]["wall_s"],
                "reorder_plan_s": round(reorder_s, 3),
                "same_answer": same,
                "same_share": round(same / max(len(a), 1), 4),
                "declared_answers": counts,
            }
        )
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="folder holding llm_sql/")
    p.add_argument("--model", default="default")
    p.add_argument("--rows", type=int, default=300, help="first rows of each table")
    p.add_argument("--json", action="store_true", help="only the JSON lines")
    args = p.parse_args(argv)
    results = run(args)
    if args.json:
        return
    print(
        "\n| table | query | rows | saving declared | saving reordered | s declared | s reordered | same answer |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['table']} | {r['query']} | {r['rows']} | {r['declared_saving']:.3f} | {r['reordered_saving']:.3f} "
            f"| {r['declared_s']:.1f} | {r['reordered_s']:.1f} | {r['same_answer']} ({r['same_share']:.1%}) |"
        )


if __name__ == "__main__":
    main()
