"""Speculative decoding without a draft model (engine/speculative.py and the scheduler's verification):
the n-gram index against a brute-force lookup, the cost-aware choice of drafts, and exactness: with
drafting the tokens are those of decoding without it (greedy and seeded, alone and batched), and a
draft token is taken with the model's own probability for it (a statistical test on the tiny model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine import BatchingOptions, InferenceOptions, KvCacheOptions, SessionId
from engine.generation import GenerationRequest as Seq
from engine.model import Row
from engine.speculative import Draft, Drafter, NgramIndex, step_cost
from tests.fixtures.engine_helpers import make_engine, run_all

OFF = BatchingOptions(max_batch_wait_ms=0, speculative=False)
ON = BatchingOptions(max_batch_wait_ms=0, draft_tokens=4)
GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=40, stop_on_eos=False, repetition_penalty=1.0)
# Raw prompts for the tiny model: repeated phrases give the n-gram lookup something to find.
PROMPTS = [
    "one two three four five one two three four five one two three",
    "the cat sat on the mat and the cat sat on the",
    "abc abc abc abc abc abc",
    "a longer prompt that says different things once and then stops here",
]


def engine_with(pair, batching, adaptive=True, cache=None):
    engine = make_engine(pair, batching, cache)
    engine.drafter = Drafter(adaptive=adaptive)
    return engine


def generate(engine, prompts, options):
    return run_all(engine, [engine.submit(p, options) for p in prompts])


# -- the n-gram index ------------------------------------------------------------------------------
def brute_lookup(ids, max_n, k):
    """The longest n (<= max_n) whose last-n gram occurred earlier; its latest earlier occurrence's
    continuation."""
    for n in range(min(max_n, len(ids)), 0, -1):
        gram = ids[len(ids) - n :]
        for start in range(len(ids) - n - 1, -1, -1):  # occurrences that end before the last token
            if ids[start : start + n] == gram:
                return n, ids[start + n : start + n + k]
    return 0, []


def test_ngram_lookup_matches_brute_force_as_the_list_grows():
    rng = np.random.default_rng(0)
    for trial in range(20):
        ids = [int(t) for t in rng.integers(0, 4 + trial % 5, 60)]  # small alphabets: many repeats
        index = NgramIndex(3)
        for end in range(1, len(ids) + 1):  # incremental, one token at a time
            assert index.lookup(ids[:end], 5) == brute_lookup(ids[:end], 3, 5), (trial, end)


def test_ngram_lookup_prefers_the_longest_gram_and_the_latest_occurrence():
    ids = [1, 2, 9, 5, 2, 7, 1, 2]
    assert NgramIndex(3).lookup(ids, 4) == (2, [9, 5, 2, 7])  # "1 2" beats the later "2"
    assert NgramIndex(1).lookup(ids, 4) == (1, [7, 1, 2])  # "2" last seen before 7
    assert NgramIndex(3).lookup([4, 5, 6], 4) == (0, [])


def test_a_reply_copying_a_passage_keeps_drafting_from_that_passage():
    """The latest earlier "1 2 3" continues with 6, but the reply is copying the passage where it
    continues with 4 5: after a fully accepted draft, the drafter follows the passage."""
    context = [7, 8, 9, 1, 2, 3, 4, 5, 1, 2, 3, 6, 6]
    drafter = Drafter(adaptive=False)
    ids = [*context, 7, 8]
    draft = drafter.propose([(1, ids, 16)], 1, 1, max_draft=3, max_ngram=3)[1]
    assert (draft.token_ids, draft.start) == ([9, 1, 2], 2)
    drafter.record(1, draft, 3)  # all three taken, and the model's next token was 3
    ids = [*ids, 9, 1, 2, 3]
    assert drafter.propose([(1, ids, 16)], 1, 1, max_draft=3, max_ngram=3)[1].token_ids == [4, 5, 1]
    assert NgramIndex(3).lookup(ids, 3) == (3, [6, 6, 7])  # what the latest occurrence would say
    drafter.record(1, Draft([4, 5, 1], 3, 6), 0)  # refused: the reply left the passage
    ids = [*ids, 0]
    assert 1 not in drafter.propose([(1, ids, 16)], 1, 1, max_draft=3, max_ngram=3)  # no match for "3 0"


# -- which drafts a step verifies --------------------------------------------------------------------
def test_step_cost_follows_the_kernel_row_groups():
    assert step_cost(1) == 1.0 and step_cost(3) == step_cost(4) and step_cost(5) == step_cost(8)
    assert step_cost(9) == 2 * step_cost(8)


def proposal(drafter, n_requests, n_rows=None, history=()):
    """Every request has the same repetitive context, so each one finds a 3-gram match."""
    ids = [1, 2, 3, 4, 5, 6, 7, 8] * 3 + [1, 2, 3]
    requests = [(i, ids, 16) for i in range(n_requests)]
    if history:
        drafter.propose(requests, n_rows or n_requests, n_requests, max_draft=7, max_ngram=3)  # seen
    for request_id, n_accepted in history:
        drafter.record(request_id, Draft([4, 5, 6], 3), n_accepted)
    return drafter.propose(requests, n_rows or n_requests, n_requests, max_draft=7, max_ngram=3)


def test_a_lone_request_drafts_where_the_rows_are_cheap():
    drafts = proposal(Drafter(), 1, history=[(0, 3)] * 4)  # it has been right: high acceptance
    assert drafts[0].token_ids == [4, 5, 6] and drafts[0].ngram == 3  # 4 rows: the cheap group


def test_a_lone_request_with_a_low_acceptance_does_not_draft_at_a_loss():
    """One drafted token is right 1 time in 5: 1.2 tokens for a 2-position step, which costs more than
    ROW_COST's two rows (the multi-position attention path: DRAFT_OVERHEAD); 1 time in 2 pays."""
    low = [(0, 0)] * 4 + [(0, 1)]  # 1 of 5 drafted tokens accepted (of 3-token drafts: estimate ~0.2)
    drafter = Drafter()
    drafts = proposal(drafter, 1, history=low)
    assert drafts == {}, drafts
    assert proposal(Drafter(), 1) and len(proposal(Drafter(), 1)[0].token_ids) == 1  # the prior: one probe


def test_no_drafts_when_the_batch_already_fills_the_cheap_rows():
    history = [(i, 3) for i in range(8)] * 4  # every request has been right so far
    assert proposal(Drafter(), 8, history=history) == {}  # 9+ rows cost twice 8


def test_drafting_turns_itself_off_after_failures_and_probes_again_later():
    drafter = Drafter()
    assert proposal(drafter, 1)  # an unknown request tries
    for _ in range(6):
        drafter.record(0, Draft([4], 3), 0)
    assert proposal(drafter, 1) == {}  # recent acceptance is low: not worth a row
    probes = [bool(proposal(drafter, 1)) for _ in range(200)]
    assert any(probes)  # the estimate drifted back: it tries again


def test_non_adaptive_drafter_drafts_every_match():
    assert proposal(Drafter(adaptive=False), 8, history=[(i, 0) for i in range(8)] * 5).keys() == set(
        range(8)
    )


# -- exactness -------------------------------------------------------------------------------------
@pytest.mark.parametrize("adaptive", [False, True])
def test_greedy_tokens_equal_decoding_without_drafts_alone_and_batched(tiny, adaptive):
    """Alone, and four at once (where the adaptive drafter drafts nothing: 4 rows fill a cheap group)."""
    want = [generate(make_engine(tiny, OFF), [p], GREEDY)[0].token_ids for p in PROMPTS]
    drafted = accepted = 0
    for prompt, expected in zip(PROMPTS, want, strict=True):
        engine = engine_with(tiny, ON, adaptive)
        assert generate(engine, [prompt], GREEDY)[0].token_ids == expected
        drafted += engine.metrics.snapshot().drafted_tokens
        accepted += engine.metrics.snapshot().accepted_tokens
    assert drafted > accepted > 0  # drafts taken, and drafts refused
    engine = engine_with(tiny, ON, adaptive)
    assert [r.token_ids for r in generate(engine, PROMPTS, GREEDY)] == want
    snapshot = engine.metrics.snapshot()
    assert (snapshot.drafted_tokens > snapshot.accepted_tokens > 0) == (not adaptive)
    assert snapshot.mean_accepted_length >= 1.0


@pytest.mark.parametrize("mode", ["prefill_only", "sequential", "no_cache"])
def test_greedy_tokens_are_the_same_in_every_batching_mode(tiny, mode):
    batching = {"prefill_only": BatchingOptions(prefill_only=True, max_batch_wait_ms=0, draft_tokens=4),
                "sequential": BatchingOptions(enabled=False, draft_tokens=4)}.get(mode, ON)  # fmt: skip
    cache = KvCacheOptions(enabled=False) if mode == "no_cache" else None
    want = [r.token_ids for r in generate(make_engine(tiny, OFF), PROMPTS, GREEDY)]
    engine = engine_with(tiny, batching, adaptive=False, cache=cache)
    assert [r.token_ids for r in generate(engine, PROMPTS, GREEDY)] == want
    assert (engine.metrics.snapshot().drafted_tokens > 0) == (mode != "no_cache")


def test_seeded_sampling_gives_the_same_tokens_with_and_without_drafts(tiny):
    """Each position is sampled with the same RNG draw as without drafts, so a seed gives the same
    reply either way (the strongest form of "the distribution is unchanged")."""
    for seed in range(12):
        options = InferenceOptions(temperature=0.8, top_k=5, max_new_tokens=30, seed=seed, stop_on_eos=False)
        off = generate(make_engine(tiny, OFF), PROMPTS[:2], options)
        engine = engine_with(tiny, ON, adaptive=False)
        on = generate(engine, PROMPTS[:2], options)
        assert [r.token_ids for r in on] == [r.token_ids for r in off], seed
        assert engine.metrics.snapshot().drafted_tokens > 0


def test_a_draft_is_taken_with_the_models_probability(tiny):
    """Statistical, over a fixed budget of 3,000 seeds: a request verifying drafts [d1, d2] takes d1
    with the model's probability p(d1), d2 (after d1) with p(d2); on a rejection the token it takes
    is distributed as p without the draft, renormalised (chi-square); positions after a rejection are
    never sampled. The logits are fixed, so the exact probabilities are known."""
    _, tok = tiny
    logits = np.log(
        np.array([[0.40, 0.30, 0.15, 0.10, 0.05], [0.25, 0.05, 0.50, 0.15, 0.05], [1, 1, 1, 1, 1.0]])
    )
    p1, p2 = np.exp(logits[0]), np.exp(logits[1])
    draft = [1, 2]  # p(d1) = 0.30, p(d2 | d1) = 0.50
    options = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, stop_on_eos=False)
    n = 3000
    first_taken = np.zeros(5)
    second_taken = np.zeros(5)
    for seed in range(n):
        seq = Seq([7, 8, 9], dataclasses.replace(options, seed=seed), tok.stream_decoder(), frozenset())
        event, n_taken = seq.on_draft_logits(logits, draft, now=0.0)
        tokens = event.token_ids
        assert len(tokens) == n_taken + 1 and list(tokens[:n_taken]) == draft[:n_taken]
        first_taken[tokens[0]] += 1
        if n_taken >= 1:
            second_taken[tokens[1]] += 1
    assert chi_square(first_taken, p1) < 20  # 4 degrees of freedom: p < 0.001 at 18.5
    assert chi_square(second_taken, p2) < 20
    rejected = first_taken.copy()
    rejected[draft[0]] = 0  # the token taken where d1 was refused: p without d1, renormalised
    residual = np.where(np.arange(5) == draft[0], 0.0, p1)
    assert chi_square(np.delete(rejected, draft[0]), np.delete(residual / residual.sum(), draft[0])) < 20


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_request_can_turn_drafting_off(tiny):
    engine = engine_with(tiny, ON, adaptive=False)
    generate(engine, PROMPTS, InferenceOptions(**{**GREEDY.to_dict(), "allow_drafting": False}))
    assert engine.metrics.snapshot().drafted_tokens == 0
    assert engine.metrics.snapshot().mean_accepted_length == 1.0


def test_rejected_drafts_leave_the_session_cache_holding_only_the_reply(tiny):
    """After a reply with drafts, the session's cached tokens are exactly the prompt and the reply
    but its last token (the rejected drafts' K/V are trimmed), and those K/V equal a fresh forward's,
    so the next turn reuses them and continues as a fresh computation would."""
    session = SessionId.new_id()
    engine = engine_with(tiny, ON, adaptive=False)
    ids = list(engine.tokenizer.encode(PROMPTS[1]))
    result = run_all(engine, [engine.submit(PROMPTS[1], GREEDY, session_id=session)])[0]
    assert engine.metrics.snapshot().drafted_tokens > engine.metrics.snapshot().accepted_tokens
    entry = engine.store.try_get(session)
    assert entry is not None
    assert list(entry.token_ids) == [*ids, *result.token_ids[:-1]]
    model = engine.model
    fresh = model.new_cache(entry.n_tokens)
    model.forward(list(entry.token_ids), fresh)
    for layer in range(model.config.n_layers):
        n = entry.n_tokens
        np.testing.assert_allclose(entry.keys(layer)[:, :n], fresh.keys(layer)[:, :n], rtol=1e-4, atol=1e-5)


# -- the real model ----------------------------------------------------------------------------------
REFERENCE_GREEDY = InferenceOptions(
    temperature=0.0, max_new_tokens=32, stop_on_eos=False, repetition_penalty=1.0
)


@pytest.mark.smollm2
@pytest.mark.parametrize("adaptive", [False, True])
def test_smollm2_greedy_with_drafts_equals_the_reference_alone_and_batched(
    smollm2, reference_prompts, adaptive
):
    """Every reference prompt alone, then all six at once, drafting (on every match when not adaptive):
    the 32 greedy tokens equal the reference's."""
    drafted = 0
    for prompt in reference_prompts:
        engine = engine_with(smollm2, ON, adaptive)
        result = generate(engine, [prompt["messages"]], REFERENCE_GREEDY)[0]
        assert list(result.token_ids) == prompt["greedy_ids"], prompt["key"]
        drafted += engine.metrics.snapshot().drafted_tokens
    assert drafted > 0
    engine = engine_with(smollm2, ON, adaptive)
    results = generate(engine, [p["messages"] for p in reference_prompts], REFERENCE_GREEDY)
    for prompt, result in zip(reference_prompts, results, strict=True):
        assert list(result.token_ids) == prompt["greedy_ids"], prompt["key"]


QUOTE = (
    "Repeat this code exactly:\n\ndef area(width, height):\n    if width < 0 or height < 0:\n"
    "        raise ValueError('negative size')\n    return width * height\n"
)


@pytest.mark.smollm2
def test_smollm2_quoting_takes_several_tokens_per_step(smollm2):
    """Where the reply quotes the prompt the drafts are mostly right: the same tokens as without
    drafting, in clearly fewer steps."""
    options = InferenceOptions(temperature=0.0, max_new_tokens=48, repetition_penalty=1.0)
    want = generate(make_engine(smollm2, OFF), [[{"role": "user", "content": QUOTE}]], options)[0]
    engine = make_engine(smollm2, ON)
    result = generate(engine, [[{"role": "user", "content": QUOTE}]], options)[0]
    assert result.token_ids == want.token_ids
    assert "return width * height" in result.text
    assert result.tokens_per_step > 1.4 and result.accepted_draft_tokens > 0
    assert want.tokens_per_step == 1.0


# -- knobs -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("draft_tokens", 17, "BatchingOptions.draft_tokens must be a whole number in [0, 16], got 17"),
        ("draft_tokens", -1, "BatchingOptions.draft_tokens must be a whole number in [0, 16], got -1"),
        ("draft_ngram_max", 0, "BatchingOptions.draft_ngram_max must be a whole number in [1, 8], got 0"),
        ("draft_ngram_max", 2.0, "BatchingOptions.draft_ngram_max must be a whole number in [1, 8], got 2.0"),
        ("speculative", "yes", "BatchingOptions.speculative must be true or false, got 'yes'"),
    ],
)
def test_bad_drafting_options_name_the_field_and_the_range(field, value, message):
    with pytest.raises(ValueError) as error:
        BatchingOptions(**{field: value})
    assert str(error.value) == message


def test_allow_drafting_must_be_a_bool():
    with pytest.raises(ValueError, match="allow_drafting = 1 is invalid; allowed: True or False"):
        InferenceOptions(allow_drafting=1)  # type: ignore[arg-type]


def test_drafting_settings_apply_between_steps(tiny):
    """Turned off mid-reply: no draft from the next step on; the reply is still the same."""
    engine = engine_with(tiny, ON, adaptive=False)
    options = InferenceOptions(**{**GREEDY.to_dict(), "max_new_tokens": 60})
    handle = engine.submit(PROMPTS[2], options)
    for _ in range(100):
        engine.step()
        if engine.metrics.snapshot().drafted_tokens:
            break
    drafted = engine.metrics.snapshot().drafted_tokens
    assert drafted > 0 and not handle.done()
    engine.update_options(batching=BatchingOptions(max_batch_wait_ms=0, draft_tokens=0))
    result = run_all(engine, [handle])[0]
    assert engine.metrics.snapshot().drafted_tokens == drafted
    assert result.token_ids == generate(make_engine(tiny, OFF), [PROMPTS[2]], options)[0].token_ids


def test_forward_tails_equals_the_full_forward_at_those_positions(tiny):
    """The logits a verifying row gets (its last n positions, batched with other rows) are the full
    forward's at those positions."""
    model, _ = tiny
    a, b = [5, 9, 13, 2, 7, 7], [3, 4, 8]
    full_a, full_b = model.forward(a), model.forward(b)  # (T, V) each, no cache
    cache_a, cache_b = model.new_cache(16), model.new_cache(16)
    model.forward(a[:2], cache_a)
    model.forward(b[:2], cache_b)
    tails = model.forward_tails([Row(np.array(a[2:]), cache_a), Row(np.array(b[2:]), cache_b)], [3, 1])
    np.testing.assert_allclose(tails[0], full_a[-3:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tails[1], full_b[-1:], rtol=1e-4, atol=1e-4)
    assert cache_a.n_tokens == len(a) and cache_b.n_tokens == len(b)
    with pytest.raises(ValueError, match="n_tails"):
        model.forward_tails([Row(np.array([1, 2]), model.new_cache(4))], [3])
