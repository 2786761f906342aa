"""Settings → Batching → CPU threads: shown as "auto" at 0, applied live to the engine's kernels."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QSpinBox

from engine import kernels


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
    assert "compiling" not in window.model_label.text()  # loaded: the label names the model again
