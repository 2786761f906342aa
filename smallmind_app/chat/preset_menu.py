"""The system prompt presets' menus: a tab's "Presets" button and Chat → System prompt presets.

``PresetMenu``: picking a preset sets the tab's system prompt (and, for a preset tied to a model,
the tab's model); "Save this prompt as a preset…" names the tab's current prompt; "Tie to this
chat's model" ties a preset to the tab's model (again: unties it); "Delete preset" removes one.
``PresetController`` makes those menus for the main window and carries out what they ask; the
window's ``save`` callbacks put the changed presets in the settings and save them (the presets
themselves: ``settings/presets.py``).
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
    tie_requested = Signal(str)  # name: tie it to the tab's model (or untie it)

    def __init__(
        self,
        presets: Callable[[], Mapping[str, str]],
        current: Callable[[], str],
        parent: QWidget | None = None,
        tied: Callable[[], Mapping[str, str]] = dict,
        label_of: Callable[[str], str] = str,
    ) -> None:
        super().__init__("System prompt &presets", parent)
        self.setObjectName("presetMenu")
        self._presets = presets
        self._current = current
        self._tied = tied  # preset name -> the engine id of the model it is tied to
        self._label_of = label_of  # engine id -> its label in the pickers
        self.aboutToShow.connect(self.fill)

    def fill(self) -> None:
        self.clear()
        presets, current, tied = self._presets(), self._current(), self._tied()
        for name, text in presets.items():
            action = self.addAction(f"{name}  ({self._label_of(tied[name])})" if name in tied else name)
            action.setObjectName(f"preset:{name}")
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
        tie = self.addMenu("Tie to this chat's model")
        tie.setObjectName("presetTieMenu")
        tie.setEnabled(bool(presets))
        for name in presets:
            tie.addAction(name).triggered.connect(lambda _=False, n=name: self.tie_requested.emit(n))
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
        tied: Callable[[], Mapping[str, str]] = dict,
        save_tied: Callable[[dict[str, str]], None] = lambda _tied: None,
        label_of: Callable[[str], str] = str,
    ) -> None:
        super().__init__(window)
        self.window = window
        self._presets = presets
        self._save = save
        self._current = current  # the tab shown
        self._tied = tied  # preset name -> engine id of the model it is tied to
        self._save_tied = save_tied
        self._label_of = label_of

    def menu(self, parent: QWidget, tab: ChatTab | None = None) -> PresetMenu:
        """The presets menu of ``tab`` (None: of whichever tab is current when it is used)."""

        def target() -> ChatTab | None:
            return tab if tab is not None else self._current()

        current = lambda: t.system_prompt if (t := target()) else ""  # noqa: E731
        menu = PresetMenu(self._presets, current, parent, self._tied, self._label_of)
        menu.preset_chosen.connect(lambda name, text: self.use(target(), name, text))
        menu.tie_requested.connect(lambda name: self.tie(target(), name))
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
        """The preset's prompt for the tab, and its model when the preset is tied to one."""
        if tab is None:
            return
        tab.set_system_prompt(text)
        engine_id = self._tied().get(name)
        if engine_id is not None and not tab.is_generating and engine_id != tab.engine_picker.engine_id:
            tab.set_engine(engine_id)
        with_model = f" with {self._label_of(engine_id)}" if engine_id else ""
        tab.status_label.setText(f"System prompt: “{name}”{with_model}.")

    def tie(self, tab: ChatTab | None, name: str) -> None:
        """Tie the preset to the tab's model (picking it then switches to that model); tied to it
        already: untie it."""
        if tab is None:
            return
        tied = dict(self._tied())
        engine_id = tab.engine_picker.engine_id
        if tied.get(name) == engine_id:
            del tied[name]
            message = f"The preset “{name}” is tied to no model now."
        else:
            tied[name] = engine_id
            message = f"The preset “{name}” now also picks {self._label_of(engine_id)}."
        self._save_tied(tied)
        self.window.statusBar().showMessage(message, 6000)

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
        if name in self._tied():
            self._save_tied({k: v for k, v in self._tied().items() if k != name})
