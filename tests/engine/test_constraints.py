"""Constrained decoding (engine/constraints.py) through the scheduler: every row of a batched step gets
its own grammar's mask, drafts the grammar forbids are never taken, a preempted request resumes with
its grammar state, and a grammar the library refuses is a clear error at submit. The tiny model has
random weights, so anything it writes that matches a grammar matches because of the mask."""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from engine import BatchingOptions, InferenceOptions, KvCacheOptions
from engine.constraints import Constraint, ConstraintError, GrammarCompiler
from engine.speculative import Drafter
from tests.fixtures.engine_helpers import make_engine, run_all

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green", "blue"]},
        "xs": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "maxItems": 3},
    },
    "required": ["n", "ok", "tag", "xs"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
LARK = 'start: "the " ANIMAL " sat on the " THING\nANIMAL: "cat" | "dog"\nTHING: "mat" | "sea"'
GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=60, repetition_penalty=1.0)
SAMPLED = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=60, repetition_penalty=1.0)
PROMPT = "one two three four five one two three four five one two three"


def constrained(options: InferenceOptions, constraint: Constraint, **changes: object) -> InferenceOptions:
    return InferenceOptions(**{**options.to_dict(), **changes, "constraint": constraint.to_dict()})


def check_schema(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def test_each_row_of_one_batch_follows_its_own_grammar(tiny):
    """A JSON schema, a regex, a Lark grammar and free text in the same forward passes: each output
    matches its own grammar; the free-text request is token for token what it is alone."""
    engine = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, speculative=False))
    options = [constrained(GREEDY, Constraint.json_schema(SCHEMA)),
               constrained(SAMPLED, Constraint.regex(REGEX), seed=5),
               constrained(SAMPLED, Constraint.lark(LARK), seed=6),
               constrained(SAMPLED, Constraint.json_object(), seed=7, max_new_tokens=200),
               GREEDY]  # fmt: skip
    results = run_all(engine, [engine.submit(PROMPT, o) for o in options])
    assert engine.metrics.snapshot().max_batch_size_seen == len(options)
    check_schema(results[0].text)
    assert re.fullmatch(REGEX, results[1].text)
    assert re.fullmatch(r"the (cat|dog) sat on the (mat|sea)", results[2].text)
    assert results[3].finish_reason == "length" or isinstance(json.loads(results[3].text), dict)
    assert all(r.finish_reason == "stop" for r in results[:3])
    alone = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, speculative=False))
    assert results[4].token_ids == run_all(alone, [alone.submit(PROMPT, GREEDY)])[0].token_ids


@pytest.mark.parametrize("seed", range(6))
def test_sampled_output_always_matches_the_schema(tiny, seed):
    """Random weights, sampling at temperature 1 over the whole vocabulary: only the mask can make
    the output a valid document, every time."""
    engine = make_engine(tiny)
    result = run_all(engine, [engine.submit(PROMPT, constrained(SAMPLED, Constraint.json_schema(SCHEMA),
                                                                 seed=seed))])[0]  # fmt: skip
    assert result.finish_reason == "stop", result.text
    check_schema(result.text)
    assert result.constraint_mask_ms > 0


def test_without_the_mask_the_same_seeds_do_not_match(tiny):
    """The control for the test above: the random model does not write the schema by itself."""
    engine = make_engine(tiny)
    results = run_all(engine, [engine.submit(PROMPT, InferenceOptions(**{**SAMPLED.to_dict(), "seed": s}))
                               for s in range(6)])  # fmt: skip
    assert not any(re.fullmatch(r"\{.*\}", r.text) for r in results)


def test_drafts_the_grammar_forbids_are_cut_and_output_is_unchanged(tiny):
    """With a drafter that drafts every n-gram match, constrained output (greedy and seeded) equals
    decoding without drafts; drafts are cut to what the grammar allows, so the grammar words the
    prompt repeats are drafted and some are accepted."""
    grammar = Constraint.lark('start: WORD (" " WORD){5,12}\nWORD: "one" | "two" | "three" | "four" | "five"')
    cases = [constrained(GREEDY, grammar), *(constrained(SAMPLED, grammar, seed=s) for s in range(4))]
    off = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, speculative=False))
    want = run_all(off, [off.submit(PROMPT, o) for o in cases])
    engine = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, draft_tokens=4))
    engine.drafter = Drafter(adaptive=False)
    got = run_all(engine, [engine.submit(PROMPT, o) for o in cases])
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert all(
        re.fullmatch(r"(one|two|three|four|five)( (one|two|three|four|five)){5,12}", r.text) for r in got
    )
    snapshot = engine.metrics.snapshot()
    assert snapshot.drafted_tokens > 0


def test_a_draft_the_grammar_forbids_is_never_verified(tiny):
    engine = make_engine(tiny)
    handle = engine.submit(PROMPT, constrained(GREEDY, Constraint.regex(r"one two [0-9]+")))
    seq = engine.scheduler.waiting()[0]
    ids = engine.tokenizer.encode
    assert seq.valid_draft_length(ids("one two 42", parse_special=False)) == len(ids("one two 42"))
    assert seq.valid_draft_length(ids("one five", parse_special=False)) == len(ids("one"))
    assert seq.valid_draft_length(ids("five", parse_special=False)) == 0
    handle.cancel()
    run_all(engine, [handle])


def test_a_preempted_constrained_request_resumes_with_its_grammar(tiny):
    """Two constrained requests under a KV budget too small for both: one is preempted, resumed from
    its prompt + text so far with its matcher as it was, and both equal their output alone."""
    model, _ = tiny
    bpt = model.kv_shape().bytes_per_token
    cache = KvCacheOptions(max_bytes_total=110 * bpt, max_bytes_per_session=110 * bpt)
    grammar = Constraint.lark('start: WORD (" " WORD){20,30}\nWORD: "the" | "sea" | "is" | "wide" | "blue"')
    options = [constrained(GREEDY, grammar, max_new_tokens=80), constrained(SAMPLED, grammar, seed=3)]
    texts = ["the sea is wide and the sky is blue", "the cat sat on the mat and the dog sat"]
    engine = make_engine(tiny, cache=cache)
    results = run_all(engine, [engine.submit(t, o) for t, o in zip(texts, options, strict=True)])
    assert engine.metrics.snapshot().preemptions >= 1
    for text, o, result in zip(texts, options, results, strict=True):
        alone = make_engine(tiny)
        assert result.token_ids == run_all(alone, [alone.submit(text, o)])[0].token_ids
        assert re.fullmatch(r"(the|sea|is|wide|blue)( (the|sea|is|wide|blue)){20,30}", result.text)


@pytest.mark.parametrize(
    ("constraint", "words"),
    [(Constraint.json_schema({"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "nowhere"),
     (Constraint.json_schema({"type": "frobnicate"}), "frobnicate"),
     (Constraint.regex("[a-z"), "regular expression"),
     (Constraint.lark("start: undefined_rule"), "undefined_rule")],
)  # fmt: skip
def test_a_grammar_the_library_refuses_is_an_error_at_submit(tiny, constraint, words):
    engine = make_engine(tiny)
    with pytest.raises(ConstraintError, match=re.escape(words)) as refused:
        engine.submit(PROMPT, constrained(GREEDY, constraint))
    assert isinstance(refused.value, ValueError)
    assert not engine.has_work


def test_constraint_specs_are_checked_and_round_trip():
    with pytest.raises(ConstraintError, match="not valid JSON"):
        Constraint("json_schema", "{nope")
    with pytest.raises(ConstraintError, match="kind"):
        Constraint("yaml", "a: 1")  # type: ignore[arg-type]
    options = constrained(GREEDY, Constraint.json_schema(SCHEMA))
    assert InferenceOptions.from_dict(json.loads(json.dumps(options.to_dict()))) == options


def test_the_mask_allows_exactly_what_the_grammar_allows(tiny):
    _, tok = tiny
    matcher = GrammarCompiler(tok).matcher(Constraint.regex("(cat|dog)s?"))
    allowed = matcher.allowed()
    texts = {tok.token_text(i) for i in np.flatnonzero(allowed)}
    assert texts and all(re.fullmatch(r"(c|ca|cat|cats|d|do|dog|dogs)", t) for t in texts), texts
    logits = np.zeros(tok.vocab_size, dtype=np.float32)
    masked = matcher.mask(logits)
    assert np.isneginf(masked[~allowed]).all() and (masked[allowed] == 0).all()
    assert (logits == 0).all()  # the caller's logits are not touched
    for token in tok.encode("cat", parse_special=False):
        assert matcher.accept(token)
    assert matcher.accepting and not matcher.finished  # "cats" may still follow
    matcher.rollback(1)
    assert not matcher.accepting


# -- the real models ---------------------------------------------------------------------------------
@pytest.mark.smollm2
def test_smollm2_reference_greedy_is_unchanged_on_the_processing_path(smollm2, reference_prompts):
    """Asking for logprobs routes sampling through the logit processor; greedy tokens stay the
    reference's, batched; and the JSON a schema forces from the real model is valid."""
    engine = make_engine(smollm2)
    options = InferenceOptions(temperature=0.0, max_new_tokens=24, stop_on_eos=False, repetition_penalty=1.0,
                               logprobs=1)  # fmt: skip
    person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}  # fmt: skip
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    handles = [engine.submit(p["messages"], options) for p in reference_prompts]
    handles.append(engine.submit(ask, constrained(GREEDY, Constraint.json_schema(person))))
    results = run_all(engine, handles)
    for prompt, result in zip(reference_prompts, results[:-1], strict=True):
        assert list(result.token_ids) == prompt["greedy_ids"][:24], prompt["key"]
        assert [lp.token_id for lp in result.logprobs] == list(result.token_ids)
    jsonschema.validate(json.loads(results[-1].text), person)
