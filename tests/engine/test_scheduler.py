"""The scheduler's policy, checked without the model: a scripted model records every forward pass
(which rows, how many tokens) and predicts "previous token + 1", so outputs are known in advance."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    CacheBudgetError,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    SessionId,
)
from engine.gguf import ModelConfig
from engine.kv_cache import ModelShape
from engine.model import Row
from engine.scheduler import RunningRequest
from tests.fixtures.engine_helpers import run_all

VOCAB = 300


@dataclass
class ScriptedModel:
    """Stands in for Model: appends to the caches like the real one; logits favour last id + 1."""

    config: ModelConfig = field(
        default_factory=lambda: ModelConfig("llama", 1, 1, 1, 2, 2, 2, VOCAB, 4096, 1e4, 1e-5)
    )
    calls: list[list[tuple[int, int]]] = field(default_factory=list)  # per forward: (start, n_tokens) per row
    caches: list[list[int]] = field(default_factory=list)  # per forward: id() of each row's cache
    fail_next: bool = False

    def kv_shape(self, dtype: str = "float32") -> ModelShape:
        return ModelShape(1, 1, 2, dtype)

    def forward_last(self, rows: list[Row]) -> np.ndarray:
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("scripted failure")
        self.calls.append([(r.cache.n_tokens, len(r.ids)) for r in rows])
        self.caches.append([id(r.cache) for r in rows])
        logits = np.zeros((len(rows), VOCAB), dtype=np.float32)
        for i, row in enumerate(rows):
            row.cache.ensure_capacity(row.cache.n_tokens + len(row.ids))
            row.cache.append(row.ids)
            logits[i, (int(row.ids[-1]) + 1) % VOCAB] = 10.0
        return logits

    def forward_tails(self, rows: list[Row], n_tails: list[int]) -> list[np.ndarray]:
        """For rows verifying drafted tokens: the logits at each of the last n positions."""
        last = self.forward_last(rows)
        out = []
        for row, n, row_logits in zip(rows, n_tails, last, strict=True):
            tail = np.zeros((n, VOCAB), dtype=np.float32)
            tail[np.arange(n), (row.ids[-n:].astype(np.int64) + 1) % VOCAB] = 10.0
            assert np.array_equal(tail[-1], row_logits)
            out.append(tail)
        return out


GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=3, stop_on_eos=False)


@pytest.fixture
def scripted(tiny):
    _, tok = tiny

    def make(batching: BatchingOptions, cache: KvCacheOptions | None = None):
        model = ScriptedModel()
        engine = BatchedInferenceEngine(model, tok, batching, LruKvCacheStore(cache or KvCacheOptions()))  # type: ignore[arg-type]
        return model, engine

    return make


def raw(n_tokens: int, start: int = 0) -> str:
    """A raw prompt of exactly n_tokens tokens: the pre-tokenizer splits digits one by one."""
    return "".join(str((start + i) % 10) for i in range(n_tokens))


def test_fifo_admission_within_max_batch_size(scripted):
    model, engine = scripted(BatchingOptions(max_batch_size=2, max_batch_wait_ms=0))
    finished: list[int] = []
    handles = [
        engine.submit(raw(4, i), GREEDY, on_event=lambda ev: ev.result and finished.append(ev.request_id))
        for i in range(5)
    ]
    engine.step()
    assert len(model.calls[0]) == 2  # two rows admitted, three wait
    assert [r.seq.request_id for r in engine.scheduler.running] == [h.request_id for h in handles[:2]]
    results = run_all(engine, handles)
    assert all(len(call) <= 2 for call in model.calls)
    assert all(r.generated_tokens == 3 for r in results)
    assert finished == [h.request_id for h in handles]  # FIFO: equal work, so they end in submission order


def test_prefill_budget_is_shared_and_decoders_keep_streaming(scripted):
    model, engine = scripted(BatchingOptions(max_prefill_chunk_tokens=8, max_batch_wait_ms=0))
    decoder = engine.submit(raw(4), InferenceOptions(temperature=0, max_new_tokens=40, stop_on_eos=False))
    engine.step()  # the short prompt is prefilled in one chunk
    decoder_cache = id(engine.scheduler.running[0].seq.cache)
    long_a, long_b = engine.submit(raw(30, 1), GREEDY), engine.submit(raw(30, 2), GREEDY)
    model.calls.clear()
    model.caches.clear()
    for _ in range(4):  # 60 prompt tokens at 8 per step: both long prompts are still prefilling
        engine.step()
    for call, caches in zip(model.calls, model.caches, strict=True):
        mine = caches.index(decoder_cache)  # the decoding request gets its token every step
        assert call[mine][1] == 1
        assert sum(n for i, (_, n) in enumerate(call) if i != mine) <= 8
    # the older long prompt gets the budget first: 8, 8, 8, then 6 + 2 for the younger one
    firsts = [[n for i, (_, n) in enumerate(call) if caches[i] != decoder_cache]
              for call, caches in zip(model.calls, model.caches, strict=True)]  # fmt: skip
    assert firsts == [[8], [8], [8], [6, 2]]
    run_all(engine, [decoder, long_a, long_b])


def test_prefill_only_mode_batches_prompts_and_decodes_one_by_one(scripted):
    model, engine = scripted(BatchingOptions(prefill_only=True, max_batch_wait_ms=0))
    handles = [engine.submit(raw(6, i), GREEDY) for i in range(3)]
    run_all(engine, handles)
    assert [n for _, n in model.calls[0]] == [6, 6, 6]  # one forward with the three prompts
    assert all(len(call) == 1 and call[0][1] == 1 for call in model.calls[1:])  # then one row each


def test_sequential_mode_runs_one_request_at_a_time(scripted):
    model, engine = scripted(BatchingOptions(enabled=False))
    events: list[int] = []  # the request id of every event, in the order the engine emitted them
    handles = [engine.submit(raw(6, i), GREEDY, on_event=lambda ev: events.append(ev.request_id))
               for i in range(3)]  # fmt: skip
    run_all(engine, handles)
    assert all(len(call) == 1 for call in model.calls)
    assert len(model.calls) == 3 * 3  # per request: prefill+first token, then 2 decode steps
    # admitted in submission order, each one run to its end before the next one starts
    caches = [c for (c,) in model.caches]
    assert caches[0:3] == [caches[0]] * 3 and caches[3:6] == [caches[3]] * 3 and caches[6:] == [caches[6]] * 3
    ids = [h.request_id for h in handles]
    assert list(dict.fromkeys(events)) == ids  # first events in submission order
    assert events == sorted(events, key=ids.index)  # and never interleaved


def test_idle_engine_waits_for_company_then_runs(scripted):
    model, engine = scripted(BatchingOptions(max_batch_size=3, max_batch_wait_ms=10_000))
    first = engine.submit(raw(4), GREEDY)
    assert engine.step() is False and model.calls == []  # waits for others to batch with
    assert 0 < engine.seconds_until_ready() <= 10.0
    others = [engine.submit(raw(4, i), GREEDY) for i in (1, 2)]
    assert engine.seconds_until_ready() == 0.0  # a full batch need not wait
    assert engine.step() is True and len(model.calls[0]) == 3
    run_all(engine, [first, *others])


def test_tokens_come_out_in_order_with_the_scripted_rule(scripted, tiny):
    _, tok = tiny
    _, engine = scripted(BatchingOptions(max_batch_wait_ms=0))
    prompt = raw(5)
    result = run_all(engine, [engine.submit(prompt, GREEDY)])[0]
    last = tok.encode(prompt)[-1]
    assert list(result.token_ids) == [last + 1, last + 2, last + 3]


def test_a_failed_forward_fails_its_batch_and_the_engine_keeps_serving(scripted):
    model, engine = scripted(BatchingOptions(max_batch_wait_ms=0))
    doomed = [engine.submit(raw(4, i), GREEDY) for i in range(2)]
    model.fail_next = True
    engine.step()
    for handle in doomed:
        result = handle.result(0)
        assert result.finish_reason == "error" and "scripted failure" in (result.error or "")
    after = run_all(engine, [engine.submit(raw(4), GREEDY)])[0]
    assert after.finish_reason == "length"
    stats = engine.store.get_stats()
    assert stats.pinned_sessions == 0 and stats.current_sessions == 0  # anonymous sessions released
    snap = engine.metrics.snapshot()
    assert (snap.failed, snap.completed, snap.in_flight) == (2, 1, 0)


# ---------------------------------------------------------------------------------------------
# Memory pressure: wait, preempt, never fail a request that fits alone
# ---------------------------------------------------------------------------------------------
BPT = ModelShape(1, 1, 2).bytes_per_token  # the scripted model's 16 bytes a token


def budget(n_tokens: int) -> KvCacheOptions:
    return KvCacheOptions(max_bytes_total=n_tokens * BPT, max_bytes_per_session=n_tokens * BPT)


def run_checked(engine, handles, max_steps: int = 5_000):
    """run_all, checking after every step that the entries stay within the byte budget."""
    for _ in range(max_steps):
        if all(h.done() for h in handles):
            return [h.result(0) for h in handles]
        engine.step()
        stats = engine.store.get_stats()
        assert stats.current_bytes <= stats.max_bytes_total, stats
    raise AssertionError(f"requests did not finish within {max_steps} steps")


def test_a_new_request_waits_for_memory_at_the_head_of_the_queue(scripted):
    _, engine = scripted(BatchingOptions(max_batch_wait_ms=0), budget(64))
    first = engine.submit(raw(4), InferenceOptions(temperature=0, max_new_tokens=20, stop_on_eos=False))
    engine.step()  # the first request holds the whole budget (64 tokens reserved) and is pinned
    kinds: list[str] = []
    first_text: dict[str, float] = {}  # when each waiting request's first text arrived

    def heard(name: str, ev) -> None:
        if ev.text and name not in first_text:
            first_text[name] = time.perf_counter()

    second = engine.submit(
        raw(4, 3), GREEDY, on_event=lambda ev: (kinds.append(ev.kind), heard("second", ev))
    )
    third = engine.submit(raw(4, 5), GREEDY, on_event=lambda ev: heard("third", ev))
    engine.step()
    assert not second.done() and kinds == ["waiting"]
    snap = engine.metrics.snapshot()
    assert (snap.waiting_for_memory, snap.queue_depth, snap.running) == (1, 2, 1)
    results = run_checked(engine, [first, second, third])
    assert [r.finish_reason for r in results] == ["length"] * 3
    assert [r.generated_tokens for r in results] == [20, 3, 3]
    assert kinds[0] == "waiting" and kinds[-1] == "done" and "waiting" not in kinds[1:]
    snap = engine.metrics.snapshot()
    assert (snap.preemptions, snap.waiting_for_memory, snap.failed) == (0, 0, 0)
    assert results[1].ttft_ms is not None and results[2].ttft_ms is not None
    # nothing overtook the head of the queue (their ttfts, each from its own submission, can tie the
    # other way when both start in one step: the third was submitted later)
    assert first_text["third"] >= first_text["second"]


def test_a_request_that_cannot_grow_preempts_the_most_recently_admitted(scripted, tiny):
    _, tok = tiny
    model, engine = scripted(BatchingOptions(max_batch_wait_ms=0), budget(128))
    options = InferenceOptions(temperature=0, max_new_tokens=100, stop_on_eos=False)
    texts: dict[str, list[str]] = {"a": [], "b": []}
    older = engine.submit(raw(4), options, on_event=lambda ev: texts["a"].append(ev.text))
    younger = engine.submit(raw(4, 5), options, on_event=lambda ev: texts["b"].append(ev.text))
    engine.step()
    assert [n for _, n in model.calls[0]] == [4, 4]  # both admitted: 64 tokens reserved each
    a, b = run_checked(engine, [older, younger])
    assert (a.finish_reason, b.finish_reason) == ("length", "length")
    for result, prompt in ((a, raw(4)), (b, raw(4, 5))):
        last = tok.encode(prompt)[-1]  # the scripted rule: every token is the previous + 1
        assert list(result.token_ids) == [(last + k) % VOCAB for k in range(1, 101)]
    assert "".join(texts["a"]) == a.text and "".join(texts["b"]) == b.text
    snap = engine.metrics.snapshot()
    assert snap.preemptions >= 1 and snap.failed == 0
    assert a.total_ms < b.total_ms  # the older request was never preempted
    # the younger one resumed by recomputing its prompt + text so far in one prefill
    assert any(start == 0 and n > 4 for call in model.calls for start, n in call)


def test_shrinking_the_budget_live_preempts_instead_of_failing(scripted):
    _, engine = scripted(BatchingOptions(max_batch_wait_ms=0), budget(256))
    options = InferenceOptions(temperature=0, max_new_tokens=40, stop_on_eos=False)
    handles = [engine.submit(raw(4, i), options) for i in range(4)]
    engine.step()
    assert engine.store.get_stats().current_bytes == 256 * BPT  # four sessions of 64 tokens
    engine.update_options(cache=budget(128))
    engine.step()
    stats, snap = engine.store.get_stats(), engine.metrics.snapshot()
    assert stats.current_bytes <= 128 * BPT and snap.preemptions == 2 and snap.running == 2
    results = run_checked(engine, handles)
    assert all(r.finish_reason == "length" and r.generated_tokens == 40 for r in results)
    assert engine.metrics.snapshot().failed == 0


def test_a_request_that_cannot_fit_even_alone_is_refused_at_submit(scripted):
    cache = budget(64)
    # The options' validation keeps a session within max_bytes_total, so only a limit it does not
    # cover can make a request too big for the budget alone: simulate one by bypassing it.
    object.__setattr__(cache, "max_bytes_per_session", 1000 * BPT)
    _, engine = scripted(BatchingOptions(max_batch_wait_ms=0), cache)
    with pytest.raises(CacheBudgetError) as info:
        engine.submit(raw(10), InferenceOptions(max_new_tokens=60))
    message = str(info.value)
    assert "1,120 bytes" in message and "max_bytes_total=1,024" in message and "max_new_tokens=60" in message
    assert engine.metrics.snapshot().submitted == 0 and not engine.has_work


PRESSURE_SEEN: Counter[str] = Counter()  # what the property test's examples exercised


@st.composite
def pressure_cases(draw: st.DrawFn) -> dict:
    """A KV budget, a batch size and requests that each fit the budget alone (prompt + reply)."""
    n_budget = draw(st.integers(8, 300))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        n_prompt = draw(st.integers(1, n_budget - 1))
        max_new = draw(st.integers(1, min(80, n_budget - n_prompt)))
        session = draw(st.sampled_from([None, "s0", "s1", "s2"]))  # a session, or anonymous
        requests.append((n_prompt, max_new, session, draw(st.booleans())))  # last: cancelled later
    largest = max(p + m for p, m, _, _ in requests)
    return {
        "n_budget": n_budget,
        "batch": draw(st.integers(1, 8)),
        "chunk": draw(st.sampled_from([4, 16, 256])),
        "requests": requests,
        "shrink_to": draw(st.none() | st.integers(largest, n_budget)),  # a live shrink, still fitting
        "shrink_at": draw(st.integers(0, 30)),
    }


def watch_progress_before_preemption(engine: BatchedInferenceEngine, model: ScriptedModel) -> None:
    """Fail if a running request is preempted before a forward pass computed part of it since it was
    (re)admitted, or if the oldest running request is ever preempted while others run."""
    admitted_at: dict[int, int] = {}  # request id -> number of forwards when it joined the batch

    class Watch:
        def admitted(self, run: RunningRequest, running: Sequence[RunningRequest]) -> None:
            admitted_at[run.seq.request_id] = len(model.caches)

        def preempting(self, run: RunningRequest, running: Sequence[RunningRequest]) -> None:
            since = model.caches[admitted_at[run.seq.request_id] :]
            assert any(id(run.seq.cache) in caches for caches in since), "preempted before any progress"
            assert run is not running[0] or len(running) == 1, "the oldest was preempted"

    engine.scheduler.observers.append(Watch())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=pressure_cases())
def test_every_request_that_fits_alone_is_served_under_memory_pressure(scripted, case):
    PRESSURE_SEEN["preemptions"] += serve_under_pressure(scripted, case)


def serve_under_pressure(scripted, case: dict) -> int:
    """Serve ``case`` (see pressure_cases) checking every step; returns the preemptions it caused."""
    model, engine = scripted(
        BatchingOptions(
            max_batch_size=case["batch"], max_batch_wait_ms=0, max_prefill_chunk_tokens=case["chunk"]
        ),
        budget(case["n_budget"]),
    )
    watch_progress_before_preemption(engine, model)
    handles, cancel_at = [], {}
    for i, (n_prompt, max_new, session, cancel) in enumerate(case["requests"]):
        options = InferenceOptions(temperature=0, max_new_tokens=max_new, stop_on_eos=False)
        sid = None if session is None else SessionId(session)
        handles.append(engine.submit(raw(n_prompt, i), options, session_id=sid))
        if cancel:
            cancel_at[i] = i + 3
    work = sum(p + m for p, m, _, _ in case["requests"])
    max_steps = 10 * work + 100  # no starvation: every request ends within a bounded number of steps
    for n_step in range(max_steps):
        if all(h.done() for h in handles):
            break
        if n_step == case["shrink_at"] and case["shrink_to"] is not None:
            engine.update_options(cache=budget(case["shrink_to"]))
        for i, at in cancel_at.items():
            if n_step == at:
                handles[i].cancel()
        engine.step()
        stats = engine.store.get_stats()
        assert stats.current_bytes <= stats.max_bytes_total, (n_step, stats)
    else:
        raise AssertionError(f"not every request finished within {max_steps} steps")
    for i, handle in enumerate(handles):
        result = handle.result(0)
        allowed = {"length", "cancelled"} if i in cancel_at else {"length"}
        assert result.finish_reason in allowed, (i, result.finish_reason, result.error)
        if result.finish_reason == "length":
            assert result.generated_tokens == case["requests"][i][1]
    snap = engine.metrics.snapshot()
    assert snap.failed == 0 and snap.in_flight == 0 and snap.waiting_for_memory == 0
    assert engine.store.get_stats().pinned_sessions == 0
    return snap.preemptions


def test_the_property_test_exercised_preemption(scripted):
    """Premise of the test above: its checks hold on a case that certainly preempts (three requests
    of 140 tokens under a budget of 200), and, when it ran first in this module, its examples did too."""
    case = {"n_budget": 200, "batch": 4, "chunk": 64, "requests": [(20, 120, None, False)] * 3,
            "shrink_to": None, "shrink_at": 0}  # fmt: skip
    assert serve_under_pressure(scripted, case) > 0
    assert not PRESSURE_SEEN or PRESSURE_SEEN["preemptions"] > 0
