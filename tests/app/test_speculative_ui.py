"""Speculative decoding in the window: Settings → Batching (specEnabled, specMaxDraftTokens) applied
live to the engine, the dock's tokens per step (statTokensPerStep), each reply's footer."""

from __future__ import annotations

from typing import Any

from PySide6.QtWidgets import QCheckBox, QSpinBox

from tests.fixtures.window import send, stat_number, wait_idle

# The tiny random model repeats itself under greedy decoding: its drafts are often right.
REPEATING = {"max_new_tokens": 60, "temperature": 0.0, "repetition_penalty": 1.0, "stop_on_eos": False}


def test_drafting_settings_apply_live_and_are_saved(qtbot: Any, make_window: Any) -> None:
    window = make_window()
    dialog = window.open_settings()
    check, box = dialog.fields["specEnabled"][3], dialog.fields["specMaxDraftTokens"][3]
    assert isinstance(check, QCheckBox) and check.isChecked()
    assert isinstance(box, QSpinBox) and box.value() == 7 and box.maximum() == 16
    box.setValue(3)
    check.setChecked(False)
    with qtbot.waitSignal(window.client.worker.settings_applied, timeout=5000) as applied:
        dialog.ok_button.click()
    assert applied.args[0]["batching"]["draft_tokens"] == 3
    assert applied.args[0]["batching"]["speculative"] is False
    engine = window.client.worker.local.engine
    assert engine.batching_options.draft_tokens == 3 and not engine.batching_options.speculative
    assert window.settings.batching["draft_tokens"] == 3 and window.settings.batching["speculative"] is False
    tab = window.chat_tabs[0]
    tab.set_sampling_overrides(REPEATING)
    send(tab, "one two three one two three one two three")
    wait_idle(qtbot, tab)
    assert engine.metrics.snapshot().drafted_tokens == 0  # off: nothing drafted
    assert "tokens per step" not in tab.transcript.toPlainText()


def test_dock_and_footer_show_tokens_per_step(qtbot: Any, make_window: Any, write_settings: Any) -> None:
    write_settings(sampling=REPEATING)
    window = make_window()
    tab = window.chat_tabs[0]
    send(tab, "one two three one two three one two three")
    wait_idle(qtbot, tab)
    reply = tab.entries[-1]
    metrics = window.client.worker.local.engine.metrics.snapshot()
    assert metrics.drafted_tokens > 0
    assert reply.stats["tokens_per_step"] > 1.0  # the one reply: its steps are the engine's
    assert abs(reply.stats["tokens_per_step"] - metrics.mean_accepted_length) < 1e-9
    assert f"{reply.stats['tokens_per_step']:.1f} tokens per step" in tab.transcript.toPlainText()

    def dock_shows_the_final_figure() -> bool:  # until the stats sent after the reply's end arrive, the
        value = stat_number(window, "statTokensPerStep")  # dock may show a figure taken mid-reply
        return abs(value - metrics.mean_accepted_length) < 0.01

    qtbot.waitUntil(dock_shows_the_final_figure, timeout=5000)
    assert "drafted accepted" in window.stats_dock.labels["statTokensPerStep"].text()
