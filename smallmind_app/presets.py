"""System prompt presets: named system prompts the user saves and picks, kept in the app settings.

``DEFAULT_PRESETS`` are the ones a new install starts with. ``PresetMenu`` is the menu of a tab's
"Presets" button and of Chat → System prompt presets: picking a preset sets the tab's system prompt;
"Save this prompt as a preset…" names the tab's current prompt; "Delete preset" removes one. It
emits what the user chose; the main window changes the settings and saves them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import QMenu, QWidget

DEFAULT_PRESETS: Mapping[str, str] = {
    "Helpful assistant": "You are a helpful AI assistant. Answer clearly and accurately.",
    "Concise": "You are a concise assistant. Answer in as few words as possible, without preamble.",
    "Code reviewer": (
        "You are an experienced code reviewer. Point out bugs, unclear names and missing tests first, "
        "then suggest concrete improvements with short code examples."
    ),
    "Translator": (
        "You are a translator. Translate the user's text into English (or, if it is English, into "
        "French), keeping its meaning and tone. Reply with the translation only."
    ),
    "Writing editor": (
        "You are a careful editor. Improve the user's text for clarity and grammar, keep their voice, "
        "and list the main changes briefly."
    ),
}
MAX_NAME_CHARS = 60


def check_presets(value: Any) -> dict[str, str]:
    """``value`` as {name: prompt}; ValueError naming the problem (names: non-empty, at most 60 chars)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"prompt_presets must be an object of name: prompt, got {value!r}")
    presets = {}
    for name, text in value.items():
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise ValueError(f"prompt_presets: a name must be 1 to {MAX_NAME_CHARS} characters, got {name!r}")
        if not isinstance(text, str):
            raise ValueError(f"prompt_presets[{name!r}] must be a string, got {text!r}")
        presets[name] = text
    return presets


def clean_name(name: str) -> str:
    return " ".join(name.split())[:MAX_NAME_CHARS]


class PresetMenu(QMenu):
    """The presets, then "Save this prompt as a preset…" and "Delete preset ▸"; filled when shown."""

    preset_chosen = Signal(str, str)  # name, prompt: set it as the tab's system prompt
    save_requested = Signal()  # name the current tab's prompt
    delete_requested = Signal(str)  # name

    def __init__(
        self,
        presets: Callable[[], Mapping[str, str]],
        current: Callable[[], str],
        parent: QWidget | None = None,
    ) -> None:
        super().__init__("System prompt &presets", parent)
        self.setObjectName("presetMenu")
        self._presets = presets
        self._current = current
        self.aboutToShow.connect(self.fill)

    def fill(self) -> None:
        self.clear()
        presets, current = self._presets(), self._current()
        for name, text in presets.items():
            action = self.addAction(name)
            action.setCheckable(True)
            action.setChecked(text == current)
            action.setToolTip(text)
            action.triggered.connect(lambda _=False, n=name, t=text: self.preset_chosen.emit(n, t))
        if not presets:
            self.addAction("(no presets)").setEnabled(False)
        self.setToolTipsVisible(True)
        self.addSeparator()
        save = self.addAction("Save this prompt as a preset…")
        save.setObjectName("presetSave")
        save.triggered.connect(self.save_requested)
        delete = self.addMenu("Delete preset")
        delete.setObjectName("presetDeleteMenu")
        delete.setEnabled(bool(presets))
        for name in presets:
            delete.addAction(name).triggered.connect(lambda _=False, n=name: self.delete_requested.emit(n))
