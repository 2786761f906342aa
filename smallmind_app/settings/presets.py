"""System prompt presets: named system prompts the user saves and picks, kept in the app settings.

``DEFAULT_PRESETS`` are the ones a new install starts with. ``PresetMenu`` is the menu of a tab's
"Presets" button and of Chat → System prompt presets: picking a preset sets the tab's system prompt;
"Save this prompt as a preset…" names the tab's current prompt; "Delete preset" removes one.
``PresetController`` makes those menus for the main window and carries out what they ask; the
window's ``save`` callback puts the changed presets in the settings and saves them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QInputDialog, QMainWindow, QMenu, QToolButton, QWidget

if TYPE_CHECKING:
    from ..chat.tab import ChatTab

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


class PresetController(QObject):
    """The presets' menus and dialogs of one main window (it shows the messages in its status bar)."""

    def __init__(
        self,
        window: QMainWindow,
        presets: Callable[[], Mapping[str, str]],
        save: Callable[[dict[str, str]], None],
        current: Callable[[], ChatTab | None],
    ) -> None:
        super().__init__(window)
        self.window = window
        self._presets = presets
        self._save = save
        self._current = current  # the tab shown

    def menu(self, parent: QWidget, tab: ChatTab | None = None) -> PresetMenu:
        """The presets menu of ``tab`` (None: of whichever tab is current when it is used)."""

        def target() -> ChatTab | None:
            return tab if tab is not None else self._current()

        menu = PresetMenu(self._presets, lambda: t.system_prompt if (t := target()) else "", parent)
        menu.preset_chosen.connect(lambda name, text: self.use(target(), name, text))
        menu.save_requested.connect(lambda: self.ask_name(target()))
        menu.delete_requested.connect(self.delete)
        return menu

    def add_button(self, tab: ChatTab) -> QToolButton:
        """The tab's "Presets" button, beside its system prompt."""
        button = QToolButton(tab, objectName="presetButton", text="Presets")
        button.setAutoRaise(True)
        button.setToolTip("Pick a saved system prompt for this chat, or save this one")
        button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        button.setMenu(self.menu(button, tab))
        tab.header_row.insertWidget(1, button)
        return button

    def use(self, tab: ChatTab | None, name: str, text: str) -> None:
        if tab is not None:
            tab.set_system_prompt(text)
            tab.status_label.setText(f"System prompt: “{name}”.")

    def ask_name(self, tab: ChatTab | None) -> QInputDialog | None:
        if tab is None or not tab.system_prompt.strip():
            self.window.statusBar().showMessage("This chat has no system prompt to save.", 6000)
            return None
        dialog = QInputDialog(self.window, objectName="presetNameDialog")
        dialog.setWindowTitle("Save system prompt")
        dialog.setLabelText("Name of this preset:")
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        prompt = tab.system_prompt
        dialog.textValueSelected.connect(lambda name: self.save(name, prompt))
        dialog.open()
        return dialog

    def save(self, name: str, text: str) -> None:
        """Add (or replace) the preset ``name``."""
        name = clean_name(name)
        if name:
            self._save({**self._presets(), name: text})
            self.window.statusBar().showMessage(f"Saved the preset “{name}”.", 6000)

    def delete(self, name: str) -> None:
        self._save({k: v for k, v in self._presets().items() if k != name})
