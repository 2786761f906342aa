"""One request's fault never stops the engine: a KV disk file planted with a valid checksum and a
hostile header, a request whose preparation raises, drafting that raises. The faulty request fails
alone (finish reason "error", a message naming the cause, one traceback in the log), the bad file is
deleted and counted, and every other request's reply is the one a clean engine gives.

The planted file is real (written by the engine, its header changed, its CRC made valid again); the
raising preparation and drafter are injected faults (nothing real raises there once the disk tier
checks its headers).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    SessionId,
    Tokenizer,
)
from engine.generation import GenerationResult
from engine.kv_store import ModelShape
from engine.speculative import Drafter
from tests.engine.conftest import tiny  # noqa: F401  (the tiny model, loaded once per session)
from tests.fixtures.engine_helpers import make_engine, run_all, user
from tests.fixtures.hostile_files import rewrite_kv_header

GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=12, stop_on_eos=False)
PLANTED, OTHER = SessionId("tab-planted"), SessionId("tab-other")
FIRST = [user("Tell me about the sea and the ships on it")]
FOLLOW_UP = [*FIRST, {"role": "assistant", "content": "The sea is wide."}, user("And the ships?")]
UNRELATED = [user("Count from one to five")]
WAIT_S = 20.0  # both replies take well under a second; this only tells a stuck engine from a slow one


def clean_reply(pair: tuple[Model, Tokenizer], messages: list[dict[str, str]]) -> GenerationResult:
    engine = make_engine(pair)
    (result,) = run_all(engine, [engine.submit(messages, GREEDY)])
    return result


def disk_engine(pair: tuple[Model, Tokenizer], directory: Path) -> BatchedInferenceEngine:
    model, tok = pair
    store = LruKvCacheStore(KvCacheOptions(disk_dir=str(directory)))
    return BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0), store)


def save_planted_session(pair: tuple[Model, Tokenizer], directory: Path) -> Path:
    """A real session file: one turn of PLANTED, its tab closed (to disk), the app closed."""
    engine = disk_engine(pair, directory)
    run_all(engine, [engine.submit(FIRST, GREEDY, session_id=PLANTED)])
    engine.store.remove(PLANTED, to_disk=True)
    assert engine.store.close()
    (path,) = directory.glob("*.kv")
    return path


def _drop(key: str) -> Any:
    return lambda header: header.pop(key)


def _set(key: str, value: Any) -> Any:
    return lambda header: header.__setitem__(key, value)


HOSTILE_HEADERS = {
    "no model": _drop("model"),  # the file: KeyError escaped prepare() on every step
    "no dtype": _drop("dtype"),
    "n_tokens as text": _set("n_tokens", "12"),
    "n_tokens negative": _set("n_tokens", -1),
    "n_layers zero": _set("n_layers", 0),
    "head_dim a float": _set("head_dim", 8.0),
    "unknown dtype": _set("dtype", "int4"),
    "session_id a list": _set("session_id", ["tab-planted"]),
    "crc not hex": _set("payload_crc32", "zzzzzzzz"),
    "version true": _set("version", True),
    "an unknown field": _set("x", 1),
    "a list, not an object": lambda header: (header.clear(), header.update({"": []})),
}


@pytest.mark.parametrize("change", HOSTILE_HEADERS.values(), ids=HOSTILE_HEADERS.keys())
def test_a_planted_kv_file_is_deleted_and_every_reply_is_intact(
    tiny: tuple[Model, Tokenizer],  # noqa: F811
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    change: Any,
) -> None:
    expected_other, expected_planted = clean_reply(tiny, UNRELATED), clean_reply(tiny, FOLLOW_UP)
    path = save_planted_session(tiny, tmp_path)
    rewrite_kv_header(path, change)

    engine = disk_engine(tiny, tmp_path)  # a restart on the folder holding the planted file
    planted = engine.submit(FOLLOW_UP, GREEDY, session_id=PLANTED)
    other = engine.submit(UNRELATED, GREEDY, session_id=OTHER)
    engine.start()  # the background driver, as a headless user or the API server runs it
    try:
        deadline = time.monotonic() + WAIT_S
        while not (planted.done() and other.done()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert other.done(), "the unrelated request never finished: one bad file stopped the engine"
    finally:
        engine.stop()
    assert other.result(0).text == expected_other.text and other.result(0).finish_reason == "length"
    assert planted.result(0).text == expected_planted.text  # recomputed, as if the file were not there
    assert not path.exists()
    assert engine.store.get_stats().disk_rejected_files == 1
    deleted = [r for r in caplog.records if "deleting KV file" in r.getMessage()]
    assert len(deleted) == 1 and "corrupt" in deleted[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info]  # a bad file is an answer, not a traceback


class FaultyStore(LruKvCacheStore):
    """A store whose preparation of one session raises (an injected fault: a bug, a bad file)."""

    def prepare(self, session_id: SessionId, shape: ModelShape, *args: Any, **kwargs: Any) -> Any:
        if session_id == PLANTED:
            raise KeyError("model")
        return super().prepare(session_id, shape, *args, **kwargs)


def test_a_request_whose_preparation_raises_fails_alone(
    tiny: tuple[Model, Tokenizer],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = clean_reply(tiny, UNRELATED)
    model, tok = tiny
    engine = BatchedInferenceEngine(model, tok, BatchingOptions(max_batch_wait_ms=0), FaultyStore())
    bad = engine.submit(FOLLOW_UP, GREEDY, session_id=PLANTED)
    good = engine.submit(UNRELATED, GREEDY, session_id=OTHER)
    engine.start()
    try:
        assert good.result(WAIT_S).text == expected.text
        failed = bad.result(WAIT_S)
        time.sleep(0.2)  # a spinning driver would log hundreds of tracebacks in this time
        # the engine still serves: the same session fails again (its fault is still there), others run
        again = engine.submit(UNRELATED, GREEDY, session_id=SessionId("tab-third")).result(WAIT_S)
    finally:
        engine.stop()
    assert failed.finish_reason == "error" and failed.text == ""
    assert failed.error == "preparing the request failed: KeyError: 'model'"
    assert again.text == expected.text
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "request" in tracebacks[0].getMessage()


class FaultyDrafter(Drafter):
    """Drafting that raises (an injected fault): steps must run without drafts, not stop."""

    def propose(self, *args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("division by zero")


def test_drafting_that_raises_leaves_the_replies_as_without_drafting(
    tiny: tuple[Model, Tokenizer],  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    repetitive = [user("one two three one two three one two three one two three")]
    plain = make_engine(tiny, BatchingOptions(max_batch_wait_ms=0, speculative=False))
    expected = run_all(plain, [plain.submit(repetitive, GREEDY), plain.submit(UNRELATED, GREEDY)])
    engine = make_engine(tiny)
    engine.drafter = FaultyDrafter()
    results = run_all(engine, [engine.submit(repetitive, GREEDY), engine.submit(UNRELATED, GREEDY)], 500)
    assert [r.text for r in results] == [r.text for r in expected]
    assert all(r.finish_reason == "length" and r.draft_tokens == 0 for r in results)
    assert len([r for r in caplog.records if r.exc_info]) == 1  # once, not once a step


class FaultyForward:
    """The model with its batched forward raising once (an injected fault the batch shares)."""

    def __init__(self, model: Model) -> None:
        self._model, self.n_faults = model, 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def forward_last(self, rows: Any) -> np.ndarray:
        if self.n_faults:
            self.n_faults -= 1
            raise FloatingPointError("overflow in a kernel")
        return self._model.forward_last(rows)


def test_a_failed_shared_forward_fails_its_batch_and_the_engine_goes_on(
    tiny: tuple[Model, Tokenizer],  # noqa: F811
) -> None:
    model, tok = tiny
    expected = clean_reply(tiny, UNRELATED)
    engine = BatchedInferenceEngine(
        FaultyForward(model),  # type: ignore[arg-type]
        tok,
        BatchingOptions(max_batch_wait_ms=0, speculative=False),
        LruKvCacheStore(),
    )
    first = run_all(engine, [engine.submit(FIRST, GREEDY), engine.submit(UNRELATED, GREEDY)], 100)
    assert [r.finish_reason for r in first] == ["error", "error"]
    message = "the forward pass of 2 request(s) failed: FloatingPointError: overflow in a kernel"
    assert first[0].error == first[1].error == message
    (after,) = run_all(engine, [engine.submit(UNRELATED, GREEDY)], 100)
    assert after.text == expected.text and after.finish_reason == "length"
