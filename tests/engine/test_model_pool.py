"""The model pool: models loaded on demand under a memory budget, least recently used idle ones
unloaded first (never one with a request), an idle time-to-live, loads beside other models' steps,
fair turns, KV sessions per (model, conversation) in one shared budget."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest

from engine import (
    BatchingOptions,
    GenerationEvent,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    SessionId,
    UnknownModelError,
)
from engine.model_pool import ModelPool, ModelPoolOptions, installed_models, load_files
from tests.fixtures.engine_helpers import make_engine, run_all, user

GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=10, stop_on_eos=False)
LONG = InferenceOptions(temperature=0.0, max_new_tokens=60, stop_on_eos=False)
NO_WAIT = BatchingOptions(max_batch_wait_ms=0, speculative=False)


def make_pool(family: dict[str, Path], **options) -> ModelPool:
    store = options.pop("store", None) or LruKvCacheStore(KvCacheOptions())
    return ModelPool(family, ModelPoolOptions(**options), NO_WAIT, store)


def alone(path: Path, prompt, options=GREEDY):
    """The reply of the model in ``path`` alone, on an engine of its own."""
    engine = make_engine(load_files(path), NO_WAIT)
    return run_all(engine, [engine.submit(prompt, options)])[0]


def drive(pool: ModelPool, handles, max_steps: int = 5000, timeout_s: float = 60.0):
    """Step the pool from this thread until every handle is done (loads run on the pool's thread)."""
    deadline = time.monotonic() + timeout_s
    for _ in range(max_steps):
        if all(h.done() for h in handles):
            return [h.result(0) for h in handles]
        if not pool.step():
            time.sleep(0.002)  # a load is running on the loader thread
        assert time.monotonic() < deadline, "the pool did not finish in time"
    raise AssertionError("requests did not finish")


def wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def weights_of(family: dict[str, Path]) -> dict[str, int]:
    return {name: load_files(path)[0].weights.nbytes for name, path in family.items()}


# -- loading on demand ------------------------------------------------------------------------------
def test_a_request_for_a_model_not_loaded_waits_for_its_load_and_answers(tiny_family):
    pool = make_pool(tiny_family)
    events: list[GenerationEvent] = []
    handle = pool.submit("tiny-gemma", [user("Hello there")], GREEDY, on_event=events.append)
    assert events[0].kind == "loading"  # said at once, before any load finished
    (result,) = drive(pool, [handle])
    assert pool.is_loaded("tiny-gemma") and not pool.is_loaded("tiny-a")
    assert result.finish_reason == "length"
    assert result.token_ids == alone(tiny_family["tiny-gemma"], [user("Hello there")]).token_ids
    assert {e.request_id for e in events} == {handle.request_id}
    pool.stop()


def test_an_unknown_model_is_refused_naming_the_installed_ones(tiny_family):
    pool = make_pool(tiny_family)
    with pytest.raises(UnknownModelError, match=r"'nope' is not installed; installed models: 'tiny-a', "
                                                r"'tiny-b', 'tiny-gemma'"):  # fmt: skip
        pool.submit("nope", "hi")
    pool.stop()


def test_a_model_that_fails_to_load_ends_its_requests_with_the_reason_and_others_go_on(tiny_family, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 10)
    pool = make_pool({**tiny_family, "broken": broken})
    bad = pool.submit("broken", "hi", GREEDY)
    good = pool.submit("tiny-a", "hi", GREEDY)
    bad_result, good_result = drive(pool, [bad, good])
    assert bad_result.finish_reason == "error" and "'broken'" in bad_result.error
    assert good_result.finish_reason == "length"
    assert next(m for m in pool.models() if m.model_id == "broken").state == "failed"
    pool.stop()


# -- the memory budget -------------------------------------------------------------------------------
def test_three_models_under_a_budget_for_two_unload_the_least_recently_used_idle_one(tiny_family):
    sizes = weights_of(tiny_family)
    budget = sizes["tiny-a"] + sizes["tiny-b"] + sizes["tiny-gemma"] // 2  # any two, never three
    assert budget < sum(sizes.values())
    pool = make_pool(tiny_family, max_loaded_bytes=budget)
    drive(pool, [pool.submit("tiny-a", "the quick", GREEDY)])
    drive(pool, [pool.submit("tiny-b", "the quick", GREEDY)])
    running = pool.submit("tiny-a", "a long one", LONG)  # a is busy again...
    for _ in range(3):
        pool.step()
    assert not running.done()
    drive(pool, [pool.submit("tiny-b", "the lazy dog", GREEDY)])  # ...and b used after it: a is LRU
    assert pool.loaded_bytes <= budget

    pool.lease("tiny-gemma")  # loads it (no step runs meanwhile: a's request stays running)
    pool.release("tiny-gemma")
    # room for gemma: b went (idle), never a (least recently used, but running)
    assert [pool.is_loaded(m) for m in ("tiny-a", "tiny-b", "tiny-gemma")] == [True, False, True]
    assert not running.done() and pool.loaded_bytes <= budget
    drive(pool, [pool.submit("tiny-gemma", [user("Hello there")], GREEDY)])

    (a_result,) = drive(pool, [running])
    assert a_result.token_ids == alone(tiny_family["tiny-a"], "a long one", LONG).token_ids

    drive(pool, [pool.submit("tiny-gemma", [user("Hi")], GREEDY)])  # gemma used after a ended
    again = pool.submit("tiny-b", "the lazy dog", GREEDY)  # reloads b; a (now idle, LRU) goes
    (b_result,) = drive(pool, [again])
    assert [pool.is_loaded(m) for m in ("tiny-a", "tiny-b", "tiny-gemma")] == [False, True, True]
    assert b_result.token_ids == alone(tiny_family["tiny-b"], "the lazy dog").token_ids
    pool.stop()


def test_a_load_waits_while_the_only_model_to_unload_has_a_request_running(tiny_family):
    sizes = weights_of(tiny_family)
    pool = make_pool(tiny_family, max_loaded_bytes=max(sizes.values()))  # one at a time
    first = pool.submit("tiny-a", "a long one", LONG)
    drive(pool, [pool.submit("tiny-a", "warm", GREEDY)])
    second = pool.submit("tiny-b", "the quick", GREEDY)
    for _ in range(10):  # a runs; b's load waits for it (it never unloads a running model)
        pool.step()
    assert pool.is_loaded("tiny-a") and not pool.is_loaded("tiny-b") and not first.done()
    first_result, second_result = drive(pool, [first, second])
    assert first_result.finish_reason == second_result.finish_reason == "length"
    assert pool.is_loaded("tiny-b") and not pool.is_loaded("tiny-a")
    pool.stop()


def test_an_unloaded_model_is_freed(tiny_family):
    pool = make_pool(tiny_family)
    drive(pool, [pool.submit("tiny-a", "hi", GREEDY)])
    engine = pool.loaded_engine("tiny-a")
    model = weakref.ref(engine.model)
    del engine
    assert pool.unload("tiny-a")
    gc.collect()
    assert model() is None and pool.loaded_bytes == 0
    pool.stop()


def test_an_idle_model_is_unloaded_after_its_time_to_live(tiny_family):
    pool = make_pool(tiny_family, idle_ttl_s=0.2)
    drive(pool, [pool.submit("tiny-a", "hi", GREEDY)])
    assert pool.is_loaded("tiny-a")
    assert pool.seconds_until_ready() is None  # no work...
    wait = pool.seconds_until_expiry()  # ...but the driver knows when to look again
    assert wait is not None and 0 < wait <= 0.2
    time.sleep(0.25)
    pool.step()
    assert not pool.is_loaded("tiny-a")
    pool.stop()


def test_a_leased_model_is_not_unloaded(tiny_family):
    sizes = weights_of(tiny_family)
    pool = make_pool(tiny_family, max_loaded_bytes=max(sizes.values()))
    engine = pool.lease("tiny-a")  # loads; kept until released (the server submits to it itself)
    assert engine is pool.loaded_engine("tiny-a")
    other = pool.submit("tiny-b", "hi", GREEDY)
    time.sleep(0.3)
    assert pool.is_loaded("tiny-a") and not pool.is_loaded("tiny-b")
    pool.release("tiny-a")
    drive(pool, [other])
    assert pool.is_loaded("tiny-b") and not pool.is_loaded("tiny-a")
    pool.stop()


# -- steps of several models ------------------------------------------------------------------------
def test_two_models_stream_together_and_each_reply_equals_its_own(tiny_family):
    pool = make_pool(tiny_family)
    for model_id in ("tiny-a", "tiny-gemma"):  # both loaded first: a's 60 tokens can take less time
        pool.load(model_id)  # than gemma's load, and it would stream alone until then
    deadline = time.monotonic() + 60
    while not (pool.is_loaded("tiny-a") and pool.is_loaded("tiny-gemma")) and time.monotonic() < deadline:
        time.sleep(0.01)
    order: list[str] = []
    a = pool.submit("tiny-a", "the quick brown fox", LONG, on_event=lambda e: order.append("a"))
    g = pool.submit("tiny-gemma", [user("Hello there")], LONG, on_event=lambda e: order.append("g"))
    a_result, g_result = drive(pool, [a, g])
    assert a_result.token_ids == alone(tiny_family["tiny-a"], "the quick brown fox", LONG).token_ids
    assert g_result.token_ids == alone(tiny_family["tiny-gemma"], [user("Hello there")], LONG).token_ids
    first_done = min(len(order) - order[::-1].index(w) for w in "ag")
    assert {"a", "g"} <= set(order[: first_done - 1]), "".join(order)  # both streamed before either finished
    pool.stop()


def compute_s(pool: ModelPool) -> dict[str, float]:
    return {m.model_id: m.compute_s for m in pool.models()}


def test_turns_go_to_the_model_that_used_the_least_compute_time(tiny_family):
    """Two busy models: after every step, their compute times differ by at most one step's."""
    pool = make_pool(tiny_family)
    drive(pool, [pool.submit(m, "warm", GREEDY) for m in ("tiny-a", "tiny-gemma")])
    handles = [pool.submit(m, "the quick", LONG) for m in ("tiny-a", "tiny-gemma")]
    longest = 0.0
    for _ in range(40):
        started = time.perf_counter()
        pool.step()
        longest = max(longest, time.perf_counter() - started)
        used = compute_s(pool)
        assert abs(used["tiny-a"] - used["tiny-gemma"]) <= longest, used
    assert not any(h.done() for h in handles)
    pool.stop()


def test_a_model_that_was_idle_gets_no_credit_for_it(tiny_family):
    """b joins after a ran alone for a while: it starts level with a's compute time (it does not run
    alone until it has caught up)."""
    pool = make_pool(tiny_family)
    drive(pool, [pool.submit(m, "warm", GREEDY) for m in ("tiny-a", "tiny-b")])
    a = pool.submit("tiny-a", "the quick", LONG)
    for _ in range(30):
        pool.step()
    a_alone = compute_s(pool)["tiny-a"]
    b = pool.submit("tiny-b", "the quick", LONG)
    pool.step()
    assert compute_s(pool)["tiny-b"] >= a_alone
    assert not a.done() and not b.done()
    pool.stop()


def test_other_models_keep_streaming_while_one_loads(tiny_family):
    gate = threading.Event()
    loads: list[str] = []

    def slow_gemma(path: Path):  # a load that takes as long as the test says (a fault the tiny file lacks)
        loads.append(path.stem)
        if path.stem == "tiny-gemma":
            assert gate.wait(30)
        return load_files(path)

    pool = ModelPool(tiny_family, ModelPoolOptions(), NO_WAIT, LruKvCacheStore(), loader=slow_gemma)
    drive(pool, [pool.submit("tiny-a", "warm", GREEDY)])
    waiting = pool.submit("tiny-gemma", [user("Hello there")], GREEDY)
    wait_until(lambda: "tiny-gemma" in loads)
    (streamed,) = drive(pool, [pool.submit("tiny-a", "the quick brown fox", LONG)])
    assert streamed.finish_reason == "length" and not waiting.done()  # 60 tokens while gemma loaded
    gate.set()
    (loaded,) = drive(pool, [waiting])
    assert loaded.finish_reason == "length"
    pool.stop()


def test_a_request_cancelled_while_its_model_loads_ends_cancelled(tiny_family):
    gate = threading.Event()
    pool = ModelPool(tiny_family, ModelPoolOptions(), NO_WAIT, LruKvCacheStore(),
                     loader=lambda path: (gate.wait(30), load_files(path))[1])  # fmt: skip
    handle = pool.submit("tiny-a", "hi", GREEDY)
    handle.cancel()
    assert handle.result(5).finish_reason == "cancelled"
    gate.set()
    wait_until(lambda: pool.is_loaded("tiny-a"))
    assert next(m for m in pool.models() if m.model_id == "tiny-a").n_requests == 0
    pool.stop()


def test_the_pool_driver_thread_serves_requests(tiny_family):
    pool = make_pool(tiny_family)
    pool.start()
    handles = [pool.submit(m, "the quick", GREEDY) for m in ("tiny-a", "tiny-gemma")]
    results = [h.result(60) for h in handles]
    assert [r.finish_reason for r in results] == ["length", "length"]
    pool.stop()


# -- KV sessions per (model, conversation), one budget -----------------------------------------------
def test_one_conversation_has_a_session_per_model_and_they_never_share_k_v(tiny_family):
    """tiny-a and tiny-b have the same shape and vocabulary: only the session's model tells their
    K/V apart (copying a's prefix into b's session would change b's reply)."""
    pool = make_pool(tiny_family)
    conversation = SessionId("tab-1")
    prompt = "the quick brown fox jumps over the lazy dog"
    (a1,) = drive(pool, [pool.submit("tiny-a", prompt, GREEDY, conversation)])
    (b1,) = drive(pool, [pool.submit("tiny-b", prompt, GREEDY, conversation)])
    assert b1.reused_tokens == 0
    assert b1.token_ids == alone(tiny_family["tiny-b"], prompt).token_ids
    (a2,) = drive(pool, [pool.submit("tiny-a", prompt + " again", GREEDY, conversation)])
    assert a2.reused_tokens >= a1.prompt_tokens - 1  # its own session was kept
    by_model = pool.kv_by_model()
    assert by_model["tiny-a"]["sessions"] == by_model["tiny-b"]["sessions"] == 1
    assert by_model["tiny-a"]["reused_tokens"] == a2.reused_tokens and by_model["tiny-gemma"]["sessions"] == 0
    assert len({s.key for s in pool.sessions_of(conversation)}) == 3  # unscoped, a, b: three disk names
    pool.stop()


def test_a_request_waits_for_kv_room_another_models_request_holds(tiny_family):
    """One KV budget for every model: b's request waits (never fails) until a's ends."""
    shape = load_files(tiny_family["tiny-a"])[0].kv_shape()
    budget = 100 * shape.bytes_per_token  # room for one request of 60 tokens + its prompt, not two
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=budget, max_bytes_per_session=budget))
    pool = make_pool(tiny_family, store=store)
    drive(pool, [pool.submit(m, "w", InferenceOptions(max_new_tokens=1)) for m in ("tiny-a", "tiny-b")])
    a = pool.submit("tiny-a", "the quick brown fox", LONG, SessionId("x"))
    for _ in range(3):
        pool.step()
    b = pool.submit("tiny-b", "the quick brown fox", LONG, SessionId("y"))
    a_result, b_result = drive(pool, [a, b])
    assert a_result.finish_reason == b_result.finish_reason == "length"
    assert b_result.token_ids == alone(tiny_family["tiny-b"], "the quick brown fox", LONG).token_ids
    pool.stop()


def test_installed_models_lists_every_file_once_by_its_name(tiny_family, tmp_path):
    from engine import paths

    models_dir = paths.models_dir()
    models_dir.mkdir(parents=True)
    (models_dir / "tiny-a.gguf").write_bytes(tiny_family["tiny-a"].read_bytes())
    found = installed_models([tiny_family["tiny-a"], tiny_family["tiny-gemma"], tiny_family["tiny-gemma"]])
    assert list(found) == ["tiny-a", "tiny-gemma", "tiny-a-2"]
