"""The batched engine: batched greedy output equals each request alone, in every mode; multi-turn
reuse; per-request sampling; cancellation, timeouts, queue limits, shutdown."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine import (
    BatchingOptions,
    EngineStoppedError,
    InferenceOptions,
    InMemoryRuntimeMetrics,
    KvCacheOptions,
    QueueFullError,
    SessionId,
)
from tests.fixtures.engine_helpers import make_engine, run_all

GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=12, stop_on_eos=False)
MODES = {
    "continuous": BatchingOptions(max_batch_wait_ms=0),
    "prefill_only": BatchingOptions(prefill_only=True, max_batch_wait_ms=0),
    "sequential": BatchingOptions(enabled=False),
}
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "small",
    "birds",
    "sing",
]


def prompts(n: int) -> list[str]:
    """n raw prompts of different lengths (3 .. 40 words)."""
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + 5 * i)) for i in range(n)]


def alone(pair, prompt, options=GREEDY):
    engine = make_engine(pair)
    return run_all(engine, [engine.submit(prompt, options)])[0]


# -- equality with running alone -----------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_eight_concurrent_greedy_requests_equal_each_alone(tiny, mode):
    texts = prompts(8)
    solo = [alone(tiny, p).token_ids for p in texts]
    engine = make_engine(tiny, MODES[mode], max_concurrent_sessions=8)
    results = run_all(engine, [engine.submit(p, GREEDY) for p in texts])
    assert [r.token_ids for r in results] == solo
    assert all(r.finish_reason == "length" and r.generated_tokens == 12 for r in results)
    snap = engine.metrics.snapshot()
    if mode == "continuous":
        assert snap.average_batch_size > 3
    elif mode == "prefill_only":  # prompts together, then every decode step one row
        assert snap.max_batch_size_seen > 1 and snap.average_batch_size < 1.5
    else:  # one request at a time: its prompt and first token in one step, then 11 decode steps
        # (fewer where a step took accepted drafted tokens too)
        assert (snap.average_batch_size, snap.max_batch_size_seen) == (1.0, 1)
        assert snap.steps == 8 * 12 - snap.accepted_tokens


def test_cache_disabled_recomputes_and_still_matches(tiny):
    texts = prompts(3)
    solo = [alone(tiny, p).token_ids for p in texts]
    engine = make_engine(tiny, cache=KvCacheOptions(enabled=False))
    results = run_all(engine, [engine.submit(p, GREEDY) for p in texts])
    assert [r.token_ids for r in results] == solo
    assert engine.store.get_stats().current_sessions == 0  # no cache at all


def test_chunked_prefill_equals_one_shot(tiny):
    long_prompt = " ".join(WORDS * 3)
    solo = alone(tiny, long_prompt)
    engine = make_engine(tiny, BatchingOptions(max_prefill_chunk_tokens=16, max_batch_wait_ms=0))
    events = []
    handle = engine.submit(long_prompt, GREEDY, on_event=events.append)
    result = run_all(engine, [handle])[0]
    assert result.token_ids == solo.token_ids
    progress = [(e.prompt_done, e.prompt_total) for e in events if e.kind == "prefill"]
    assert progress and all(done < total for done, total in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)


@pytest.mark.smollm2
@pytest.mark.parametrize("mode", MODES)
def test_smollm2_batched_greedy_equals_reference(smollm2, reference_prompts, mode):
    """All six reference prompts at once (different lengths): each equals the reference alone."""
    engine = make_engine(smollm2, MODES[mode])
    n_new = 32 if mode == "continuous" else 12  # the slow baselines check a shorter continuation
    options = InferenceOptions(
        temperature=0.0, max_new_tokens=n_new, stop_on_eos=False, repetition_penalty=1.0
    )
    handles = [engine.submit(p["messages"], options) for p in reference_prompts]
    results = run_all(engine, handles)
    for prompt, result in zip(reference_prompts, results, strict=True):
        assert list(result.token_ids) == prompt["greedy_ids"][:n_new], prompt["key"]


# -- multi-turn ----------------------------------------------------------------------------------
def check_preempted_equals_alone(pair, prompt_texts, options, n_budget_tokens):
    """Greedy requests under a KV budget too small for all of them at once: at least one is
    preempted and resumed from its prompt + text so far, and every output equals the request alone."""
    model, _ = pair
    bpt = model.kv_shape().bytes_per_token
    cache = KvCacheOptions(max_bytes_total=n_budget_tokens * bpt, max_bytes_per_session=n_budget_tokens * bpt)
    engine = make_engine(pair, cache=cache)
    handles = [engine.submit(p, options) for p in prompt_texts]
    results = run_all(engine, handles)
    assert engine.metrics.snapshot().preemptions >= 1
    for prompt, result in zip(prompt_texts, results, strict=True):
        reference = alone(pair, prompt, options)
        assert result.finish_reason == reference.finish_reason == "length"
        assert result.token_ids == reference.token_ids


def test_preempted_and_resumed_greedy_output_equals_alone(tiny):
    options = InferenceOptions(temperature=0.0, max_new_tokens=70, stop_on_eos=False)
    texts = prompts(4)[1:3]  # 8 and 13 words: ~20 and ~30 tokens, ~90 and ~100 with the replies
    check_preempted_equals_alone(tiny, texts, options, n_budget_tokens=150)


@pytest.mark.smollm2
def test_smollm2_preempted_and_resumed_greedy_output_equals_alone(smollm2):
    options = InferenceOptions(temperature=0.0, max_new_tokens=48, stop_on_eos=False)
    texts = ["Explain why the sky is blue.", "Write a haiku about memory."]
    check_preempted_equals_alone(smollm2, texts, options, n_budget_tokens=100)


def test_second_turn_reuses_the_first_and_equals_a_cold_run(tiny):
    _, tok = tiny
    engine = make_engine(tiny)
    session = SessionId.new_id()
    turn1 = [{"role": "user", "content": "hello there, how are you"}]
    r1 = run_all(engine, [engine.submit(turn1, GREEDY, session_id=session)])[0]
    turn2 = [*turn1, {"role": "assistant", "content": r1.text}, {"role": "user", "content": "tell me more"}]
    r2 = run_all(engine, [engine.submit(turn2, GREEDY, session_id=session)])[0]
    cold = alone(tiny, turn2)
    assert r2.token_ids == cold.token_ids
    # turn 1's prompt is a prefix of turn 2's; the reply's tokens are reused as far as they re-tokenize alike
    ids1, ids2 = tok.encode_messages(turn1), tok.encode_messages(turn2)
    assert ids2[: len(ids1)] == ids1
    assert r2.reused_tokens >= len(ids1)
    assert engine.store.get_stats().reused_tokens == r2.reused_tokens


# -- sampling in a shared batch ------------------------------------------------------------------
def test_seeded_sampling_is_the_same_with_or_without_company(tiny):
    sampled = InferenceOptions(temperature=1.0, top_k=0, top_p=1.0, seed=1234, max_new_tokens=12)
    target = "the quick brown fox"
    solo = alone(tiny, target, sampled)
    engine = make_engine(tiny)
    others = [
        engine.submit(p, InferenceOptions(temperature=t, seed=i, max_new_tokens=8))
        for i, (p, t) in enumerate(zip(prompts(4), (0.0, 0.5, 1.5, 0.9), strict=True))
    ]
    mine = engine.submit(target, sampled)
    results = run_all(engine, [*others, mine])
    assert results[-1].token_ids == solo.token_ids
    assert (
        results[0].token_ids
        == alone(tiny, prompts(4)[0], InferenceOptions(temperature=0, max_new_tokens=8)).token_ids
    )


# -- cancellation, timeouts, queue, shutdown ----------------------------------------------------
def test_cancelling_one_request_leaves_the_others_unchanged(tiny):
    texts = prompts(4)
    solo = [alone(tiny, p).token_ids for p in texts]
    engine = make_engine(tiny)
    handles = [engine.submit(p, GREEDY) for p in texts]
    for _ in range(4):
        engine.step()
    handles[1].cancel()
    results = run_all(engine, handles)
    assert results[1].finish_reason == "cancelled"
    assert results[1].token_ids == solo[1][: len(results[1].token_ids)]
    assert [results[i].token_ids for i in (0, 2, 3)] == [solo[i] for i in (0, 2, 3)]
    assert engine.store.get_stats().pinned_sessions == 0


def test_cancel_mid_prefill_keeps_the_session_consistent(tiny):
    engine = make_engine(tiny, BatchingOptions(max_prefill_chunk_tokens=8, max_batch_wait_ms=0))
    session = SessionId.new_id()
    messages = [{"role": "user", "content": " ".join(WORDS * 3)}]
    handle = engine.submit(messages, GREEDY, session_id=session)
    engine.step()
    engine.step()
    handle.cancel()
    assert run_all(engine, [handle])[0].finish_reason == "cancelled"
    entry = engine.store.try_get(session)
    assert entry is not None and 0 < entry.n_tokens < len(engine.tokenizer.encode_messages(messages))
    again = run_all(engine, [engine.submit(messages, GREEDY, session_id=session)])[0]
    assert again.reused_tokens == 16  # the two chunks computed before the cancel
    assert again.token_ids == alone(tiny, messages).token_ids


def test_timeout_ends_a_request_with_its_partial_output(tiny):
    engine = make_engine(tiny)
    handle = engine.submit("the quick", InferenceOptions(max_new_tokens=10_000, max_time_ms=5, temperature=0))
    result = run_all(engine, [handle])[0]
    assert result.finish_reason == "timeout"
    assert result.total_ms >= 5
    assert engine.metrics.snapshot().timed_out == 1


def test_queue_full_is_refused_at_submit(tiny):
    engine = make_engine(tiny, BatchingOptions(max_total_queued_requests=2))
    engine.submit("a", GREEDY)
    engine.submit("b", GREEDY)
    with pytest.raises(QueueFullError, match=r"queue is full \(2 waiting\); try again later"):
        engine.submit("c", GREEDY)
    snap = engine.metrics.snapshot()
    assert (snap.submitted, snap.rejected) == (3, 1)


def test_same_session_twice_waits_behind_the_first(tiny):
    engine = make_engine(tiny)
    session = SessionId.new_id()
    events: list[tuple[int, str]] = []  # (request id, kind) in the order the engine emitted them
    on_event = lambda ev: events.append((ev.request_id, "end" if ev.result else ev.kind))  # noqa: E731
    first, second = (
        engine.submit([{"role": "user", "content": text}], GREEDY, session_id=session, on_event=on_event)
        for text in ("hello", "hello again")
    )
    engine.step()
    assert [r.seq.request_id for r in engine.scheduler.running] == [first.request_id]
    r1, r2 = run_all(engine, [first, second])
    assert r1.finish_reason == r2.finish_reason == "length"
    # admission order, not clocks: the second's first event comes after the first's end
    first_end = events.index((first.request_id, "end"))
    second_start = next(i for i, (rid, _) in enumerate(events) if rid == second.request_id)
    assert second_start > first_end, events


def test_stop_fails_waiting_and_running_requests_clearly(tiny):
    engine = make_engine(tiny)
    running = engine.submit("the quick brown", InferenceOptions(max_new_tokens=500))
    engine.step()
    waiting = [engine.submit(p, GREEDY) for p in prompts(2)]
    engine.stop()
    for handle in [running, *waiting]:
        result = handle.result(1)
        assert result.finish_reason == "error" and "stopped" in (result.error or "")
    with pytest.raises(EngineStoppedError):
        engine.submit("more", GREEDY)
    assert engine.store.get_stats().pinned_sessions == 0


def test_background_driver_and_asyncio_api(tiny):
    engine = make_engine(tiny)
    engine.start()
    driver = engine.driver.thread
    assert driver is not None and driver.name == "smallmind-engine"
    try:
        texts = prompts(3)

        async def main():
            results = await asyncio.gather(*(engine.generate(p, GREEDY) for p in texts))
            pieces = [ev.text async for ev in engine.generate_streaming(texts[0], GREEDY)]
            return results, pieces

        results, pieces = asyncio.run(main())
        assert [r.token_ids for r in results] == [alone(tiny, p).token_ids for p in texts]
        assert "".join(pieces) == results[0].text
    finally:
        engine.stop()
    assert not driver.is_alive()  # other tests' engines may still have their own drivers


def test_context_trimming_drops_oldest_turns(tiny):
    engine = make_engine(tiny, cache=KvCacheOptions(max_tokens_per_session=120))
    system = {"role": "system", "content": "be brief"}
    history = []
    for i in range(12):
        history += [{"role": "user", "content": f"question {i} " + " ".join(WORDS)},
                    {"role": "assistant", "content": "answer " + " ".join(WORDS[:5])}]  # fmt: skip
    messages = [system, *history, {"role": "user", "content": "last question"}]
    options = InferenceOptions(temperature=0, max_new_tokens=10)
    result = run_all(engine, [engine.submit(messages, options)])[0]
    assert result.context_trimmed and result.finish_reason == "length"
    assert result.prompt_tokens + 10 <= 120


def test_mixed_stats_arithmetic(tiny):
    """6 requests of 12 tokens, 4 at a time: 12 steps of 4 rows (2 waiting), then 12 steps of 2 rows."""
    engine = make_engine(tiny, BatchingOptions(max_batch_size=4, max_batch_wait_ms=0))
    texts = prompts(6)
    handles = [engine.submit(p, GREEDY) for p in texts]
    results = run_all(engine, handles)
    snap = engine.metrics.snapshot()
    assert snap.submitted == snap.completed == 6 and snap.in_flight == 0
    assert (snap.steps, snap.average_batch_size, snap.max_batch_size_seen) == (24, 3.0, 4)
    assert snap.average_queue_depth == (12 * 2 + 12 * 0) / 24
    assert snap.generated_tokens == 6 * 12
    assert [r.prompt_tokens for r in results] == [len(engine.tokenizer.encode(p)) for p in texts]
    assert snap.prompt_tokens == sum(r.prompt_tokens for r in results)
    assert np.isfinite(snap.ttft_p50_ms) and snap.ttft_p50_ms > 0


def test_latency_percentiles_hand_worked():
    """The percentiles are NumPy's linear interpolation over the recent samples."""
    metrics = InMemoryRuntimeMetrics()
    for gap in [40.0, 10.0, 30.0, 20.0, 1000.0]:
        metrics.record_inter_token(gap)
    for ttft in [100.0, 300.0]:
        metrics.record_ttft(ttft)
    metrics.record_tokens(7, now=time.monotonic())
    snap = metrics.snapshot()
    # sorted gaps 10, 20, 30, 40, 1000: p50 is the middle one; p95 sits at rank 0.95 * 4 = 3.8,
    # 80% of the way from 40 to 1000
    assert (snap.inter_token_p50_ms, snap.inter_token_max_ms) == (30.0, 1000.0)
    assert snap.inter_token_p95_ms == pytest.approx(40.0 + 0.8 * 960.0)
    assert (snap.ttft_p50_ms, snap.ttft_p95_ms) == (200.0, pytest.approx(100.0 + 0.95 * 200.0))
    assert snap.tokens_per_second == 7 / 5.0  # tokens over the last WINDOW_S = 5 s
