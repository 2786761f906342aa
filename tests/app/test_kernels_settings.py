"""Settings → Batching → CPU threads: shown as "auto" at 0, applied live to the engine's kernels.
Settings → KV cache → Cache precision: the 8-bit cache (q8_0) chosen, applied, and a reply generated
with it."""

from __future__ import annotations

from typing import Any

import pytest
from PySide6.QtWidgets import QComboBox, QSpinBox

from engine import kernels
from tests.fixtures.window import send, wait_idle


def test_cpu_threads_setting_applies_live_and_is_saved(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    box = dialog.fields["cpuThreads"][3]
    assert isinstance(box, QSpinBox) and box.value() == 0 and box.text() == "auto"
    box.setValue(1)
    with qtbot.waitSignal(window.client.worker.settings_applied, timeout=5000) as applied:
        dialog.ok_button.click()
    assert applied.args[0]["batching"]["cpu_threads"] == 1  # in the engine's options
    assert kernels.requested_threads() == 1 and kernels.threads() == 1  # from the next step on
    assert window.settings.batching["cpu_threads"] == 1
    dialog = window.open_settings()
    box = dialog.fields["cpuThreads"][3]
    box.setValue(0)
    with qtbot.waitSignal(window.client.worker.settings_applied, timeout=5000):
        dialog.ok_button.click()
    assert kernels.requested_threads() == 0 and 1 <= kernels.threads() <= kernels.available_cpus()
    assert window.settings.batching["cpu_threads"] == 0


def test_q8_0_cache_precision_applies_and_a_reply_is_generated(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    combo = dialog.fields["kvDtype"][3]
    assert isinstance(combo, QComboBox)
    assert [combo.itemText(i) for i in range(combo.count())] == ["float32", "float16", "q8_0"]
    combo.setCurrentText("q8_0")
    with qtbot.waitSignal(window.client.worker.settings_applied, timeout=5000) as applied:
        dialog.ok_button.click()
    assert applied.args[0]["kv_cache"]["dtype"] == "q8_0"
    assert applied.args[0]["bytes_per_token"] == 2 * 4 * 2 * (32 + 2)  # the app's tiny model, int8 rows
    assert window.settings.kv_cache["dtype"] == "q8_0"
    tab = window.chat_tabs[0]
    send(tab, "Hello")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.role == "assistant" and reply.content and "error" not in reply.stats


def test_first_start_says_the_kernels_are_compiling(
    qtbot: Any, make_window: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """With no compiled kernels on disk, the loading line says why the first start takes longer."""
    if kernels.backend() != "numba":
        return
    window = make_window()
    notes: list[str] = []
    window.client.worker.model_loading.connect(lambda path, note: notes.append(note))
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing compiled there
    with qtbot.waitSignal(window.client.worker.model_loaded, timeout=60_000):
        window.client.load_model("")
    assert notes and "compiling the kernels" in notes[0]
    # loaded: once the window has handled it, the label names the model again
    qtbot.waitUntil(lambda: "compiling" not in window.model_label.text(), timeout=10_000)


@pytest.mark.gemma3
def test_a_base_model_is_named_as_one(qtbot: Any, make_window: Any, gemma3_path: Any) -> None:
    """Gemma 3 270M has no chat template: the window says it continues text; SmolLM2's does not."""
    window = make_window(model=gemma3_path)
    assert window.model_info["architecture"] == "gemma3" and window.model_info["base_model"]
    assert "base model" in window.model_label.text()
    tab = window.chat_tabs[0]
    tab.set_sampling_overrides({"max_new_tokens": 6, "temperature": 0.0})
    send(tab, "What is the capital of France?")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    assert reply.role == "assistant" and reply.status in ("complete", "partial"), reply.stats
    assert reply.content.strip()  # the base model answered in Gemma's turn format
