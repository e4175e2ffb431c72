"""Grammar-constrained generation in the native engine (the default model on CPU).

The mask must never change an allowed choice: greedy constrained decoding
follows the unconstrained tokens for as long as the grammar allows them, so an
output that already conforms comes back unchanged. Every output that ends
(EOS) parses and validates; outputs are the same with prefix sharing on or
off and after preemption.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from batchllm.engine import Engine, SamplingParams
from batchllm.engine.grammar import Constraint, GrammarHead
from batchllm.engine.sequence import Sequence as Seq
from batchllm.shape import FormatSpec
from batchllm.typed import parse

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SYSTEM = 'Reply only with a JSON object like {"name": "...", "age": 0}. No code fences.'
PEOPLE = ["Alice is 31.", "Dan is 20 years old.", "Eve: 52"]
_NAME = {"type": "string", "maxLength": 24}
RICH = {
    "json_schema": {
        "type": "object",
        "properties": {
            "title": _NAME,
            "year": {"type": "integer"},
            "rating": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "family_friendly": {"type": "boolean"},
            "genre": {"type": ["string", "null"], "enum": ["drama", "comedy", "thriller", "other", None]},
            "cast": {
                "type": "array",
                "maxItems": 2,
                "items": {
                    "type": "object",
                    "properties": {"name": _NAME, "lead": {"type": "boolean"}},
                    "required": ["name", "lead"],
                },
            },
            "tags": {"type": "array", "items": _NAME, "maxItems": 2},
            "studio": {
                "type": "object",
                "properties": {"name": {"type": ["string", "null"], "maxLength": 24}, "country": _NAME},
                "required": ["name", "country"],
            },
        },
        "required": ["title", "year", "rating", "family_friendly", "genre", "cast", "tags", "studio"],
    },
    "whitespace": "compact",
    "jump_forward": True,
}


def _chat(engine: Engine, system: str, user: str) -> str:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return engine.tokenizer.apply_chat_template(messages)


def _accepted_prefix(engine: Engine, constraint: Constraint, tokens: list[int]) -> tuple[int, bool]:
    """How many leading tokens a fresh matcher accepts, and whether it accepts them all and ends."""
    import xgrammar as xgr

    matcher = xgr.GrammarMatcher(engine.grammars.get(constraint))
    for n, token in enumerate(tokens):
        if not matcher.accept_token(token):
            return n, False
    return len(tokens), matcher.is_terminated()


def test_greedy_mask_keeps_allowed_choices_and_sharing_does_not_matter(engine: Engine) -> None:
    fmt = FormatSpec(json_schema=PERSON)
    constraint = Constraint("json_schema", fmt.grammar()[1])
    prompts = [_chat(engine, SYSTEM, p) for p in PEOPLE]
    params = SamplingParams(max_tokens=24)
    free = engine.generate(prompts, params)
    shared = engine.generate(prompts, params, constraint=constraint, enable_sharing=True)
    assert engine.stats.grammar_mask_s > 0
    alone = engine.generate(prompts, params, constraint=constraint, enable_sharing=False)
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    conforming = 0
    for u, c in zip(free, shared, strict=True):
        n, complete = _accepted_prefix(engine, constraint, u.token_ids)
        assert c.token_ids[:n] == u.token_ids[:n]  # the mask changed nothing the grammar allowed
        if complete:
            conforming += 1
            assert c.token_ids == u.token_ids and c.text == u.text
        if c.finish_reason == "stop":
            value, error = parse(fmt, c.text, c.finish_reason)
            assert error is None and set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert conforming >= 1  # "Dan" answers with conforming JSON unconstrained


def test_a_stop_id_among_forced_tokens_ends_the_request_there(engine: Engine) -> None:
    """Jump-forward appends the tokens the grammar forces all at once; a stop id among them ends the
    request at that token, as decoding them one by one does."""
    source = FormatSpec(json_schema=PERSON).grammar()[1]
    prompt = [_chat(engine, SYSTEM, PEOPLE[0])]
    plain = Constraint("json_schema", source, any_whitespace=False, jump_forward=False)
    jump = Constraint("json_schema", source, any_whitespace=False, jump_forward=True)
    [free] = engine.generate(prompt, SamplingParams(max_tokens=24), constraint=plain)
    [forced] = engine.generate(prompt, SamplingParams(max_tokens=24), constraint=jump)
    assert engine.stats.forced_tokens > 0
    # every token jump-forward forced after the first (those in the middle of a forced run)
    for k in range(2, 8):
        stop = free.token_ids[k]
        if stop in free.token_ids[:k]:
            continue
        params = SamplingParams(max_tokens=24, stop_token_ids=[stop])
        [one] = engine.generate(prompt, params, constraint=plain)
        [many] = engine.generate(prompt, params, constraint=jump)
        assert (many.token_ids, many.text, many.finish_reason) == (one.token_ids, one.text, "stop"), k
    assert forced.token_ids == free.token_ids


def test_a_stop_string_early_in_a_long_forced_run_is_found(engine: Engine) -> None:
    """A forced run longer than the stop rule's tail window: the stop string in its first tokens ends the
    request with the text before it, and at the token that completes it, as decoding the tokens one by
    one does."""
    after = " and then the story goes on and on" * 8
    schema = json.dumps({"type": "object", "properties": {"k": {"const": "once upon a time END" + after}}})
    prompt = [_chat(engine, SYSTEM, PEOPLE[0])]
    params = SamplingParams(max_tokens=200, stop=["END"])
    out = []
    for jump in (False, True):
        constraint = Constraint("json_schema", schema, any_whitespace=False, jump_forward=jump)
        [r] = engine.generate(prompt, params, constraint=constraint)
        out.append((r.text, r.finish_reason))
        # the last token completes the stop (forced runs tokenize differently from sampled ones)
        text = [engine.tokenizer.decode(r.token_ids[:n]) for n in (len(r.token_ids) - 1, len(r.token_ids))]
        assert "END" not in text[0] and "END" in text[1], (jump, text)
    assert out[0] == out[1] and out[0][0].endswith('"once upon a time ') and out[0][1] == "stop", out


def test_max_tokens_cut_is_an_invalid_output(engine: Engine) -> None:
    fmt = FormatSpec(json_schema=PERSON)
    [r] = engine.generate(
        [_chat(engine, SYSTEM, PEOPLE[1])],
        SamplingParams(max_tokens=5),
        constraint=Constraint("json_schema", fmt.grammar()[1]),
    )
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    value, error = parse(fmt, r.text, r.finish_reason)
    assert value is None and error is not None and "cut by max_tokens" in error


def test_rich_schema_outputs_validate(engine: Engine) -> None:
    """Nested objects, arrays, enums, numbers, booleans and nullable fields; compact JSON, jump-forward."""
    fmt = FormatSpec.model_validate(RICH)
    kind, source = fmt.grammar()
    constraint = Constraint(kind, source, any_whitespace=False, jump_forward=True)
    films = ["Jaws (1975), Spielberg's shark thriller.", "Toy Story, a 1995 Pixar comedy."]
    system = "Describe the film as JSON: title, year, rating, family_friendly, genre, cast, tags, studio."
    results = engine.generate(
        [_chat(engine, system, f) for f in films], SamplingParams(max_tokens=128), constraint=constraint
    )
    assert engine.stats.forced_tokens > 0  # compact keys are forced: appended without sampling
    ok = 0
    for r in results:
        value, error = parse(fmt, r.text, r.finish_reason)
        if r.finish_reason == "stop":
            assert error is None, (r.text, error)
            assert set(value) == set(RICH["json_schema"]["properties"]) and isinstance(value["cast"], list)
            assert value["genre"] in ("drama", "comedy", "thriller", "other", None)
            ok += 1
        else:
            assert error is not None and "cut by max_tokens" in error
    assert ok >= 1


def test_choice_and_regex(engine: Engine) -> None:
    prompts = [_chat(engine, "Is the review positive or negative?", r) for r in ("Loved it.", "Awful.")]
    choice = FormatSpec(choice=["positive", "negative"])
    results = engine.generate(prompts, SamplingParams(max_tokens=8), constraint=Constraint(*choice.grammar()))
    assert all(r.finish_reason == "stop" and r.text in ("positive", "negative") for r in results)
    regex = FormatSpec(regex=r"[0-9]{3}-[0-9]{4}")
    results = engine.generate(
        ["My phone number is"], SamplingParams(max_tokens=12, temperature=0.9, seed=7),
        constraint=Constraint(*regex.grammar()),
    )  # fmt: skip
    assert parse(regex, results[0].text, results[0].finish_reason) == (results[0].text, None)


def test_seeded_sampling_survives_preemption(engine: Engine, default_model_path) -> None:
    """A pool too small for the batch preempts and recomputes; the matchers follow, tokens do not change."""
    constraint = Constraint("json_schema", json.dumps(PERSON))
    prompts = [_chat(engine, SYSTEM, p) for p in [*PEOPLE, "Bob, aged 45", "Carol is 12."]]
    params = SamplingParams(max_tokens=24, temperature=0.8, seed=11)
    reference = engine.generate(prompts, params, constraint=constraint)
    small = Engine(default_model_path, kv_cache_gb=0.01, max_num_batched_tokens=128, decode_reserve=0.1)
    results = small.generate(prompts, params, constraint=constraint)
    assert small.stats.preemptions > 0
    assert [r.token_ids for r in results] == [r.token_ids for r in reference]


def test_mask_applies_each_rows_grammar(engine: Engine) -> None:
    """The batch mask is the matchers' bitmask: forbidden logits -inf, allowed ones untouched."""
    import xgrammar as xgr

    compiled = engine.grammars.get(Constraint("ebnf", 'root ::= "yes" | "no" | "{" [a-z]+ "}"'))
    head = GrammarHead(None, None, compiled, engine.config.vocab_size, jump_forward=False)  # type: ignore[arg-type]
    prefix = engine.tokenizer.encode("{ab")
    seqs = [Seq(i, i, [1, *tokens], 1, 8) for i, tokens in enumerate([[], prefix, []])]
    logits = torch.randn(3, engine.config.vocab_size)
    before = logits.clone()
    head.apply_mask(logits, seqs)
    for seq, row, orig in zip(seqs, logits, before, strict=True):
        matcher = xgr.GrammarMatcher(compiled)
        for t in seq.completion_token_ids:
            assert matcher.accept_token(t)
        bitmask = xgr.allocate_token_bitmask(1, engine.config.vocab_size)
        matcher.fill_next_token_bitmask(bitmask)
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: engine.config.vocab_size]
        allowed = torch.from_numpy(bits.astype(bool))
        assert torch.equal(row[allowed], orig[allowed]) and bool(torch.isinf(row[~allowed]).all())
        assert 0 < int(allowed.sum()) < engine.config.vocab_size


def test_special_tokens_are_never_text_in_a_grammar(engine: Engine) -> None:
    """<|im_start|> and the like decode to nothing (skip_special_tokens): inside a JSON string they
    would change the stored value, so no grammar allows them; the stop ids still end the output."""
    import xgrammar as xgr

    compiled = engine.grammars.get(Constraint("json_schema", json.dumps(PERSON)))
    matcher = xgr.GrammarMatcher(compiled)
    for t in engine.tokenizer.encode('{"name": "'):
        assert matcher.accept_token(t)
    bitmask = xgr.allocate_token_bitmask(1, engine.config.vocab_size)
    matcher.fill_next_token_bitmask(bitmask)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")[: engine.config.vocab_size]
    special = {i for i in range(32) if engine.tokenizer.decode([i]) == "" and i not in engine.eos_token_ids}
    assert special and not any(bits[i] for i in special)
    assert bits[engine.tokenizer.encode("Ann")[0]]
