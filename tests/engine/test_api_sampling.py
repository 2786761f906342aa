"""The OpenAI-style sampling options in the engine: presence/frequency penalties and logit_bias with
OpenAI's definitions, log-probabilities that are the log-softmax of the model's own logits, n choices
forked from one prompt computation, and embeddings pooled from the model's hidden states."""

from __future__ import annotations

import numpy as np
import pytest

from engine import BatchingOptions, InferenceOptions, KvCacheOptions
from engine.embeddings import pool
from engine.logit_processing import LogitProcessor
from engine.logprobs import log_softmax, token_logprob
from engine.model import Row
from tests.fixtures.engine_helpers import make_engine, run_all

GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=12, repetition_penalty=1.0, stop_on_eos=False)
PROMPT = "the sea is wide and the sky is blue"


def options(base: InferenceOptions = GREEDY, **changes: object) -> InferenceOptions:
    return InferenceOptions(**{**base.to_dict(), **changes})


# -- penalties and bias, on fixed logits -------------------------------------------------------------
def test_presence_and_frequency_penalties_follow_openais_definition():
    """mu[j] - c[j] * frequency_penalty - (c[j] > 0) * presence_penalty, c over the generated tokens."""
    logits = np.arange(8, dtype=np.float32)
    processor = LogitProcessor(options(presence_penalty=0.5, frequency_penalty=0.25), None)
    x = processor.process(logits, context_ids=[7, 7, 7], generated=[3, 3, 5, 3])
    want = logits.copy()
    want[3] -= 3 * 0.25 + 0.5
    want[5] -= 1 * 0.25 + 0.5
    np.testing.assert_array_equal(x, want)
    assert (logits == np.arange(8)).all()  # the caller's logits are untouched


def test_logit_bias_is_added_and_minus_100_bans_the_token():
    logits = np.array([5.0, 1.0, 0.0, -1.0], dtype=np.float32)
    processor = LogitProcessor(options(logit_bias={0: -100, "3": 7.5}), None)
    x = processor.process(logits, context_ids=[], generated=[])
    np.testing.assert_allclose(x, [-95.0, 1.0, 0.0, 6.5])
    with pytest.raises(ValueError, match="logit_bias"):
        options(logit_bias={-1: 1})
    with pytest.raises(ValueError, match="logit_bias"):
        options(logit_bias={1: 101})


def test_bias_steers_the_engine_and_a_banned_token_never_comes(tiny):
    _, tok = tiny
    engine = make_engine(tiny)
    plain = run_all(engine, [engine.submit(PROMPT, GREEDY)])[0]
    banned = {t: -100.0 for t in set(plain.token_ids)}
    forced = tok.encode(" blue", parse_special=False)[0]
    results = run_all(engine, [engine.submit(PROMPT, options(logit_bias=banned)),
                               engine.submit(PROMPT, options(logit_bias={forced: 100}))])  # fmt: skip
    assert not set(results[0].token_ids) & set(banned)
    assert set(results[1].token_ids) == {forced}


def test_a_frequency_penalty_stops_a_greedy_loop(tiny):
    """The tiny model repeats itself greedily; a strong frequency penalty makes every token new."""
    engine = make_engine(tiny)
    plain, penalized = run_all(engine, [engine.submit(PROMPT, options(max_new_tokens=30)),
                                        engine.submit(PROMPT, options(max_new_tokens=30, presence_penalty=2.0,
                                                                      frequency_penalty=2.0))])  # fmt: skip
    assert len(set(plain.token_ids)) < len(plain.token_ids)
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))


# -- log-probabilities -----------------------------------------------------------------------------------
def forward_logits(model, ids):
    """The model's logits after every token of ``ids``, computed alone and without a cache."""
    return model.forward(ids)


def test_logprobs_equal_the_log_softmax_of_the_models_logits(tiny):
    """Greedy with 4 alternatives: every generated token's logprob, and its top-4, equal the
    log-softmax of a plain forward's logits at that position; greedy tokens are the same as without."""
    model, tok = tiny
    engine = make_engine(tiny)
    plain, with_lp = run_all(
        engine, [engine.submit(PROMPT, GREEDY), engine.submit(PROMPT, options(logprobs=4))]
    )
    assert with_lp.token_ids == plain.token_ids
    assert len(with_lp.logprobs) == len(with_lp.token_ids)
    prompt = tok.encode(PROMPT)
    logits = forward_logits(model, [*prompt, *with_lp.token_ids])[len(prompt) - 1 : -1]  # (n, V)
    for entry, row, token in zip(with_lp.logprobs, logits, with_lp.token_ids, strict=True):
        want = log_softmax(row)
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(want[token], abs=1e-4)
        assert len(entry.top) == 4
        assert [i for i, _ in entry.top] == list(np.argsort(-want, kind="stable")[:4])
        np.testing.assert_allclose([v for _, v in entry.top], np.sort(want)[::-1][:4], atol=1e-4)
        assert entry.top[0][0] == token  # greedy takes the most likely


def test_prompt_logprobs_equal_the_log_softmax_of_each_prefix(tiny):
    """The prompt's log-probabilities (completions' echo), computed even though the prompt is cached
    by another session, and across prefill chunks of 5 tokens."""
    model, tok = tiny
    engine = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, max_prefill_chunk_tokens=5))
    run_all(engine, [engine.submit(PROMPT, GREEDY)])  # now the prompt is cached (prefix sharing)
    result = run_all(engine, [engine.submit(PROMPT, options(prompt_logprobs=2, max_new_tokens=2))])[0]
    prompt = tok.encode(PROMPT)
    assert len(result.prompt_logprobs) == len(prompt) and result.prompt_logprobs[0] is None
    logits = forward_logits(model, prompt)
    for i, entry in enumerate(result.prompt_logprobs[1:], start=1):
        assert entry is not None and entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(log_softmax(logits[i - 1])[prompt[i]], abs=1e-4)
        assert len(entry.top) == 2


def test_exactly_k_alternatives_even_when_the_constraint_leaves_fewer():
    logits = np.array([0.0, -np.inf, 1.0, -np.inf, -np.inf], dtype=np.float32)
    entry = token_logprob(logits, 2, 4)
    assert [i for i, _ in entry.top] == [2, 0, 1, 3]
    assert entry.top[2][1] == -np.inf


# -- n choices forked from one prompt -------------------------------------------------------------------
def test_n_choices_share_one_prompt_computation_and_equal_separate_seeded_requests(tiny):
    """Four seeded choices: the first computes the prompt, the others copy its K/V (the whole prompt:
    their first token is sampled from the first's logits) and decode beside it; each equals a
    separate request with its seed, and no prompt token is computed twice."""
    no_drafts = BatchingOptions(max_batch_wait_ms=0, speculative=False)  # every fed token is a real one
    engine = make_engine(tiny, no_drafts, KvCacheOptions(share_prefixes=False))  # the fork alone shares
    engine.model = fed = FedTokens(engine.model)
    choices = [options(temperature=1.0, top_k=0, seed=40 + i, max_new_tokens=20) for i in range(4)]
    first = engine.submit(PROMPT, choices[0])
    rest = [engine.submit(PROMPT, o, fork_of=first) for o in choices[1:]]
    forked = run_all(engine, [first, *rest])
    n_prompt = forked[0].prompt_tokens
    assert [r.reused_tokens for r in forked] == [0] + [n_prompt] * 3
    assert engine.metrics.snapshot().prompt_tokens == 4 * n_prompt  # counted per request ...
    assert fed.n_tokens == n_prompt + 4 * 19  # ... computed once; each choice feeds back 19 of its 20 tokens
    alone = [run_all(e, [e.submit(PROMPT, o)])[0] for o in choices for e in [make_engine(tiny)]]
    assert [r.token_ids for r in forked] == [r.token_ids for r in alone]
    assert len({r.token_ids for r in forked}) == 4


class FedTokens:
    """The real model, counting the token rows fed to it (prompt and decode tokens alike)."""

    def __init__(self, model):
        self._model, self.n_tokens = model, 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def forward_last(self, rows):
        self.n_tokens += sum(len(r.ids) for r in rows)
        return self._model.forward_last(rows)

    def forward_tails(self, rows, n_tails, *hidden):
        self.n_tokens += sum(len(r.ids) for r in rows)
        return self._model.forward_tails(rows, n_tails, *hidden)


def test_a_fork_whose_parent_ended_early_computes_its_own_prompt(tiny):
    engine = make_engine(tiny)
    first = engine.submit(PROMPT, options(max_new_tokens=1))
    run_all(engine, [first])
    child = engine.submit(PROMPT, GREEDY, fork_of=first)
    assert (
        run_all(engine, [child])[0].token_ids == run_all(engine, [engine.submit(PROMPT, GREEDY)])[0].token_ids
    )


# -- embeddings --------------------------------------------------------------------------------------------
def hidden_states(model, ids):
    hidden: list[np.ndarray] = []
    model.forward_tails([Row(np.asarray(ids), model.new_cache(len(ids)))], [1], hidden)
    return hidden[0]  # (T, D)


def test_embeddings_equal_pooled_hidden_states_batched_with_chat_and_chunked(tiny):
    """Three inputs and two chat requests in the same steps, prefill chunks of 4 tokens: each
    embedding is the L2-normalized mean of the final hidden states of its input alone."""
    model, tok = tiny
    engine = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, max_prefill_chunk_tokens=4))
    texts = ["the sea is wide", "hello there, how are you today? I am fine", "blue"]
    chats = [engine.submit(PROMPT, GREEDY), engine.submit("why is the sky blue?", GREEDY)]
    handles = [engine.submit_embedding(t) for t in texts]
    results = run_all(engine, [*handles, *chats])
    assert engine.metrics.snapshot().max_batch_size_seen >= 4
    for text, result in zip(texts, results[:3], strict=True):
        ids = tok.encode(text, parse_special=False)
        want = pool(hidden_states(model, ids))
        assert result.embedding is not None and result.embedding.shape == (model.config.hidden_size,)
        np.testing.assert_allclose(result.embedding, want, atol=2e-5)
        assert np.linalg.norm(result.embedding) == pytest.approx(1.0, abs=1e-5)
        assert result.prompt_tokens == len(ids) and result.token_ids == ()
    for prompt, chat in zip((PROMPT, "why is the sky blue?"), results[3:], strict=True):
        alone = make_engine(tiny)
        assert chat.token_ids == run_all(alone, [alone.submit(prompt, GREEDY)])[0].token_ids
    assert not engine.store.sessions()  # no K/V kept for embeddings or anonymous requests


def test_embedding_input_errors_are_clear(tiny):
    engine = make_engine(tiny)
    with pytest.raises(ValueError, match="empty"):
        engine.submit_embedding("   ")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit_embedding([1, 2, 10**6])
    with pytest.raises(ValueError, match="256"):
        engine.submit_embedding("word " * 400)
