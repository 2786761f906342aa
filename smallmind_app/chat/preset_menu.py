"""The system prompt presets' menus: a tab's "Presets" button and Chat → System prompt presets.

``PresetMenu``: picking a preset sets the tab's system prompt; "Save this prompt as a preset…" names
the tab's current prompt; "Delete preset" removes one. ``PresetController`` makes those menus for the
main window and carries out what they ask; the window's ``save`` callback puts the changed presets
in the settings and saves them (the presets themselves: ``settings/presets.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtWidgets import QInputDialog, QMainWindow, QMenu, QToolButton, QWidget

from ..settings.presets import clean_name

if TYPE_CHECKING:
    from .tab import ChatTab


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
