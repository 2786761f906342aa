"""Two small parts of a tab with a behaviour of their own: the system prompt's editor (shown by its
toggle, saved a moment after typing stops) and the buttons offered when a setting caused the last
problem ("Settings: …", "Raise to … and send"). The widgets are built in ``tab_widgets.py``."""

from __future__ import annotations

from PySide6.QtCore import QObject, Qt, QTimer, Signal, Slot
from PySide6.QtWidgets import QPlainTextEdit, QPushButton, QToolButton

from ..wording import problem_buttons

SYSTEM_PROMPT_SAVE_DELAY_MS = 600
TOGGLE_CHARS = 90  # the toggle shows the prompt's start, on one line


class SystemPromptEditor(QObject):
    """The toggle shows or hides the box and the prompt's first words; the box edits it."""

    edited = Signal(str)  # every change: the prompt as it is now
    save_due = Signal()  # typing stopped (or the tab closes): the prompt should be saved

    def __init__(self, toggle: QToolButton, edit: QPlainTextEdit, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.toggle, self.edit = toggle, edit
        self._timer = QTimer(self, interval=SYSTEM_PROMPT_SAVE_DELAY_MS)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.save_due)
        toggle.toggled.connect(self._on_toggle_toggled)
        edit.textChanged.connect(self._on_edit_text_changed)
        self._show_summary()

    def flush(self) -> None:
        """Save now what waits for the timer."""
        if self._timer.isActive():
            self._timer.stop()
            self.save_due.emit()

    @Slot()
    def _on_edit_text_changed(self) -> None:
        self._show_summary()
        self.edited.emit(self.edit.toPlainText())
        self._timer.start()

    @Slot(bool)
    def _on_toggle_toggled(self, shown: bool) -> None:
        self.edit.setVisible(shown)
        self.toggle.setArrowType(Qt.ArrowType.DownArrow if shown else Qt.ArrowType.RightArrow)
        if shown:
            self.edit.setFocus()

    def _show_summary(self) -> None:
        text = " ".join(self.edit.toPlainText().split()) or "(the model's own)"
        short = text if len(text) <= TOGGLE_CHARS else text[: TOGGLE_CHARS - 3] + "…"
        self.toggle.setText(f"System prompt: {short}")
        self.toggle.setToolTip("Show or edit this conversation's system prompt")


class ProblemOffer(QObject):
    """Offer the buttons that fix the last problem: open Settings at its setting, or raise that
    setting to a value that would do and send again."""

    settings_wanted = Signal(str)  # the setting ("kv_cache.max_bytes_total") to open Settings at
    raise_wanted = Signal(str, int)  # setting, value: change it, then send again

    def __init__(self, fix: QPushButton, raise_: QPushButton, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.fix, self.raise_ = fix, raise_
        self.setting: str = ""
        self.suggested: int | None = None
        fix.clicked.connect(lambda: self.settings_wanted.emit(self.setting))
        raise_.clicked.connect(self._on_raise_clicked)
        self.show("", None)

    def show(self, setting: str, suggested: int | None) -> None:
        self.setting, self.suggested = setting, suggested
        (fix_text, fix_tip), raise_texts = problem_buttons(setting, suggested)
        self.fix.setText(fix_text)
        self.fix.setToolTip(fix_tip)
        self.fix.setVisible(bool(setting))
        if raise_texts is not None:
            self.raise_.setText(raise_texts[0])
            self.raise_.setToolTip(raise_texts[1])
        self.raise_.setVisible(bool(setting and suggested))

    @Slot()
    def _on_raise_clicked(self) -> None:
        setting, suggested = self.setting, self.suggested
        if setting and suggested:
            self.show("", None)
            self.raise_wanted.emit(setting, int(suggested))
