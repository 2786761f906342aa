"""The history list: a Qt model of the conversations grouped by day, and the delegate that draws them.

``HistoryModel`` holds flat rows: a day header ("Pinned", "Today", "Yesterday", "Monday", "March 3")
followed by its conversations. It is a QAbstractListModel so that thousands of conversations cost
only the rows on screen: a search hit's snippet is asked of the store when its row is first drawn,
then kept. ``HistoryDelegate`` draws a conversation as its title over a one-line preview (or the
snippet of the search hit), the matched words on a highlight color of the theme.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QAbstractListModel, QModelIndex, QPersistentModelIndex, QRect, QSize, Qt
from PySide6.QtGui import QColor, QFont, QFontMetrics, QPainter
from PySide6.QtWidgets import QStyle, QStyledItemDelegate, QStyleOptionViewItem, QWidget

from ..colors import colors
from .search_index import MARK_END, MARK_START, ConversationSummary, SearchHit

ID_ROLE = Qt.ItemDataRole.UserRole + 1  # the conversation id ("" for a header)
HEADER_ROLE = Qt.ItemDataRole.UserRole + 2  # True for a day header
PREVIEW_ROLE = Qt.ItemDataRole.UserRole + 3  # the second line: the snippet of a hit, else the preview
TITLE_ROLE = Qt.ItemDataRole.UserRole + 4  # the title, its search matches marked
MESSAGE_ROLE = Qt.ItemDataRole.UserRole + 5  # the message a search hit jumps to (None: none)
PINNED_ROLE = Qt.ItemDataRole.UserRole + 6
ModelIndex = QModelIndex | QPersistentModelIndex


def day_label(timestamp: float, today: dt.date) -> str:
    """The group of a conversation last active at ``timestamp`` (local time), seen on ``today``."""
    return _day_label(dt.date.fromtimestamp(timestamp), today)


@functools.lru_cache(maxsize=1024)
def _day_label(day: dt.date, today: dt.date) -> str:
    age = (today - day).days
    if age <= 0:
        return "Today"
    if age == 1:
        return "Yesterday"
    if age < 7:
        return day.strftime("%A")
    if day.year == today.year:
        return f"{day:%B} {day.day}"
    return f"{day:%B} {day.day}, {day.year}"


@dataclass(frozen=True, slots=True)
class Row:
    header: str  # the day header's text; "" for a conversation
    summary: ConversationSummary | None = None
    hit: SearchHit | None = None


class HistoryModel(QAbstractListModel):
    """Rows of day headers and conversations; ``snippet(message_id)`` is called for hits shown."""

    def __init__(self, snippet: Callable[[int], str], parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._snippet = snippet
        self._rows: list[Row] = []
        self._snippets: dict[int, str] = {}
        self.n_conversations = 0

    def set_conversations(
        self,
        summaries: Iterable[ConversationSummary],
        hits: Mapping[str, SearchHit] | None = None,
        today: dt.date | None = None,
    ) -> None:
        """Show ``summaries`` (in their order), grouped by day; with ``hits``, only those conversations."""
        today = today or dt.date.today()
        rows: list[Row] = []
        last_header = ""
        for summary in summaries:
            hit = hits.get(summary.id) if hits is not None else None
            if hits is not None and hit is None:
                continue
            header = "Pinned" if summary.pinned else day_label(summary.last_active, today)
            if header != last_header:
                rows.append(Row(header))
                last_header = header
            rows.append(Row("", summary, hit))
        self.beginResetModel()
        self._rows = rows
        self._snippets = {}
        self.n_conversations = sum(1 for row in rows if row.summary is not None)
        self.endResetModel()

    def rowCount(self, parent: ModelIndex = QModelIndex()) -> int:  # noqa: B008 (Qt's signature)
        return 0 if parent.isValid() else len(self._rows)

    def row_of(self, conversation_id: str) -> int | None:
        return next(
            (i for i, r in enumerate(self._rows) if r.summary and r.summary.id == conversation_id), None
        )

    def conversation_ids(self) -> list[str]:
        return [row.summary.id for row in self._rows if row.summary is not None]

    def headers(self) -> list[str]:
        return [row.header for row in self._rows if row.summary is None]

    def flags(self, index: ModelIndex) -> Qt.ItemFlag:
        if not index.isValid() or self._rows[index.row()].summary is None:
            return Qt.ItemFlag.NoItemFlags  # a header is neither selectable nor clickable
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable

    def data(self, index: ModelIndex, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not 0 <= index.row() < len(self._rows):
            return None
        row = self._rows[index.row()]
        summary, hit = row.summary, row.hit
        if role == HEADER_ROLE:
            return summary is None
        if summary is None:
            return row.header if role == Qt.ItemDataRole.DisplayRole else None
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole):
            return summary.title
        if role == ID_ROLE:
            return summary.id
        if role == TITLE_ROLE:
            return hit.title if hit is not None and hit.title else summary.title
        if role == PREVIEW_ROLE:
            return self._preview(summary, hit)
        if role == MESSAGE_ROLE:
            return hit.message_id if hit is not None else None
        if role == PINNED_ROLE:
            return summary.pinned
        return None

    def _preview(self, summary: ConversationSummary, hit: SearchHit | None) -> str:
        if hit is None or hit.message_id is None:
            return summary.preview
        if hit.message_id not in self._snippets:
            self._snippets[hit.message_id] = self._snippet(hit.message_id) or summary.preview
        return self._snippets[hit.message_id]


def _segments(marked: str) -> list[tuple[str, bool]]:
    """'a \\x02b\\x03 c' -> [('a ', False), ('b', True), (' c', False)]."""
    parts: list[tuple[str, bool]] = []
    for i, chunk in enumerate(marked.split(MARK_START)):
        inside, _, after = chunk.partition(MARK_END) if i else ("", "", chunk)
        if inside:
            parts.append((inside, True))
        if after:
            parts.append((after, False))
    return parts


def draw_marked(
    painter: QPainter, rect: QRect, marked: str, color: QColor, hit: tuple[QColor, QColor]
) -> None:
    """One line of text, its marked words in ``hit`` (background, text), cut with "…" where ``rect`` ends."""
    metrics = painter.fontMetrics()
    x, right = rect.left(), rect.right()
    baseline = rect.top() + (rect.height() + metrics.ascent() - metrics.descent()) // 2
    for text, matched in _segments(marked):
        width = metrics.horizontalAdvance(text)
        if x + width > right:
            text = metrics.elidedText(text, Qt.TextElideMode.ElideRight, max(right - x, 0))
            width = metrics.horizontalAdvance(text)
        if matched and text:
            painter.fillRect(QRect(x, rect.top() + 1, width, rect.height() - 2), hit[0])
        painter.setPen(hit[1] if matched else color)
        painter.drawText(x, baseline, text)
        x += width
        if x >= right:
            break


class HistoryDelegate(QStyledItemDelegate):
    """A day header: small muted bold text. A conversation: its title and a muted second line."""

    PADDING = 6

    def sizeHint(self, option: QStyleOptionViewItem, index: ModelIndex) -> QSize:
        """Every row is as high (the list lays out thousands of rows without asking each one); a day
        header's text sits at the bottom of its row, so the space above it separates the days."""
        return QSize(1, 2 * QFontMetrics(option.font).height() + 2 * self.PADDING + 2)

    def paint(self, painter: QPainter, option: QStyleOptionViewItem, index: ModelIndex) -> None:
        theme = colors()
        painter.save()
        rect = option.rect.adjusted(self.PADDING + 4, self.PADDING, -self.PADDING, -self.PADDING)
        font = QFont(option.font)
        if index.data(HEADER_ROLE):
            font.setBold(True)
            font.setPointSizeF(font.pointSizeF() * 0.9)
            painter.setFont(font)
            painter.setPen(QColor(theme["muted"]))
            painter.drawText(
                rect, Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom, str(index.data())
            )
            painter.restore()
            return
        selected = bool(option.state & QStyle.StateFlag.State_Selected)
        hovered = bool(option.state & QStyle.StateFlag.State_MouseOver)
        if selected or hovered:
            background = option.palette.highlight().color() if selected else QColor(theme["assistant"])
            painter.fillRect(option.rect.adjusted(2, 1, -2, -1), background)
        text = option.palette.highlightedText().color() if selected else QColor(theme["text"])
        muted = text if selected else QColor(theme["muted"])
        hit = (QColor(theme["search_hit"]), QColor(theme["search_hit_text"]))
        line = QFontMetrics(font).height()
        font.setBold(True)
        painter.setFont(font)
        draw_marked(
            painter, QRect(rect.left(), rect.top(), rect.width(), line), index.data(TITLE_ROLE), text, hit
        )
        font.setBold(False)
        painter.setFont(font)
        preview = index.data(PREVIEW_ROLE) or "(no messages yet)"
        draw_marked(
            painter, QRect(rect.left(), rect.top() + line + 2, rect.width(), line), preview, muted, hit
        )
        painter.restore()
