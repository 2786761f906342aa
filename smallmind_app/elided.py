"""Labels and buttons whose text is cut with "…" to fit their width, so the window's minimum width
never follows a long text (a system prompt, an engine's name, a setting's label).

The whole text stays the widget's ``text()`` and ``sizeHint`` (it is shown whole when there is
room) and is put in the tooltip when it is cut; the minimum width is that of the first
``MIN_CHARS`` characters. Plain text only.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QResizeEvent
from PySide6.QtWidgets import QLabel, QPushButton, QToolButton

MIN_CHARS = 12


class _Elides:
    """Mixin for a Qt widget with ``text()``/``setText()`` (put it before the Qt class)."""

    _full: str = ""
    _tip: str = ""
    min_chars: int = MIN_CHARS

    def setText(self, text: str) -> None:
        self._full = text
        self._show()
        self.updateGeometry()  # type: ignore[attr-defined]

    def text(self) -> str:
        return self._full

    def shown_text(self) -> str:
        """What the widget shows now (cut with "…" when its width is short)."""
        return str(super().text())  # type: ignore[misc]

    def setToolTip(self, tip: str) -> None:
        self._tip = tip
        self._show()

    def _chrome(self) -> int:
        """The width around the text (margins, an icon, a frame)."""
        shown = self.shown_text()
        hint = super().sizeHint().width()  # type: ignore[misc]
        return max(0, hint - self.fontMetrics().horizontalAdvance(shown))  # type: ignore[attr-defined]

    def sizeHint(self) -> QSize:
        hint: QSize = super().sizeHint()  # type: ignore[misc]
        width = self._chrome() + self.fontMetrics().horizontalAdvance(self._full)  # type: ignore[attr-defined]
        return QSize(max(hint.width(), width), hint.height())

    def minimumSizeHint(self) -> QSize:
        hint: QSize = super().minimumSizeHint()  # type: ignore[misc]
        start = self._full if len(self._full) <= self.min_chars else self._full[: self.min_chars] + "…"
        width = self._chrome() + self.fontMetrics().horizontalAdvance(start)  # type: ignore[attr-defined]
        return QSize(min(width, self.sizeHint().width()), hint.height())

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)  # type: ignore[misc]
        self._show()

    def _show(self) -> None:
        room = self.width() - self._chrome()  # type: ignore[attr-defined]
        metrics: Any = self.fontMetrics()  # type: ignore[attr-defined]
        shown = metrics.elidedText(self._full, Qt.TextElideMode.ElideRight, max(0, room))
        if shown != self.shown_text():
            super().setText(shown)  # type: ignore[misc]
        cut = shown != self._full
        tip = "\n\n".join(part for part in (self._full if cut else "", self._tip) if part)
        super().setToolTip(tip)  # type: ignore[misc]


class ElidedLabel(_Elides, QLabel):
    """A one-line plain-text label cut with "…"."""

    def __init__(self, text: str = "", objectName: str = "") -> None:
        super().__init__()
        self.setObjectName(objectName)
        self.setTextFormat(Qt.TextFormat.PlainText)
        self.setText(text)


class ElidedToolButton(_Elides, QToolButton):
    """A tool button whose text is cut with "…"."""


class ElidedPushButton(_Elides, QPushButton):
    """A push button whose text is cut with "…"."""
