"""The transcript of one conversation: a QTextBrowser showing the entries as chat bubbles.

The bubbles' HTML is made by ``bubbles.py``; this view keeps each entry's HTML cached, so while a
reply streams only that reply is converted again (and only its last part: ``code_blocks`` caches
the others), and ``render`` is throttled by the tab. It follows the conversation as it grows, and
turns clicks on a bubble's links into copies and signals (copy, copy code, edit, versions); web
links open in the browser after asking. Only the links this view made act: their scheme is a
secret drawn for the view (``bubbles.new_link_scheme``), so text in a message never triggers one."""

from __future__ import annotations

import logging
from typing import Any

from PySide6.QtCore import QByteArray, Qt, QTimer, QUrl, Signal, Slot
from PySide6.QtGui import (
    QDesktopServices,
    QGuiApplication,
    QResizeEvent,
    QShowEvent,
    QTextCursor,
    QTextFrame,
)
from PySide6.QtWidgets import QMessageBox, QTextBrowser, QToolButton, QWidget

from ..colors import colors
from .bubbles import cache_key, displayed, entry_chunks, new_link_scheme
from .code_blocks import code_blocks
from .conversation_model import Entry

log = logging.getLogger(__name__)

COPIED_SHOWN_MS = 1500
LINK_SCHEMES = ("http", "https")  # the only links of a reply that are opened (in the browser)


class TranscriptView(QTextBrowser):
    """Read-only view of a list of entries; ``render`` rebuilds only the entries that changed.

    It follows the conversation like every chat app: while the user is at the bottom (``following``)
    the view stays there as a reply grows (also when the layout grows later, ``rangeChanged``);
    scrolling up stops following and shows the "Jump to latest" button, which scrolls back down.
    """

    copied = Signal(int)  # index of the entry whose text went to the clipboard
    following_changed = Signal(bool)
    link_refused = Signal(str)  # a link of a reply that is not opened (not http/https): its address
    version_requested = Signal(int, int)  # entry index, step (-1 the previous version, 1 the next)
    edit_requested = Signal(int)  # entry index of a user message to change
    citation_requested = Signal(int, int)  # entry index of a reply, citation number (documents)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("transcriptView")
        self.setOpenLinks(False)
        self.setOpenExternalLinks(False)
        self.setAccessibleName("Conversation transcript")
        self.link_scheme = new_link_scheme()  # this view's own links (module docstring)
        self.document().setDocumentMargin(12)
        self._entries: list[Entry] = []
        self._cache: dict[int, tuple[tuple[Any, ...], list[str]]] = {}
        self._shown: list[str] = []  # the chunks in the document, in order
        self._starts: list[int] = []  # the document position where each shown chunk begins
        self._entry_chunks: list[int] = []  # how many chunks (top-level tables) each entry has
        self.document().setUndoRedoEnabled(False)  # rendering edits the document; nothing to undo
        self._rendering = False
        self.following = True
        self.blocked_resources: list[str] = []  # what a reply asked to load (nothing is)
        self.jump_button = QToolButton(self, objectName="jumpToLatestButton")
        self.jump_button.setText("↓ Jump to latest")
        self.jump_button.setToolTip("Scroll to the newest message and follow the reply again")
        self.jump_button.setCursor(Qt.CursorShape.PointingHandCursor)
        self.jump_button.setStyleSheet(
            "QToolButton { background: #1d4ed8; color: white; border-radius: 12px; padding: 4px 12px; }"
        )
        self.jump_button.clicked.connect(self.jump_to_latest)
        self.jump_button.hide()
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scroll_bar_value_changed)
        bar.rangeChanged.connect(self._on_scroll_bar_range_changed)
        self.anchorClicked.connect(self._on_anchor_clicked)

    # -- following the latest message ---------------------------------------------------------
    def at_bottom(self) -> bool:
        bar = self.verticalScrollBar()
        return bar.value() >= bar.maximum() - 4

    @Slot()
    def jump_to_latest(self) -> None:
        self._set_following(True)
        self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def _set_following(self, following: bool) -> None:
        self.jump_button.setVisible(not following)
        if following != self.following:
            self.following = following
            self.following_changed.emit(following)
        self._place_jump_button()

    @Slot(int)
    def _on_scroll_bar_value_changed(self, _value: int) -> None:
        if not self._rendering:  # the user scrolled (wheel, keys, drag): follow only at the bottom
            self._set_following(self.at_bottom())

    @Slot(int, int)
    def _on_scroll_bar_range_changed(self, _minimum: int, maximum: int) -> None:
        if self.following:  # the document grew (a reply, a late layout pass): stay at the bottom
            self._rendering, was = True, self._rendering
            self.verticalScrollBar().setValue(maximum)
            self._rendering = was

    def _place_jump_button(self) -> None:
        hint = self.jump_button.sizeHint()
        viewport = self.viewport().geometry()
        self.jump_button.setGeometry(
            viewport.right() - hint.width() - 16,
            viewport.bottom() - hint.height() - 12,
            hint.width(),
            hint.height(),
        )
        self.jump_button.raise_()

    def resizeEvent(self, event: QResizeEvent) -> None:
        super().resizeEvent(event)
        self._place_jump_button()
        if self.following:
            self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def showEvent(self, event: QShowEvent) -> None:
        self._rendering = True  # QTextEdit scrolls to the text cursor (the top) on its first show
        try:
            super().showEvent(event)
        finally:
            self._rendering = False
        if self.following:  # a restored or switched-to tab shows its latest message
            self.verticalScrollBar().setValue(self.verticalScrollBar().maximum())

    def render(self, entries: list[Entry]) -> None:
        self._entries = list(entries)
        parts = []
        for index, entry in enumerate(self._entries):
            key = cache_key(entry)
            cached = self._cache.get(index)
            if cached is None or cached[0] != key:
                cached = (key, entry_chunks(index, entry, self.link_scheme))
                self._cache[index] = cached
            parts.extend(cached[1])
        self._entry_chunks = [len(self._cache[index][1]) for index in range(len(self._entries))]
        for stale in [i for i in self._cache if i >= len(self._entries)]:
            del self._cache[stale]
        bar = self.verticalScrollBar()
        position = bar.value()
        cursor = self.textCursor()
        selection = (cursor.anchor(), cursor.position()) if cursor.hasSelection() else None
        before = self.toPlainText() if selection else ""
        self._rendering = True
        try:
            self._show_chunks(parts)
            if selection is not None:  # a streaming reply must not take away what the user is selecting
                self._restore_selection(*selection, before)
            bar.setValue(bar.maximum() if self.following else position)
        finally:
            self._rendering = False

    def entry_frames(self, index: int) -> list[QTextFrame]:
        """The top-level frames (tables) showing entry ``index``, in order: one per bubble, and one
        more per 16 lines of each code block in it."""
        if not 0 <= index < len(self._entry_chunks):
            return []
        first = sum(self._entry_chunks[:index])
        return self.document().rootFrame().childFrames()[first : first + self._entry_chunks[index]]

    def invalidate(self) -> None:
        """Forget what the document shows: the next ``render`` builds it all again."""
        self._shown, self._starts = [], []

    def _show_chunks(self, chunks: list[str]) -> None:
        """Make the document show ``chunks``: only those from the first that differs are replaced, so
        a streaming reply costs the layout of its changed part, not of the whole conversation."""
        if not chunks:
            self.setHtml(self._placeholder())
            self._shown, self._starts = [], []
            return
        same = 0
        while same < min(len(chunks), len(self._shown)) and chunks[same] == self._shown[same]:
            same += 1
        if same == len(chunks) == len(self._shown):
            return
        if not self._shown:
            self.clear()
        cursor = QTextCursor(self.document())
        cursor.beginEditBlock()
        if same < len(self._starts):
            cursor.setPosition(self._starts[same])
            cursor.movePosition(QTextCursor.MoveOperation.End, QTextCursor.MoveMode.KeepAnchor)
            cursor.removeSelectedText()
        else:
            cursor.movePosition(QTextCursor.MoveOperation.End)
        del self._starts[same:]
        for chunk in chunks[same:]:
            self._starts.append(cursor.position())
            cursor.insertHtml(chunk)
        cursor.endEditBlock()
        self._shown = list(chunks)

    def restyle(self) -> None:
        """The theme changed: convert every entry again with its colors."""
        self._cache.clear()
        self.render(self._entries)

    def _restore_selection(self, anchor: int, position: int, before: str) -> None:
        """Select ``anchor``..``position`` again when the text up to there is unchanged."""
        end = max(anchor, position)
        if self.toPlainText()[:end] != before[:end]:
            return
        cursor = QTextCursor(self.document())
        cursor.setPosition(anchor)
        cursor.setPosition(position, QTextCursor.MoveMode.KeepAnchor)
        self.setTextCursor(cursor)

    def copy_entry(self, index: int) -> None:
        """The entry's text to the clipboard; its link says "Copied ✓" for a moment."""
        if 0 <= index < len(self._entries):
            entry = self._entries[index]
            QGuiApplication.clipboard().setText(entry.content)
            entry.copied = True
            self.render(self._entries)
            QTimer.singleShot(COPIED_SHOWN_MS, self, lambda: self._uncopy(entry))
            self.copied.emit(index)

    def copy_code(self, index: int, block: int) -> None:
        """Exactly the code of the entry's ``block``-th code block to the clipboard ("Copied ✓")."""
        if not 0 <= index < len(self._entries):
            return
        entry = self._entries[index]
        blocks = code_blocks(displayed(entry))
        if 0 <= block < len(blocks):
            QGuiApplication.clipboard().setText(blocks[block].code)
            entry.copied_block = block
            self.render(self._entries)
            QTimer.singleShot(COPIED_SHOWN_MS, self, lambda: self._uncopy(entry))
            self.copied.emit(index)

    def _uncopy(self, entry: Entry) -> None:
        entry.copied = False
        entry.copied_block = -1
        if entry in self._entries:
            self.render(self._entries)

    def _placeholder(self) -> str:
        return (
            f'<p align="center" style="color:{colors()["muted"]}; margin-top:40px;">'
            "Type a message below and press Enter.<br />Shift+Enter starts a new line.</p>"
        )

    def loadResource(self, kind: int, name: QUrl) -> Any:
        """Nothing is loaded for a reply: no local files, no network (an image shows as its text)."""
        self.blocked_resources.append(name.toString())
        return QByteArray()  # not None: for None, QTextDocument reads a local file itself

    @Slot(QUrl)
    def _on_anchor_clicked(self, url: QUrl) -> None:
        if url.scheme() == self.link_scheme:  # one of the app's own links: only this view makes them
            self._act(url.path())
        elif url.scheme() in LINK_SCHEMES and url.host():
            self.ask_to_open(url)
        else:  # edit:0, version:1:1, file:, javascript: ... written in a message: never acted on
            self.link_refused.emit(url.toString())

    def _act(self, path: str) -> None:
        action, _, rest = path.partition("/")
        try:
            numbers = [int(n) for n in rest.split("/")]
        except ValueError:
            log.warning("an app link with a malformed path %r was ignored", path[:80])
            return
        if action == "copy" and len(numbers) == 1:
            self.copy_entry(numbers[0])
        elif action == "copycode" and len(numbers) == 2:
            self.copy_code(*numbers)
        elif action == "version" and len(numbers) == 2:
            self.version_requested.emit(*numbers)
        elif action == "edit" and len(numbers) == 1:
            self.edit_requested.emit(numbers[0])
        elif action == "cite" and len(numbers) == 2:
            self.citation_requested.emit(*numbers)
        else:
            log.warning("an app link with an unknown action %r was ignored", path[:80])

    def ask_to_open(self, url: QUrl) -> QMessageBox:
        """Show the address before it goes to the browser; Cancel is the default button."""
        address = url.toString(QUrl.ComponentFormattingOption.FullyEncoded)
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Open link",
            f"Open this address in your browser?\n\n{address}",
            QMessageBox.StandardButton.Open | QMessageBox.StandardButton.Cancel,
            self,
        )
        box.setObjectName("openLinkDialog")
        box.setDefaultButton(QMessageBox.StandardButton.Cancel)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.accepted.connect(lambda: open_in_browser(QUrl(address)))
        box.open()
        return box


def open_in_browser(url: QUrl) -> bool:
    """The system's browser (tests replace this)."""
    return QDesktopServices.openUrl(url)
