"""The prompt box: Enter sends, Shift+Enter adds a line, Esc cancels an edit; it grows with its text and
asks for its token count once typing pauses (the worker counts, ``TokenCount`` shows it)."""

from __future__ import annotations

from PySide6.QtCore import Qt, QTimer, Signal, Slot
from PySide6.QtGui import QDragEnterEvent, QDragMoveEvent, QDropEvent, QKeyEvent, QResizeEvent
from PySide6.QtWidgets import QLabel, QPlainTextEdit, QWidget

from ..colors import colors

TOKEN_COUNT_DELAY_MS = 250  # the text's tokens are counted once typing pauses
LINES = (2, 12)  # the box grows with its text between these many lines
MAX_SHARE = 0.4  # and never past this share of its tab


class PromptEdit(QPlainTextEdit):
    """Enter sends, Shift+Enter inserts a new line, Esc cancels (an edit of the last message)."""

    submitted = Signal()
    escaped = Signal()
    count_wanted = Signal(str)  # the text, once typing pauses
    cleared = Signal()
    files_dropped = Signal(list)  # local file paths dropped on the box (to attach)

    def __init__(self, parent: QWidget | None = None, objectName: str = "") -> None:
        super().__init__(parent, objectName=objectName)
        self._count_timer = QTimer(self, interval=TOKEN_COUNT_DELAY_MS)
        self._count_timer.setSingleShot(True)
        self._count_timer.timeout.connect(lambda: self.count_wanted.emit(self.toPlainText()))
        self.textChanged.connect(self._on_text_changed)
        self.fit()

    def keyPressEvent(self, event: QKeyEvent) -> None:
        enter = event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        if enter and not event.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self.submitted.emit()
            return
        if event.key() == Qt.Key.Key_Escape:
            self.escaped.emit()
            return
        super().keyPressEvent(event)

    @staticmethod
    def _local_files(event: QDropEvent | QDragEnterEvent | QDragMoveEvent) -> list[str]:
        urls = event.mimeData().urls() if event.mimeData().hasUrls() else []
        return [url.toLocalFile() for url in urls if url.isLocalFile()]

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if self._local_files(event):
            event.acceptProposedAction()  # files are attached, not pasted as their addresses
        else:
            super().dragEnterEvent(event)

    def dragMoveEvent(self, event: QDragMoveEvent) -> None:
        if self._local_files(event):
            event.acceptProposedAction()
        else:
            super().dragMoveEvent(event)

    def dropEvent(self, event: QDropEvent) -> None:
        files = self._local_files(event)
        if files:
            event.acceptProposedAction()
            self.files_dropped.emit(files)
        else:
            super().dropEvent(event)

    @Slot()
    def _on_text_changed(self) -> None:
        self.fit()
        if self.toPlainText().strip():
            self._count_timer.start()
        else:
            self._count_timer.stop()
            self.cleared.emit()

    def fit(self) -> None:
        """Grow with the text from 2 to 12 lines (at most 40% of the tab), then scroll."""
        spacing = self.fontMetrics().lineSpacing()
        frame = 2 * (self.frameWidth() + int(self.document().documentMargin())) + 4
        lines = max(LINES[0], min(LINES[1], int(self.document().size().height())))
        host = self.parentWidget()  # the chat tab
        height = host.height() if host is not None else 0
        cap = int(height * MAX_SHARE) if height > 200 else lines * spacing + frame
        self.setFixedHeight(max(min(lines * spacing + frame, cap), LINES[0] * spacing + frame))

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self.fit()


class TokenCount(QLabel):
    """'42 tokens' under the prompt box; red, with the limit, past what one tab may hold."""

    def __init__(self, edit: PromptEdit) -> None:
        super().__init__(objectName="promptTokenCount")
        self._edit = edit
        self.setStyleSheet(f"color: {colors()['muted']};")
        edit.cleared.connect(lambda: self.setText(""))

    def show_count(self, text: str, n_tokens: int, limit: int) -> None:
        if text != self._edit.toPlainText():
            return  # typed on since: a newer count is on its way
        over = bool(limit) and n_tokens > limit
        self.setText(f"{n_tokens:,} tokens" + (f": more than the {limit:,} a tab holds" if over else ""))
        self.setStyleSheet(f"color: {colors()['error_text' if over else 'muted']};")
