"""Jumping to a message in a transcript: scroll to its bubble and mark the words searched for.

Each entry of a ``TranscriptView`` is one or more top-level frames (tables) of its document, in order
(a bubble, and its code blocks in tables of their own): ``TranscriptView.entry_frames``. The marks
are extra selections (nothing in the document changes) and fade after ``MARK_SHOWN_MS``.
"""

from __future__ import annotations

import re

from PySide6.QtCore import QTimer
from PySide6.QtGui import QColor, QTextCharFormat, QTextCursor, QTextDocument
from PySide6.QtWidgets import QTextEdit

from ..colors import colors
from .transcript import TranscriptView

MARK_SHOWN_MS = 6000
TOP_MARGIN_PX = 12
_WORD = re.compile(r"\w+", re.UNICODE)


def show_entry(view: TranscriptView, index: int, words: str = "") -> list[QTextEdit.ExtraSelection]:
    """Scroll ``view`` so that entry ``index`` is at the top; mark the words of ``words`` in it
    (whole words and, like the search, the last one as a prefix). The marks made."""
    frames = view.entry_frames(index)
    if not frames:
        return []
    document = view.document()
    document.documentLayout().documentSize()  # lays the whole document out, so positions are final
    top = document.documentLayout().frameBoundingRect(frames[0]).top()
    view.verticalScrollBar().setValue(max(0, int(top) - TOP_MARGIN_PX))
    marks = _marks(document, frames[0].firstPosition(), frames[-1].lastPosition(), _WORD.findall(words))
    view.setExtraSelections(marks)
    if marks:
        QTimer.singleShot(MARK_SHOWN_MS, view, lambda: view.setExtraSelections([]))
    return marks


def _marks(document: QTextDocument, start: int, end: int, words: list[str]) -> list[QTextEdit.ExtraSelection]:
    text = document.toPlainText()  # positions of the plain text are the document's positions
    marks = []
    char_format = QTextCharFormat()
    char_format.setBackground(QColor(colors()["search_hit"]))
    char_format.setForeground(QColor(colors()["search_hit_text"]))
    for n, word in enumerate(words):
        tail = r"\w*" if n == len(words) - 1 else r"\b"
        for match in re.finditer(rf"\b{re.escape(word)}{tail}", text[start:end], re.IGNORECASE):
            cursor = QTextCursor(document)
            cursor.setPosition(start + match.start())
            cursor.setPosition(start + match.end(), QTextCursor.MoveMode.KeepAnchor)
            selection = QTextEdit.ExtraSelection()
            selection.cursor = cursor  # type: ignore[misc]
            selection.format = char_format  # type: ignore[misc]
            marks.append(selection)
    return marks
