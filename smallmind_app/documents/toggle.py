"""A tab's Documents button: which libraries this conversation's messages draw passages from, and
the token budget the passages may take (both remembered with the conversation)."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import Signal
from PySide6.QtGui import QAction, QActionGroup
from PySide6.QtWidgets import QMenu, QToolButton, QWidget

from .choices import BUDGET_CHOICES, toggle_text


class DocumentsToggle(QToolButton):
    changed = Signal(list, int)  # the libraries chosen, the budget in tokens

    def __init__(self, libraries: Sequence[str], budget_tokens: int, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("documentsToggle")
        self.setAutoRaise(True)
        self.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.setToolTip("Documents: the libraries whose passages go with your messages (Tools → Documents…)")
        self.chosen = list(libraries)
        self.budget_tokens = budget_tokens
        self.available: list[str] = []
        self.setMenu(QMenu(self))
        self.set_available([])

    def set_available(self, names: Sequence[str]) -> None:
        """The libraries there are (a chosen one that is gone stays chosen: it is said missing)."""
        self.available = list(names)
        menu = self.menu()
        menu.clear()
        for name in dict.fromkeys([*self.available, *self.chosen]):
            action = QAction(name if name in self.available else f"{name} (missing)", menu, checkable=True)
            action.setObjectName(f"library:{name}")
            action.setChecked(name in self.chosen)
            action.toggled.connect(lambda on, name=name: self.choose(name, on))
            menu.addAction(action)
        if not self.available and not self.chosen:
            menu.addAction("No libraries yet: Tools → Documents…").setEnabled(False)
        budget = menu.addMenu("Passages may take")
        group = QActionGroup(budget)
        for tokens in sorted({*BUDGET_CHOICES, self.budget_tokens}):
            action = QAction(f"{tokens:,} tokens", budget, checkable=True)
            action.setObjectName(f"budget:{tokens}")
            action.setChecked(tokens == self.budget_tokens)
            action.triggered.connect(lambda _checked, tokens=tokens: self.set_budget(tokens))
            group.addAction(action)
            budget.addAction(action)
        self._show()

    def choose(self, name: str, on: bool) -> None:
        chosen = [n for n in self.chosen if n != name] + ([name] if on else [])
        if chosen != self.chosen:
            self.chosen = chosen
            self._show()
            self.changed.emit(list(self.chosen), self.budget_tokens)

    def set_budget(self, tokens: int) -> None:
        if tokens != self.budget_tokens:
            self.budget_tokens = tokens
            self._show()
            self.changed.emit(list(self.chosen), tokens)

    def _show(self) -> None:
        self.setText(toggle_text(self.chosen, self.budget_tokens))
