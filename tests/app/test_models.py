"""Several local models in the real window: each tab picks its model (remembered after a restart),
two tabs on two models stream together, replies say which model wrote them (footer, export, history,
versions), Continue goes on from a cut reply reusing its K/V, each model brings its own defaults,
Settings set the loaded models' memory limit and idle time."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from smallmind_app import paths
from tests.fixtures.tiny_model import write_tiny_gguf
from tests.fixtures.window import (
    MODEL_TIMEOUT_MS,
    REPLY_TIMEOUT_MS,
    send,
    stat_number,
    stored_messages,
    wait_idle,
)

GEMMA = "tiny-gemma"  # the second model: a tiny Gemma-3-like base model (no chat template)


@pytest.fixture
def installed_gemma(tiny_family: dict[str, Path]) -> Path:
    """tiny-gemma in this test's models directory: the window lists it among the local models."""
    paths.models_dir().mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(tiny_family[GEMMA], paths.models_dir() / f"{GEMMA}.gguf"))


def engine_id(path: Path) -> str:
    return f"model:{path}"


def pick_model(qtbot: Any, window: Any, tab: Any, path: Path) -> None:
    """Pick the model in the tab's picker (it is listed once the worker has opened it), as a user
    would: the picker's ``activated`` (what a click or the keyboard emits); waits until it is ready."""
    picker = tab.engine_picker
    qtbot.waitUntil(lambda: picker.findData(engine_id(path)) >= 0, timeout=MODEL_TIMEOUT_MS)
    index = picker.findData(engine_id(path))
    picker.setCurrentIndex(index)
    picker.activated.emit(index)
    qtbot.waitUntil(lambda: tab.engine.model_state == ("ready", path.stem), timeout=MODEL_TIMEOUT_MS)


def footer_of(tab: Any, index: int = -1) -> str:
    from smallmind_app.chat.bubbles import _footer

    return _footer(index % len(tab.entries), tab.entries[index], "app")


def test_two_tabs_on_two_models_stream_together_and_each_says_who_wrote_it(
    qtbot: Any, make_window: Any, write_settings: Any, installed_gemma: Path, app_model_path: Path
) -> None:
    write_settings(sampling={"max_new_tokens": 200, "stop_on_eos": False, "temperature": 0.0})
    window = make_window()
    a, g = window.chat_tabs[0], window.new_chat()
    assert a.engine_picker.currentText() == "Local · app-tiny"  # a new tab: the default model
    pick_model(qtbot, window, g, installed_gemma)
    assert g.engine_picker.currentText() == f"Local · {GEMMA}"
    texts: dict[str, list[int]] = {a.conversation_id: [], g.conversation_id: []}
    order: list[str] = []
    window.client.worker.text_generated.connect(
        lambda cid, _text, n: (order.append(cid), texts[cid].append(n))
    )
    send(a, "Hello there")
    send(g, "Hello there")
    wait_idle(qtbot, a, g)
    first_done = min(len(order) - order[::-1].index(cid) for cid in texts)
    assert set(order[: first_done - 1]) == set(texts)  # both streamed before either ended
    assert a.entries[-1].status == g.entries[-1].status == "complete"
    assert (a.entries[-1].model, g.entries[-1].model) == ("app-tiny", GEMMA)
    assert footer_of(a).startswith("app-tiny (local) · ") and footer_of(g).startswith(f"{GEMMA} (local) · ")
    assert [m.model for m in stored_messages(g.conversation_id)] == ["", GEMMA]  # stored with the reply
    rows = {row["model_id"]: row for row in window.models.local_models}
    assert rows["app-tiny"]["state"] == rows[GEMMA]["state"] == "loaded"
    qtbot.waitUntil(lambda: window.stats_dock.model_table.rowCount() == 2, timeout=5000)
    states = {window.stats_dock.table.item(r, 0).text() for r in range(window.stats_dock.table.rowCount())}
    assert {f"{a.title} · app-tiny", f"{g.title} · {GEMMA}"} <= states  # the dock's KV split by model


def test_the_picker_restores_each_tabs_model_after_a_restart(
    qtbot: Any, make_window: Any, write_settings: Any, installed_gemma: Path
) -> None:
    write_settings(sampling={"max_new_tokens": 4})
    window = make_window()
    a, b = window.chat_tabs[0], window.new_chat()
    pick_model(qtbot, window, a, installed_gemma)
    a_id, b_id = a.conversation_id, b.conversation_id
    window.close()

    restarted = make_window()
    tabs = {tab.conversation_id: tab for tab in restarted.chat_tabs}
    assert tabs[a_id].engine_picker.engine_id == engine_id(installed_gemma)
    assert tabs[a_id].engine_picker.currentText() == f"Local · {GEMMA}"
    assert tabs[b_id].engine_picker.engine_id == "local"
    send(tabs[a_id], "Hi")  # its model is loaded for this reply (restored tabs load nothing at start)
    wait_idle(qtbot, tabs[a_id])
    assert tabs[a_id].entries[-1].model == GEMMA


def test_versions_from_two_models_and_the_export_and_history_say_which_is_which(
    qtbot: Any, make_window: Any, write_settings: Any, installed_gemma: Path, tmp_path: Path
) -> None:
    write_settings(sampling={"max_new_tokens": 6})
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, "Hello there")
    wait_idle(qtbot, tab)
    pick_model(qtbot, window, tab, installed_gemma)
    tab.regenerate_button.click()  # the same question to the other model: version 2 of the reply
    wait_idle(qtbot, tab)
    assert tab.entries[-1].versions == (2, 2) and f"{GEMMA} (local)" in footer_of(tab)
    tab.select_version(len(tab.entries) - 1, -1)
    assert tab.entries[-1].versions == (1, 2) and "app-tiny (local)" in footer_of(tab)
    assert GEMMA not in footer_of(tab)
    export = tmp_path / "chat.md"
    assert window.tabs.export_conversation(tab.conversation_id, str(export)) is None
    assert "## Assistant (app-tiny · local)" in export.read_text(encoding="utf-8")
    tab.select_version(len(tab.entries) - 1, 1)
    (summary,) = [s for s in window.store.history() if s.id == tab.conversation_id]
    assert summary.preview.startswith(f"{GEMMA}: ")


def test_continue_extends_a_cut_reply_in_place_reusing_its_k_v(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling={"max_new_tokens": 8, "stop_on_eos": False, "seed": 3})
    window = make_window()
    tab = window.chat_tabs[0]
    assert not tab.continue_button.isEnabled()  # nothing to continue yet
    send(tab, "Tell me a long story about the sea")
    wait_idle(qtbot, tab)
    cut = tab.entries[-1]
    first_text, first_stats = cut.content, dict(cut.stats)
    assert first_stats["finish_reason"] == "length" and tab.continue_button.isEnabled()
    tab.continue_button.click()
    assert tab.is_generating and not tab.continue_button.isEnabled()
    wait_idle(qtbot, tab)
    grown = tab.entries[-1]
    assert grown is cut and grown.content.startswith(first_text) and len(grown.content) > len(first_text)
    assert grown.stats["n_tokens"] == first_stats["n_tokens"] + 8
    # no prompt recompute: the continuation's prompt is the first one and the reply, all but a few
    # tokens of it (at most the last token and a retokenized end) taken from the KV cache
    assert grown.stats["prompt_tokens"] >= first_stats["prompt_tokens"] + first_stats["n_tokens"] - 2
    assert grown.stats["reused_tokens"] >= first_stats["prompt_tokens"]
    assert "continued" in footer_of(tab)
    stored = stored_messages(tab.conversation_id)
    assert len(stored) == 2 and stored[-1].content == grown.content and stored[-1].id == cut.message_id
    qtbot.waitUntil(  # the dock's KV stats show the reuse
        lambda: stat_number(window, "statReusedTokens") >= grown.stats["reused_tokens"], timeout=5000
    )


def test_a_base_model_gets_no_other_models_system_prompt(
    qtbot: Any, make_window: Any, write_settings: Any, installed_gemma: Path, app_model_path: Path
) -> None:
    from engine import Tokenizer

    write_settings(sampling={"max_new_tokens": 2})
    window = make_window()
    assert window.settings.system_prompt == ""  # none of the app's: each model's own
    smol, base = window.chat_tabs[0], window.new_chat()
    assert smol.system_prompt == base.system_prompt == ""
    assert smol.system_toggle.text() == "System prompt: (the model's own)"  # not "(none)": SmolLM2 has one
    pick_model(qtbot, window, base, installed_gemma)
    for tab in (smol, base):
        send(tab, "Hello there")
    wait_idle(qtbot, smol, base)
    user = [{"role": "user", "content": "Hello there"}]
    smol_ids = Tokenizer.from_gguf(app_model_path).encode_messages(user)
    base_ids = Tokenizer.from_gguf(installed_gemma).encode_messages(user)
    assert smol.entries[-1].stats["prompt_tokens"] == len(smol_ids)  # its template's own system turn...
    assert "SmolLM" in Tokenizer.from_gguf(app_model_path).decode(smol_ids)
    assert base.entries[-1].stats["prompt_tokens"] == len(base_ids)  # ...and none for the base model
    assert "SmolLM" not in Tokenizer.from_gguf(installed_gemma).decode(base_ids)


def test_sampling_defaults_come_from_the_tabs_model_unless_the_user_set_them(
    qtbot: Any, make_window: Any, write_settings: Any, tmp_path: Path
) -> None:
    paths.models_dir().mkdir(parents=True)
    tuned = write_tiny_gguf(paths.models_dir() / "tuned.gguf", extra_metadata={
        "general.sampling.temp": 0.25, "general.sampling.top_k": 7})  # fmt: skip
    write_settings(sampling={"top_k": 12})  # the user's own top-k; the temperature left to the model
    window = make_window()
    tab = window.chat_tabs[0]
    assert window.sampling_for(tab)["temperature"] == 0.7  # the default model's file says nothing
    pick_model(qtbot, window, tab, tuned)
    sampling = window.sampling_for(tab)
    assert (sampling["temperature"], sampling["top_k"]) == (0.25, 12)


def test_a_preset_tied_to_a_model_picks_it(qtbot: Any, make_window: Any, installed_gemma: Path) -> None:
    window = make_window()
    tab = window.chat_tabs[0]
    pick_model(qtbot, window, tab, installed_gemma)
    window.presets.tie(tab, "Concise")
    assert window.settings.preset_models == {"Concise": engine_id(installed_gemma)}
    other = window.new_chat()
    assert other.engine_picker.engine_id == "local"
    window.presets.use(other, "Concise", window.settings.prompt_presets["Concise"])
    assert other.engine_picker.engine_id == engine_id(installed_gemma)
    assert other.system_prompt == window.settings.prompt_presets["Concise"]
    assert "with Local · tiny-gemma" in other.status_label.text()


def test_settings_set_the_loaded_models_memory_limit_and_idle_time(
    qtbot: Any, make_window: Any, installed_gemma: Path
) -> None:
    window = make_window()
    dialog = window.open_settings()
    limit, ttl = dialog.findChild(type(dialog.max_loaded), "maxLoadedModelBytes"), dialog.findChild(
        type(dialog.idle_ttl), "modelIdleTtl")  # fmt: skip
    assert limit.specialValueText() and limit.value() == 0  # 0: the engine's default (half the memory)
    limit.setValue(32)
    assert not dialog.ok_button.isEnabled() and "64 MiB" in dialog.error_label.text()
    limit.setValue(512)
    ttl.setValue(10)
    dialog.ok_button.click()
    assert (window.settings.max_loaded_model_bytes, window.settings.model_idle_ttl_s) == (512 << 20, 600.0)
    pool = window.client.worker.local.pool
    qtbot.waitUntil(lambda: pool.options.max_loaded_bytes == 512 << 20, timeout=5000)
    assert pool.options.idle_ttl_s == 600.0


def test_a_model_idle_past_its_time_to_live_is_unloaded_and_comes_back(
    qtbot: Any, make_window: Any, write_settings: Any, installed_gemma: Path
) -> None:
    write_settings(sampling={"max_new_tokens": 3})
    window = make_window()
    tab = window.chat_tabs[0]
    pick_model(qtbot, window, tab, installed_gemma)
    window.apply_settings(window.settings.with_changes(model_idle_ttl_s=1.0))
    loading: list[str] = []
    window.client.worker.request_loading.connect(lambda cid, name: loading.append(name))

    def state(model_id: str) -> str:
        return next(row["state"] for row in window.models.local_models if row["model_id"] == model_id)

    qtbot.waitUntil(lambda: state(GEMMA) == "unloaded" and state("app-tiny") == "unloaded", timeout=10_000)
    started = time.perf_counter()
    send(tab, "Hi")  # its model comes back for the reply: the tab says so, nothing fails
    qtbot.waitUntil(lambda: tab.status_label.text() == f"loading {GEMMA}…" or not tab.is_generating,
                    timeout=REPLY_TIMEOUT_MS)  # fmt: skip
    wait_idle(qtbot, tab)
    assert loading == [GEMMA] and tab.entries[-1].status == "complete" and time.perf_counter() > started


def test_a_reply_waiting_for_its_models_load_can_be_stopped_and_the_other_tab_goes_on(
    qtbot: Any, make_window: Any, write_settings: Any, installed_gemma: Path
) -> None:
    """Room for one model only, and the loaded one is answering: the other tab's model waits to load
    (the tab says so); Stop ends that reply at once, the answering tab is not disturbed."""
    write_settings(sampling={"max_new_tokens": 900, "stop_on_eos": False, "seed": 7})
    window = make_window()
    window.client.apply_settings(dict(window.settings.kv_cache), dict(window.settings.batching),
                                 {"max_loaded_bytes": 1})  # fmt: skip
    busy, waiting = window.chat_tabs[0], window.new_chat()
    send(busy, "Tell me a long story")
    qtbot.waitUntil(lambda: busy.is_generating and busy.entries[-1].content != "", timeout=REPLY_TIMEOUT_MS)
    waiting.set_engine(engine_id(installed_gemma))
    send(waiting, "Hello there")
    qtbot.waitUntil(lambda: waiting.status_label.text() == f"loading {GEMMA}…", timeout=5000)
    assert busy.is_generating  # the model it would replace is answering: it is not unloaded
    waiting.stop_button.click()
    qtbot.waitUntil(lambda: not waiting.is_generating, timeout=5000)  # at once, not after the long reply
    assert busy.is_generating  # the long reply goes on
    assert (
        waiting.entries[-1].stats["finish_reason"] == "cancelled"
        and waiting.status_label.text() == "Stopped."
    )
    wait_idle(qtbot, busy)
    assert busy.entries[-1].status == "complete"


def test_stop_ends_a_reply_waiting_for_its_models_load_when_nothing_else_runs(
    qtbot: Any, make_window: Any, installed_gemma: Path
) -> None:
    window = make_window()
    window.client.apply_settings(dict(window.settings.kv_cache), dict(window.settings.batching),
                                 {"max_loaded_bytes": 1})  # fmt: skip
    pool = window.client.worker.local.pool
    pool.lease("app-tiny")  # held (as an API request would): gemma's load waits for its room
    try:
        tab = window.chat_tabs[0]
        tab.set_engine(engine_id(installed_gemma))
        send(tab, "Hello there")
        qtbot.waitUntil(lambda: tab.status_label.text() == f"loading {GEMMA}…", timeout=5000)
        tab.stop_button.click()
        qtbot.waitUntil(lambda: not tab.is_generating, timeout=5000)  # no step runs: Stop alone ends it
        assert tab.entries[-1].stats["finish_reason"] == "cancelled"
    finally:
        pool.release("app-tiny")


def test_the_in_app_server_serves_every_local_model_by_its_id(
    qtbot: Any, make_window: Any, installed_gemma: Path
) -> None:
    """Tools → Local server… on the window's pool: /v1/models lists the installed models, a request
    names its model (loaded on demand) and is answered by it; an unknown id is a 404 naming them."""
    import httpx

    from tests.app.test_local_server import free_port

    window = make_window()
    dialog = window.open_local_server()
    dialog.port.setValue(free_port())
    dialog.enabled.setChecked(True)
    qtbot.waitUntil(lambda: dialog.address.text().startswith("http://127.0.0.1:"), timeout=30_000)
    base = dialog.address.text()
    try:
        models = httpx.get(base + "/models", timeout=30).json()["data"]
        assert {m["id"] for m in models} == {"app-tiny", GEMMA}
        assert not window.client.worker.local.is_loaded(GEMMA)  # listed, not loaded until asked for
        replies: dict[str, httpx.Response] = {}

        def ask(model: str) -> None:  # a client program: off the GUI thread, which must keep stepping
            body = {"model": model, "prompt": "the quick", "max_tokens": 4, "temperature": 0}
            replies[model] = httpx.post(base + "/completions", json=body, timeout=60)

        for model in ("app-tiny", GEMMA):
            client = threading.Thread(target=ask, args=(model,))
            client.start()
            qtbot.waitUntil(lambda: not client.is_alive(), timeout=60_000)  # noqa: B023
            assert replies[model].status_code == 200, replies[model].text
            assert replies[model].json()["model"] == model and replies[model].json()["choices"][0]["text"]
        assert window.client.worker.local.is_loaded(GEMMA)  # loaded for the request
        missing = httpx.post(base + "/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
        assert missing.status_code == 404 and "app-tiny" in missing.text and GEMMA in missing.text
    finally:
        dialog.enabled.setChecked(False)
        qtbot.waitUntil(lambda: dialog.address.text() == "not running", timeout=30_000)


def test_document_passages_are_counted_by_the_tabs_own_model(
    qtbot: Any, make_window: Any, write_settings: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tab on a model with another vocabulary (SentencePiece, against the default's byte-level
    BPE): the documents' token budget is counted with its model's tokenizer, not the default's."""
    from engine import Tokenizer
    from engine.documents import DocumentIndex, default_index_path, retrieve
    from tests.app.test_documents_window import add_library, ask, use_library
    from tests.fixtures.tiny_model import write_tiny_model

    paths.models_dir().mkdir(parents=True, exist_ok=True)
    spm = write_tiny_model(paths.models_dir() / "tiny-spm.gguf", seed=3, tokenizer_model="llama",
                           context_length=1024).path  # fmt: skip
    notes = tmp_path / "notes"
    notes.mkdir()
    for name, text in (("lighthouse.md", "# Lighthouse\n\nThe lamp was first lit in 1848 by Ada Voss.\n"),
                       ("ferry.txt", "The ferry leaves the pier at seven and returns at noon.\n"),
                       ("garden.txt", "Tomatoes need six hours of sun each day.\n"),
                       ("tides.txt", "High tide comes twice a day, an hour later each day.\n")):  # fmt: skip
        (notes / name).write_text(text)
    write_settings(sampling={"max_new_tokens": 2, "seed": 1})
    window = make_window()
    add_library(qtbot, window, notes, monkeypatch).close()
    tab = window.chat_tabs[0]
    pick_model(qtbot, window, tab, spm)
    use_library(tab, "notes", 120)
    stats = ask(qtbot, tab, "Who first lit the lamp?")
    counts = {}
    with DocumentIndex(default_index_path()) as index:
        for name, path in (("spm", spm), ("default", window.client.worker.local.model_path)):
            tokenizer = Tokenizer.from_gguf(path)
            found = retrieve(index, ["notes"], "Who first lit the lamp?", 120,
                             lambda t, k=tokenizer: len(k.encode(t, parse_special=False)))  # fmt: skip
            counts[name] = found.n_tokens
    assert counts["spm"] != counts["default"]  # the two vocabularies count differently
    assert stats["documents_tokens"] == counts["spm"] and stats["citations"]
