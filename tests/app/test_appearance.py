"""Themes applied live on the real window, system prompt presets, and the desktop entry."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QComboBox, QInputDialog, QToolButton

from smallmind_app import colors as theme
from smallmind_app import desktop_entry
from smallmind_app.chat.preset_menu import PresetMenu
from smallmind_app.colors import DARK, LIGHT
from smallmind_app.settings.app_settings import AppSettings, load_settings
from smallmind_app.settings.presets import DEFAULT_PRESETS
from tests.fixtures.window import LONG, send, wait_idle, wait_text

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _light_again() -> Any:
    """The theme is the app's (a module's state and the app palette): light again for the next tests."""
    yield
    from smallmind_app.window.theme_manager import ThemeManager

    ThemeManager("light").set_choice("light")


def _window_color() -> QColor:
    return QApplication.instance().palette().color(QPalette.ColorRole.Window)  # type: ignore[union-attr]


def _choose_theme(window: Any, value: str) -> None:
    dialog = window.open_settings()
    combo = dialog.findChild(QComboBox, "themeSetting")
    combo.setCurrentIndex(combo.findData(value))
    dialog.apply_button.click()
    dialog.reject()


def test_theme_switch_changes_the_palette_and_the_colors_live(
    qtbot: Any, make_window: Any, write_settings: Any
) -> None:
    write_settings(sampling=LONG, theme="light")
    window = make_window()
    tab = window.chat_tabs[0]
    assert _window_color() == QColor(LIGHT["window"]) and theme.current() == "light"
    dialog = window.open_settings()
    combo = dialog.findChild(QComboBox, "themeSetting")
    assert [combo.itemText(i) for i in range(combo.count())] == ["Follow system", "Light", "Dark"]
    assert combo.currentData() == "light"
    dialog.reject()

    send(tab, "Hello")
    wait_text(qtbot, tab)
    _choose_theme(window, "dark")  # while a reply streams
    assert _window_color() == QColor(DARK["window"]) and theme.current() == "dark"
    assert QApplication.instance().style().name().lower() == "fusion"  # type: ignore[union-attr]
    index = window.tabs.indexOf(tab)
    assert window.tabs.tabBar().tabTextColor(index) == QColor(DARK["busy"])  # the busy tab
    html = tab.transcript.toHtml()
    assert DARK["user"] in html and LIGHT["user"] not in html  # the transcript was rendered again
    assert window.stats_dock.tokens_plot.color == QColor(DARK["sparkline_tokens"])
    viewport = window.history.view.viewport()

    def corner() -> QColor:  # an empty spot of the history list, as painted now
        return viewport.grab().toImage().pixelColor(viewport.width() - 4, viewport.height() - 4)

    qtbot.waitUntil(lambda: corner() == QColor(DARK["base"]), timeout=5000)
    tab.stop_button.click()
    wait_idle(qtbot, tab)
    assert load_settings()[0].theme == "dark"  # saved

    window.close()
    window = make_window()  # and used at the next start
    assert _window_color() == QColor(DARK["window"])
    _choose_theme(window, "light")
    assert _window_color() == QColor(LIGHT["window"])
    assert LIGHT["user"] in window.chat_tabs[0].transcript.toHtml() or not window.chat_tabs[0].entries


def test_follow_the_system_color_scheme(make_window: Any, write_settings: Any) -> None:
    write_settings(theme="system")
    window = make_window()
    system = QApplication.instance().styleHints().colorScheme()  # type: ignore[union-attr]
    expected = "dark" if system == Qt.ColorScheme.Dark else "light"
    assert theme.current() == expected and window.theme.choice == "system"
    window.theme._on_style_hints_color_scheme_changed(Qt.ColorScheme.Dark)  # the desktop switches
    assert theme.current() == "dark" and _window_color() == QColor(DARK["window"])
    window.theme._on_style_hints_color_scheme_changed(Qt.ColorScheme.Light)
    assert theme.current() == "light" and _window_color() == QColor(LIGHT["window"])
    _choose_theme(window, "dark")  # a theme chosen by hand is kept when the system switches
    window.theme._on_style_hints_color_scheme_changed(Qt.ColorScheme.Light)
    assert theme.current() == "dark"


def test_a_bad_theme_in_the_settings_file_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="theme must be one of system, light, dark, got 'blue'"):
        AppSettings(theme="blue")
    with pytest.raises(ValueError, match="prompt_presets"):
        AppSettings(prompt_presets={"": "x"})


def _menu(tab: Any) -> PresetMenu:
    menu = tab.findChild(QToolButton, "presetButton").menu()
    menu.fill()  # what aboutToShow does
    return menu


def _action(menu: Any, text: str) -> Any:
    return next(a for a in menu.actions() if a.text() == text)


def test_presets_set_the_tabs_system_prompt_and_can_be_saved_and_deleted(
    qtbot: Any, make_window: Any
) -> None:
    window = make_window()
    tab = window.chat_tabs[0]
    menu = _menu(tab)
    names = [a.text() for a in menu.actions() if a.isCheckable()]
    assert names[:4] == ["Helpful assistant", "Concise", "Code reviewer", "Translator"]
    _action(menu, "Concise").trigger()
    assert tab.system_prompt == DEFAULT_PRESETS["Concise"]
    assert _action(_menu(tab), "Concise").isChecked()
    with qtbot.waitSignal(tab.generation_requested) as sent:
        send(tab, "Hi")
    assert sent.args[1][0] == {"role": "system", "content": DEFAULT_PRESETS["Concise"]}  # what the model sees
    wait_idle(qtbot, tab)
    qtbot.waitUntil(
        lambda: (
            window.store.get_conversation(tab.conversation_id).system_prompt == DEFAULT_PRESETS["Concise"]
        ),
        timeout=5000,
    )

    tab.set_system_prompt("You are a pirate. Answer like one.")
    _action(_menu(tab), "Save this prompt as a preset…").trigger()
    dialog = window.findChild(QInputDialog, "presetNameDialog")
    dialog.setTextValue("  Pirate ")
    dialog.accept()
    assert window.settings.prompt_presets["Pirate"] == "You are a pirate. Answer like one."
    assert load_settings()[0].prompt_presets["Pirate"] == "You are a pirate. Answer like one."

    delete_menu = next(a.menu() for a in _menu(tab).actions() if a.menu() and a.text() == "Delete preset")
    _action(delete_menu, "Concise").trigger()
    assert "Concise" not in window.settings.prompt_presets

    window.close()
    window = make_window()  # kept in the settings; the Chat menu's presets act on the current tab
    other = window.new_chat()
    window.preset_menu.fill()
    assert "Concise" not in [a.text() for a in window.preset_menu.actions()]
    _action(window.preset_menu, "Pirate").trigger()
    assert other.system_prompt == "You are a pirate. Answer like one."


def test_desktop_entry_is_written_with_a_working_command_and_the_icon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    result = subprocess.run(
        [sys.executable, "-m", "smallmind_cli", "install-desktop-entry"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    entry, icon = desktop_entry.entry_paths(tmp_path / "share")
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(entry, encoding="utf-8")
    section = parser["Desktop Entry"]
    assert (
        section["Type"] == "Application" and section["Name"] == "SmallMind" and section["Icon"] == "smallmind"
    )
    program = section["Exec"].split()[0].strip('"')
    assert Path(program).is_file() and os.access(program, os.X_OK)
    assert icon.read_bytes() == desktop_entry.ICON_FILE.read_bytes() and b"<svg" in icon.read_bytes()
    packaged = (REPO_ROOT / "resources" / "smallmind.desktop").read_text(encoding="utf-8")
    assert packaged == desktop_entry.entry_text(["smallmind"])  # the packagers' copy says the same

    removed = subprocess.run(
        [sys.executable, "-m", "smallmind_cli", "install-desktop-entry", "--remove"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert removed.returncode == 0 and not entry.exists() and not icon.exists()
    assert desktop_entry._quoted("/opt/my apps/python") == '"/opt/my apps/python"'


def test_desktop_entry_into_a_folder_that_cannot_be_written_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("XDG_DATA_HOME", str(blocker))
    assert desktop_entry.main([]) == 1
    assert "smallmind install-desktop-entry:" in capsys.readouterr().err
