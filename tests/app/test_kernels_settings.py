"""Settings → Batching → CPU threads: shown as "auto" at 0, applied live to the engine's kernels.
Settings → Batching → 8-bit activations: applied live, saved, restored at the next start, shown in
the dock; disabled with the reason where the worker says the CPU cannot run them.
Settings → KV cache → Cache precision: the 8-bit cache (q8_0) chosen, applied, and a reply generated
with it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from PySide6.QtWidgets import QCheckBox, QComboBox, QLabel, QSpinBox

from engine import kernels
from engine.batching import int8_activations_available
from smallmind_app import paths
from smallmind_app.settings.app_settings import AppSettings, load_settings
from smallmind_app.settings.dialog import SettingsDialog
from tests.fixtures.window import send, wait_idle


@pytest.fixture
def float32_after() -> Iterator[None]:
    """The kernels' process-wide activations put back (float32) for the tests after this one."""
    yield
    if kernels.backend() == "numba":
        kernels.set_activations("float32")


def int8_box(dialog: SettingsDialog) -> QCheckBox:
    box = dialog.fields["int8Activations"][3]
    assert isinstance(box, QCheckBox)
    return box


def saved_activations() -> str:
    on_disk = json.loads(paths.settings_file().read_text(encoding="utf-8"))["batching"]["activations"]
    assert load_settings()[0].batching["activations"] == on_disk
    return str(on_disk)


def choose_int8(qtbot: Any, window: Any, on: bool) -> dict[str, Any]:
    """Tick or untick the box in Settings and press OK; the worker's ``settings_applied``."""
    dialog = window.open_settings()
    int8_box(dialog).setChecked(on)
    with qtbot.waitSignal(window.client.worker.settings_applied, timeout=5000) as applied:
        dialog.ok_button.click()
    return dict(applied.args[0])


@pytest.mark.skipif(not int8_activations_available(), reason="this CPU cannot run 8-bit activations")
def test_int8_activations_apply_live_are_saved_and_restored_at_start(
    qtbot: Any, make_window: Any, float32_after: None
) -> None:
    window = make_window()
    box = int8_box(window.open_settings())
    assert not box.isChecked() and box.isEnabled() and kernels.activations() == "float32"
    assert "AVX-512 VNNI" in box.toolTip() and "greedy" in box.toolTip()
    window.settings_dialog.reject()
    applied = choose_int8(qtbot, window, True)
    assert applied["batching"]["activations"] == "int8" == applied["kernels"]["activations"]
    assert kernels.activations() == "int8"  # process-wide, from the next step on
    assert window.settings.batching["activations"] == "int8" == saved_activations()
    dock = window.stats_dock.labels["statKernels"]
    qtbot.waitUntil(lambda: "activations: int8" in dock.text(), timeout=5000)
    assert dock.text().startswith("numba · ")
    tab = window.chat_tabs[0]
    send(tab, "Hello")  # a reply in the 8-bit mode
    wait_idle(qtbot, tab)
    assert tab.entries[-1].role == "assistant" and "error" not in tab.entries[-1].stats
    window.close()
    kernels.set_activations("float32")  # the next start must set it again from the file
    window = make_window()
    assert kernels.activations() == "int8" and int8_box(window.open_settings()).isChecked()
    window.settings_dialog.reject()
    qtbot.waitUntil(
        lambda: "activations: int8" in window.stats_dock.labels["statKernels"].text(), timeout=5000
    )
    applied = choose_int8(qtbot, window, False)
    assert applied["batching"]["activations"] == "float32" == applied["kernels"]["activations"]
    assert kernels.activations() == "float32" and saved_activations() == "float32"
    qtbot.waitUntil(lambda: "activations" not in window.stats_dock.labels["statKernels"].text(), timeout=5000)


def test_int8_activations_are_disabled_where_the_worker_says_they_cannot_run(
    qtbot: Any, make_window: Any
) -> None:
    """The worker's fact (sent with ``settings_applied``, as at start) disables the box and says why,
    in an open dialog and in one opened later; the fact turning true enables it again."""
    window = make_window()
    dialog = window.open_settings()
    assert int8_box(dialog).isEnabled() == int8_activations_available()  # the worker's real fact
    unavailable = {"path": "numba", "threads": 1, "int8_available": False, "activations": "float32"}
    window.client.worker.settings_applied.emit({"kernels": unavailable})
    note = dialog.findChild(QLabel, "int8ActivationsNote")
    assert not int8_box(dialog).isEnabled() and not note.isHidden()
    assert "lacks AVX-512 VNNI" in note.text() and "lacks AVX-512 VNNI" in int8_box(dialog).toolTip()
    dialog.reject()
    window.dialogs.settings_dialog = None  # the next one is made anew, from the fact kept
    dialog = window.open_settings()
    assert not int8_box(dialog).isEnabled() and "lacks AVX-512 VNNI" in dialog.int8_note.text()
    window.client.worker.settings_applied.emit({"kernels": {**unavailable, "int8_available": True}})
    assert int8_box(dialog).isEnabled() and dialog.int8_note.isHidden()
    assert "lacks" not in int8_box(dialog).toolTip()
    dialog.reject()


def test_a_saved_int8_choice_survives_a_computer_without_it(qtbot: Any) -> None:
    """Settings copied from another computer: the box shows the choice, disabled, the NumPy path's
    reason below; OK keeps the choice (nothing is lost) and Restore defaults turns it off."""
    settings = AppSettings().with_changes(batching={"activations": "int8"})
    dialog = SettingsDialog(settings, None, kernels={"path": "numpy", "int8_available": False})
    qtbot.addWidget(dialog)
    box = int8_box(dialog)
    assert box.isChecked() and not box.isEnabled()
    assert "NumPy kernels" in dialog.int8_note.text()
    assert dialog.chosen_settings().batching["activations"] == "int8"
    dialog.restore_defaults()
    assert not box.isChecked() and dialog.chosen_settings().batching["activations"] == "float32"


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
