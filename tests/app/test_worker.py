"""The engine worker on its own QThread, driven through EngineClient's queued signals (no window).

Receivers of the worker's signals are QObject slots (``tests/fixtures/qt_recorder.Recorder``) so that
they run on the test's (GUI) thread, as the window's do.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QObject, Qt, Slot

from smallmind_app.engines.endpoints import model_engine_id
from smallmind_app.worker import replies as replies_module
from smallmind_app.worker.client import EngineClient
from smallmind_app.worker.engine_options import session_limits, validate_settings
from smallmind_app.worker.limits import submit_error_message
from tests.fixtures.qt_recorder import Recorder
from tests.fixtures.window import MODEL_TIMEOUT_MS, REPLY_TIMEOUT_MS

HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(qtbot: Any) -> Any:
    client = EngineClient()
    client.recorder = Recorder(client.worker)
    client.start()
    yield client
    assert client.shutdown(), "the engine thread did not stop"
    assert not client.thread.isRunning()


@pytest.fixture
def loaded(qtbot: Any, client: Any, app_model_path: Path) -> Any:
    client.load_model(str(app_model_path))
    qtbot.waitUntil(lambda: bool(client.recorder.loaded), timeout=MODEL_TIMEOUT_MS)
    return client


def test_model_info_and_the_dialogs_limits(loaded: Any, app_model_path: Path) -> None:
    info = loaded.recorder.loaded
    assert (info["path"], info["n_layers"], info["context_length"]) == (str(app_model_path), 4, 1024)
    assert info["bytes_per_token"] == 2 * 4 * 2 * 32 * 4  # K and V, layers, KV heads, head dim, float32
    kv = {
        "enabled": True,
        "max_tokens_per_session": 4096,
        "max_bytes_per_session": 256 << 20,
        "dtype": "float32",
    }
    assert session_limits(kv, info) == (info["session_token_limit"], info["bytes_per_token"]) == (1024, 2048)
    assert session_limits({**kv, "max_bytes_per_session": 100 * 2048}, info) == (100, 2048)
    assert session_limits({**kv, "dtype": "float16"}, info)[1] == 1024
    assert session_limits({**kv, "dtype": "q8_0"}, info)[1] == 2 * 4 * 2 * (32 + 2)  # int8 + a scale per 32


def two_replies(qtbot: Any, client: Any, prefix: str) -> dict[str, tuple[list[str], dict[str, Any]]]:
    """Two 300-token replies generated together: {conversation id: (text pieces, result)}."""
    sampling = {"max_new_tokens": 300, "stop_on_eos": False, "seed": 4}
    a, b = f"{prefix}a", f"{prefix}b"
    client.submit(a, HELLO, sampling)
    client.submit(b, [{"role": "user", "content": "Why is the sky blue?"}], sampling)
    rec = client.recorder
    qtbot.waitUntil(lambda: {a, b} <= set(rec.results), timeout=REPLY_TIMEOUT_MS)
    return {c: (rec.texts[c], rec.results[c]) for c in (a, b)}


def test_text_arrives_coalesced_and_in_order(qtbot: Any, loaded: Any, monkeypatch: Any) -> None:
    """Text is joined per conversation until the flush interval has passed, and sent at once when a
    request ends. Counted by events, not by the clock: with an interval longer than the test, a reply
    arrives in at most three signals (the first step's, when the other request ends, when it ends);
    with no interval, one per step that made text. The pieces per reply at the real interval are a
    figure of the machine (``benchmarks/bench_app.py``)."""
    monkeypatch.setattr(replies_module, "TEXT_FLUSH_S", 3600.0)
    joined = two_replies(qtbot, loaded, "joined-")
    monkeypatch.setattr(replies_module, "TEXT_FLUSH_S", 0.0)
    each_step = two_replies(qtbot, loaded, "each-")
    for replies, max_pieces in ((joined, 3), (each_step, None)):
        for pieces, result in replies.values():
            assert result["finish_reason"] == "length" and result["generated_tokens"] == 300
            assert "".join(pieces) == result["text"]  # every piece, once, in order
            assert all(pieces)  # no empty signals
            if max_pieces is not None:
                assert len(pieces) <= max_pieces, len(pieces)
            else:
                assert len(pieces) > 3 * max(len(p) for p, _ in joined.values()), len(pieces)
    assert joined["joined-a"][1]["text"] != joined["joined-b"][1]["text"]
    # the interval changes how text is cut into signals, never the text
    assert [r["text"] for _, r in joined.values()] == [r["text"] for _, r in each_step.values()]


def test_submit_errors_are_reported_per_conversation(qtbot: Any, client: Any, app_model_path: Path) -> None:
    rec = client.recorder
    client.submit("early", HELLO, {})
    qtbot.waitUntil(lambda: "early" in rec.failures, timeout=10_000)
    assert "No model is loaded" in rec.failures["early"]
    client.apply_settings({"max_tokens_per_session": 16}, {})
    client.load_model(str(app_model_path))
    qtbot.waitUntil(lambda: bool(rec.loaded), timeout=MODEL_TIMEOUT_MS)
    long_prompt = [{"role": "user", "content": "word " * 200}]
    client.submit("long", long_prompt, {"max_new_tokens": 4})
    client.submit("bad", HELLO, {"temperature": -1})
    qtbot.waitUntil(lambda: {"long", "bad"} <= set(rec.failures) or "long" in rec.results, timeout=10_000)
    assert "bad" in rec.failures and "temperature" in rec.failures["bad"]
    # one message longer than the session cannot be trimmed (only older turns are): it is refused,
    # with both numbers, and nothing is generated
    assert "long" not in rec.results
    message = rec.failures["long"]
    assert "more than the 16 tokens a tab may hold" in message, message  # in the user's words


def test_submit_errors_are_told_apart_by_the_engines_error_types() -> None:
    """isinstance on the engine's types, not their names: a subclass reads as its base."""
    from engine import CacheBudgetError, ContextOverflowError, QueueFullError

    class Busier(QueueFullError):
        pass

    for busy in (QueueFullError("queue is full (2 waiting)"), Busier("queue is full (2 waiting)")):
        assert submit_error_message(busy) == (
            "Not sent: the engine is busy (queue is full (2 waiting)). "
            "Press Regenerate to send it again in a moment."
        )
    assert submit_error_message(ContextOverflowError(435, 16, "the conversation")) == (
        "Not sent: the conversation is too long for one KV session "
        "(the conversation has 435 tokens, more than the limit of 16 tokens)."
    )
    assert submit_error_message(CacheBudgetError("every session is pinned")) == (
        "Not sent: the KV cache budget is exhausted (every session is pinned)."
    )
    assert submit_error_message(ValueError("the prompt is empty")) == "Not sent: the prompt is empty"


def test_invalid_settings_are_rejected_and_the_old_ones_kept(qtbot: Any, loaded: Any) -> None:
    loaded.apply_settings({"max_sessions": 0}, {})
    qtbot.waitUntil(lambda: bool(loaded.recorder.rejected), timeout=10_000)
    assert "max_sessions" in loaded.recorder.rejected
    loaded.submit("c", HELLO, {"max_new_tokens": 5})
    qtbot.waitUntil(lambda: "c" in loaded.recorder.results, timeout=REPLY_TIMEOUT_MS)


def test_no_steps_while_idle(qtbot: Any, loaded: Any) -> None:
    rec = loaded.recorder
    loaded.submit("a", HELLO, {"max_new_tokens": 20})
    qtbot.waitUntil(lambda: "a" in rec.results, timeout=REPLY_TIMEOUT_MS)
    qtbot.waitUntil(lambda: rec.stats and rec.stats[-1]["metrics"]["completed"] == 1, timeout=5000)
    steps = rec.stats[-1]["metrics"]["steps"]
    n_stats = len(rec.stats)
    qtbot.waitUntil(lambda: len(rec.stats) >= n_stats + 3, timeout=5000)  # ~0.75 s later
    assert rec.stats[-1]["metrics"]["steps"] == steps
    assert not loaded.worker.stepping
    session = rec.stats[-1]["sessions"][0]
    assert session["session_id"] == "a" and not session["pinned"] and session["n_tokens"] > 0


def test_cancel_and_remove_session(qtbot: Any, loaded: Any) -> None:
    rec = loaded.recorder
    loaded.submit("a", HELLO, {"max_new_tokens": 900, "stop_on_eos": False})
    qtbot.waitUntil(lambda: bool(rec.texts.get("a")), timeout=REPLY_TIMEOUT_MS)
    loaded.cancel("a")
    qtbot.waitUntil(lambda: "a" in rec.results, timeout=REPLY_TIMEOUT_MS)
    assert rec.results["a"]["finish_reason"] == "cancelled" and rec.results["a"]["text"]
    loaded.remove_session("a")
    qtbot.waitUntil(lambda: rec.stats and rec.stats[-1]["kv"]["current_sessions"] == 0, timeout=5000)


def test_shutdown_while_generating_fails_requests_cleanly(qtbot: Any, loaded: Any) -> None:
    rec = loaded.recorder
    for conversation_id in ("a", "b"):
        loaded.submit(conversation_id, HELLO, {"max_new_tokens": 900, "stop_on_eos": False})
    qtbot.waitUntil(lambda: bool(rec.texts.get("a")), timeout=REPLY_TIMEOUT_MS)
    assert loaded.shutdown(timeout_ms=10_000)
    assert not loaded.thread.isRunning()
    qtbot.waitUntil(lambda: {"a", "b"} <= set(rec.results), timeout=5000)  # posted before the thread ended
    assert {rec.results[c]["finish_reason"] for c in ("a", "b")} == {"error"}
    assert "stopped" in rec.results["a"]["error"]
    assert loaded.shutdown()  # twice is harmless


def test_missing_and_corrupt_models_are_reported(
    qtbot: Any, client: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("SMALLMIND_MODEL", raising=False)
    rec = client.recorder
    client.load_model("")
    qtbot.waitUntil(lambda: bool(rec.missing), timeout=10_000)
    assert "models pull" in rec.missing
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"this is not a model")
    client.load_model(str(bad))
    qtbot.waitUntil(lambda: rec.load_failed is not None, timeout=10_000)
    assert rec.load_failed[0] == str(bad) and rec.load_failed[1]
    client.load_model(str(tmp_path / "nowhere.gguf"))
    qtbot.waitUntil(lambda: rec.load_failed[0].endswith("nowhere.gguf"), timeout=10_000)
    assert "does not exist" in rec.load_failed[1]


def test_the_workers_parts_run_the_clients_commands_on_the_engine_thread(qtbot: Any, tmp_path: Path) -> None:
    """``EngineClient`` queues some commands to the worker's parts (model loading, the tools), not to
    the worker: they run on the engine thread too, never on the GUI's. Each answer below is emitted
    inside the slot, so a direct connection sees the thread that ran it."""
    client = EngineClient()
    threads: dict[str, int] = {}

    def seen(name: str) -> Any:
        return lambda *_: threads.setdefault(name, threading.get_ident())

    direct = Qt.ConnectionType.DirectConnection
    client.thread.started.connect(seen("engine thread"), direct)
    client.worker.model_load_failed.connect(seen("load_model"), direct)
    client.worker.conversation_model_failed.connect(seen("set_conversation_engine"), direct)
    client.worker.server_stopped.connect(seen("start_server"), direct)
    client.worker.models_listed.connect(seen("list_models"), direct)
    client.start()
    try:
        missing = str(tmp_path / "nowhere.gguf")
        client.load_model(missing)
        client.set_conversation_engine("c", model_engine_id(missing), load=True)
        client.start_server(0, "")  # no model is loaded: refused at once
        client.list_models([])
        qtbot.waitUntil(lambda: len(threads) == 5, timeout=10_000)
    finally:
        assert client.shutdown()
    assert threading.get_ident() not in threads.values()
    assert set(threads.values()) == {threads["engine thread"]}, threads


def test_validate_settings_names_each_bad_field() -> None:
    assert validate_settings({}, {}, {}) == {}
    errors = validate_settings(
        {"max_bytes_total": 1000, "max_bytes_per_session": 2000, "max_sessions": 0},
        {"max_batch_size": 0, "max_batch_wait_ms": 5.0},
        {"temperature": -0.5, "top_p": 2.0, "seed": None},
    )
    assert set(errors) == {
        "kv.max_bytes_per_session",
        "kv.max_sessions",
        "batching.max_batch_size",
        "sampling.temperature",
        "sampling.top_p",
    }
    assert "must not exceed max_bytes_total" in errors["kv.max_bytes_per_session"]
    assert "[1, 256]" in errors["batching.max_batch_size"] and "got 0" in errors["batching.max_batch_size"]
    assert not errors["kv.max_sessions"].startswith("KvCacheOptions.")
    assert validate_settings({"bogus": 1}, {}, {}) == {"kv.bogus": "unknown setting 'bogus'"}


@pytest.mark.smollm2
def test_download_of_an_installed_model_runs_the_real_pull(
    qtbot: Any, client: Any, smollm2_path: Path, tmp_path: Path
) -> None:
    """``pull_model`` with the file already in place verifies it (SHA-256) instead of downloading."""
    from smallmind_app import paths

    models = paths.data_dir() / "models"
    models.mkdir(parents=True)
    shutil.copy(smollm2_path, models / smollm2_path.name)
    done: list[str] = []
    phases: list[str] = []

    class Sink(QObject):
        @Slot(str)
        def finished(self, path: str) -> None:
            done.append(path)

        @Slot(str, int, int)
        def progressed(self, phase: str, n: int, total: int) -> None:
            phases.append(phase)

    sink = Sink()
    client.worker.download_finished.connect(sink.finished)
    client.worker.download_progressed.connect(sink.progressed)
    client.start_download()
    qtbot.waitUntil(lambda: bool(done), timeout=120_000)
    assert done == [str(models / smollm2_path.name)] and "verify" in phases
