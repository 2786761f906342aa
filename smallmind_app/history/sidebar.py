"""The history sidebar: every saved conversation, newest activity first, grouped by day, searchable.

A dock on the left of the main window (View → History, Ctrl+H). Clicking a conversation opens it in
a tab, or turns to its tab; a search hit also scrolls the transcript to the matching message and
marks the words. The context menu (or the Delete key) renames, pins to the top and deletes. A delete
can be undone for ``UNDO_MS``: the conversation is only hidden (and its tab closed) until then, and
deleted from the database when the time is up, when another delete comes, or when the app quits.

The sidebar reads the store (history and search are SQLite queries, FTS5 for the text) and changes
conversations through the tab widget, which owns the open ones; it never touches the engine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from PySide6.QtCore import QEvent, QModelIndex, QObject, QPoint, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDockWidget,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListView,
    QMenu,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..chat.conversation_tabs import AUTO_TITLE, ConversationTabs
from ..chat.tab import ChatTab
from ..chat.transcript_search import show_entry
from .list_model import ID_ROLE, MESSAGE_ROLE, PINNED_ROLE, HistoryDelegate, HistoryModel
from .search_index import ConversationSummary, fts_query
from .store import Conversation, ConversationStore, StoreError

log = logging.getLogger(__name__)

UNDO_MS = 6000  # how long a deleted conversation can be brought back
REFRESH_DELAY_MS = 150  # changes in the tabs are gathered, then the list is read again once
SEARCH_DELAY_MS = 120  # typing pauses this long before the search runs
MIN_WIDTH = 220


@dataclass(frozen=True, slots=True)
class PendingDelete:
    conversation_id: str
    title: str
    was_open: bool


class HistorySidebar(QDockWidget):
    store_failed = Signal(str)  # a sentence for the user
    conversation_opened = Signal(str, object)  # conversation id, the message id jumped to (or None)

    def __init__(
        self, store: ConversationStore, tabs: ConversationTabs, parent: QWidget | None = None
    ) -> None:
        super().__init__("History", parent)
        self.setObjectName("historyDock")
        self.setAllowedAreas(Qt.DockWidgetArea.LeftDockWidgetArea | Qt.DockWidgetArea.RightDockWidgetArea)
        self.store = store
        self.tabs = tabs
        self.hidden: set[str] = set()  # deleted, waiting for the undo time to pass
        self.pending: PendingDelete | None = None
        self.model = HistoryModel(self._snippet, self)
        self._summaries: list[ConversationSummary] = []  # as last read; a search filters these
        self._build()
        self._refresh_timer = self._timer(REFRESH_DELAY_MS, self.refresh)
        self._search_timer = self._timer(SEARCH_DELAY_MS, self._on_search_timer_timeout)
        self._undo_timer = self._timer(UNDO_MS, self.commit_pending)
        tabs.tab_opened.connect(self._on_tabs_tab_opened)
        tabs.tab_closed.connect(self.schedule_refresh)
        tabs.title_changed.connect(self.schedule_refresh)
        tabs.currentChanged.connect(self._on_tabs_current_changed)
        self.visibilityChanged.connect(lambda visible: self.schedule_refresh() if visible else None)

    def _timer(self, ms: int, slot: object) -> QTimer:
        timer = QTimer(self, interval=ms, singleShot=True)
        timer.timeout.connect(slot)
        return timer

    def _build(self) -> None:
        body = QWidget()
        layout = QVBoxLayout(body)
        layout.setContentsMargins(6, 4, 6, 6)
        layout.setSpacing(4)
        self.search = QLineEdit(objectName="historySearch")
        self.search.setPlaceholderText("Search conversations")
        self.search.setToolTip("Words of titles and messages (Ctrl+Shift+F); Enter opens the first match")
        self.search.setClearButtonEnabled(True)
        self.search.setAccessibleName("Search conversations")
        self.search.textChanged.connect(lambda _text: self._search_timer.start())
        self.search.returnPressed.connect(self._on_search_return_pressed)
        self.search.installEventFilter(self)
        self.count_label = QLabel(objectName="historyCount")
        self.count_label.setVisible(False)
        self.view = QListView(objectName="historySidebar")
        self.view.setModel(self.model)
        self.view.setItemDelegate(HistoryDelegate(self.view))
        self.view.setAccessibleName("Conversations")
        self.view.setMouseTracking(True)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.view.setUniformItemSizes(True)  # 5,000 rows: no size asked of each (see HistoryDelegate)
        self.view.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)  # long lines end in "…"
        self.view.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.view.customContextMenuRequested.connect(self._on_view_context_menu_requested)
        self.view.clicked.connect(self._on_view_activated)
        self.view.activated.connect(self._on_view_activated)
        self.view.installEventFilter(self)
        self.undo_bar = QWidget(objectName="historyUndoBar")
        bar = QHBoxLayout(self.undo_bar)
        bar.setContentsMargins(6, 2, 2, 2)
        self.undo_label = QLabel(objectName="historyUndoLabel")
        self.undo_label.setWordWrap(True)  # a long title takes a second line, never cut
        self.undo_button = QPushButton("Undo", objectName="historyUndoButton")
        self.undo_button.clicked.connect(self.undo_delete)
        bar.addWidget(self.undo_label, 1)
        bar.addWidget(self.undo_button)
        self.undo_bar.setVisible(False)
        layout.addWidget(self.search)
        layout.addWidget(self.count_label)
        layout.addWidget(self.view, 1)
        layout.addWidget(self.undo_bar)
        body.setMinimumWidth(MIN_WIDTH)
        self.setWidget(body)

    # -- reading the store ----------------------------------------------------------------------
    @Slot()
    def schedule_refresh(self) -> None:
        """Read the list again soon; a hidden sidebar reads it when it is shown again."""
        if self.isVisible():
            self._refresh_timer.start()

    @Slot()
    def _on_search_timer_timeout(self) -> None:
        self.refresh(reread=False)  # the conversations are as read last time: only the search runs

    @Slot()
    def refresh(self, reread: bool = True) -> None:
        """Read the conversations again (and search, when there is text), keeping the selection."""
        reread = reread or self._refresh_timer.isActive()  # a change waiting to be read is read now
        self._refresh_timer.stop()
        self._search_timer.stop()
        text = self.search.text()
        try:
            if reread or not self._summaries:
                self._summaries = self.store.history()
            hits = self.store.search(text) if fts_query(text) is not None else None
        except StoreError as exc:
            self.store_failed.emit(str(exc))
            return
        current = self.tabs.currentWidget()
        selected = current.conversation_id if isinstance(current, ChatTab) else self.current_id()
        position = self.view.verticalScrollBar().value()
        self.model.set_conversations([s for s in self._summaries if s.id not in self.hidden], hits)
        if selected is not None and (row := self.model.row_of(selected)) is not None:
            self.view.setCurrentIndex(self.model.index(row))
        self.view.verticalScrollBar().setValue(position if hits is None else 0)
        self._show_count(text, hits is not None)

    def _show_count(self, text: str, searching: bool) -> None:
        n = self.model.n_conversations
        if searching:
            self.count_label.setText(
                (f"{n:,} conversations match" if n > 1 else "1 conversation matches")
                if n
                else f"No conversation matches “{text}”"
            )
        self.count_label.setVisible(searching)

    def _snippet(self, message_id: int) -> str:
        try:
            return self.store.snippet(message_id, self.search.text())
        except StoreError as exc:
            log.warning("no snippet: %s", exc)
            return ""

    def current_id(self) -> str | None:
        index = self.view.currentIndex()
        return index.data(ID_ROLE) if index.isValid() else None

    # -- opening --------------------------------------------------------------------------------
    @Slot(QModelIndex)
    def _on_view_activated(self, index: QModelIndex) -> None:
        if index.isValid() and index.data(ID_ROLE):
            self.open(index.data(ID_ROLE), index.data(MESSAGE_ROLE))

    @Slot()
    def _on_search_return_pressed(self) -> None:
        if fts_query(self.search.text()) is None:
            return  # nothing typed: nothing to open
        ids = self.model.conversation_ids()
        if self._search_timer.isActive():
            self.refresh()
            ids = self.model.conversation_ids()
        if ids:
            row = self.model.row_of(ids[0])
            assert row is not None
            self.view.setCurrentIndex(self.model.index(row))
            self._on_view_activated(self.model.index(row))

    def open(self, conversation_id: str, message_id: int | None = None) -> ChatTab | None:
        """Open the conversation in a tab (or turn to its tab); with a message, scroll to it and mark
        the words searched for."""
        try:
            tab = self.tabs.reopen(conversation_id)
        except StoreError as exc:
            self.store_failed.emit(str(exc))
            return None
        if tab is None:
            self.schedule_refresh()  # it is gone (deleted elsewhere)
            return None
        if message_id is not None:
            index = tab.edits.show_message(message_id)  # a hit in an older version: that version is shown
            words = self.search.text()
            if index is not None:
                QTimer.singleShot(0, tab, lambda: show_entry(tab.transcript, index, words))
        self.conversation_opened.emit(conversation_id, message_id)
        return tab

    # -- rename, pin, delete --------------------------------------------------------------------
    @Slot(QPoint)
    def _on_view_context_menu_requested(self, point: QPoint) -> None:
        index = self.view.indexAt(point)
        if index.isValid() and index.data(ID_ROLE):
            self.context_menu(index.data(ID_ROLE), bool(index.data(PINNED_ROLE))).popup(
                self.view.viewport().mapToGlobal(point)
            )

    def context_menu(self, conversation_id: str, pinned: bool) -> QMenu:
        menu = QMenu(self, objectName="historyMenu")
        menu.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        menu.addAction("Open", lambda: self.open(conversation_id)).setObjectName("historyOpen")
        menu.addAction("Rename…", lambda: self.ask_rename(conversation_id)).setObjectName("historyRename")
        pin = menu.addAction(
            "Unpin" if pinned else "Pin to top", lambda: self.set_pinned(conversation_id, not pinned)
        )
        pin.setObjectName("historyPin")
        menu.addSeparator()
        menu.addAction("Delete", lambda: self.delete(conversation_id)).setObjectName("historyDelete")
        return menu

    def set_pinned(self, conversation_id: str, pinned: bool) -> None:
        try:
            self.store.set_pinned(conversation_id, pinned)
        except (StoreError, KeyError) as exc:
            self.store_failed.emit(f"Not saved: {exc}")
        self.refresh()

    def _conversation(self, conversation_id: str) -> Conversation | None:
        try:
            return self.store.get_conversation(conversation_id)
        except StoreError as exc:
            self.store_failed.emit(str(exc))
            return None

    def ask_rename(self, conversation_id: str) -> QInputDialog | None:
        conversation = self._conversation(conversation_id)
        if conversation is None:
            return None
        dialog = QInputDialog(self, objectName="historyRenameDialog")
        dialog.setWindowTitle("Rename chat")
        dialog.setLabelText("Name of this conversation:")
        dialog.setTextValue(conversation.title)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.textValueSelected.connect(lambda text: self.rename(conversation_id, text))
        dialog.open()
        return dialog

    def rename(self, conversation_id: str, title: str) -> None:
        """The user's name for the conversation, in its tab too when it is open (and kept as typed)."""
        title = " ".join(title.split())
        if not title:
            return
        tab = self.tabs.tab_for(conversation_id)
        if tab is not None:
            self.tabs.rename_tab(self.tabs.indexOf(tab), title)
        else:
            try:
                conversation = self.store.get_conversation(conversation_id)
                self.store.rename(conversation_id, title)
                if conversation is not None and AUTO_TITLE in conversation.settings:
                    settings = {k: v for k, v in conversation.settings.items() if k != AUTO_TITLE}
                    self.store.set_conversation_settings(conversation_id, settings)
            except (StoreError, KeyError) as exc:
                self.store_failed.emit(f"Not saved: {exc}")
        self.refresh()

    def delete(self, conversation_id: str) -> None:
        """Hide the conversation (and close its tab) now; delete it for good when the undo time is up."""
        self.commit_pending()
        conversation = self._conversation(conversation_id)
        if conversation is None:
            return
        tab = self.tabs.tab_for(conversation_id)
        title = tab.title if tab is not None else conversation.title
        if tab is not None:
            self.tabs.close_tab(self.tabs.indexOf(tab), keep=False)
        self.pending = PendingDelete(conversation_id, title, tab is not None)
        self.hidden.add(conversation_id)
        self.undo_label.setText(f"Deleted “{title}”.")
        self.undo_bar.setVisible(True)
        self._undo_timer.start()
        self.refresh()

    def _take_pending(self) -> PendingDelete | None:
        """The delete waiting for its undo time, now no longer waiting (the Undo bar hidden)."""
        pending, self.pending = self.pending, None
        self._undo_timer.stop()
        self.undo_bar.setVisible(False)
        return pending

    @Slot()
    def undo_delete(self) -> None:
        """Bring back the conversation deleted last (and its tab, if it had one)."""
        pending = self._take_pending()
        if pending is None:
            return
        self.hidden.discard(pending.conversation_id)
        if pending.was_open:
            self.open(pending.conversation_id)
        self.refresh()

    @Slot()
    def commit_pending(self) -> None:
        """The delete waiting for its undo time becomes real (now)."""
        pending = self._take_pending()
        if pending is None:
            return
        self.hidden.discard(pending.conversation_id)
        if self.tabs.tab_for(pending.conversation_id) is not None:
            self.refresh()  # opened again meanwhile (Chat → Reopen): the user wants it after all
            return
        try:
            self.store.delete_conversation(pending.conversation_id)
        except KeyError:
            pass  # already gone
        except StoreError as exc:
            self.store_failed.emit(f"Not deleted: {exc}")

    # -- keys -----------------------------------------------------------------------------------
    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.KeyPress and isinstance(event, QKeyEvent):
            key = event.key()
            if watched is self.search and key == Qt.Key.Key_Down and self.model.n_conversations:
                self.view.setFocus()
                if not self.view.currentIndex().isValid():
                    row = self.model.row_of(self.model.conversation_ids()[0])
                    self.view.setCurrentIndex(self.model.index(row or 0))
                return True
            if watched is self.search and key == Qt.Key.Key_Escape and self.search.text():
                self.search.clear()  # the whole list again
                return True
            if watched is self.view and key == Qt.Key.Key_Delete and (cid := self.current_id()):
                self.delete(cid)
                return True
        return super().eventFilter(watched, event)

    def focus_search(self) -> None:
        self.show()
        self.raise_()
        self.search.setFocus()
        self.search.selectAll()

    @Slot(int)
    def _on_tabs_current_changed(self, _index: int) -> None:
        """The conversation shown in the tabs is the one selected in the list."""
        tab = self.tabs.currentWidget()
        row = self.model.row_of(tab.conversation_id) if isinstance(tab, ChatTab) else None
        if row is None:
            self.view.clearSelection()
        elif self.view.currentIndex().row() != row:
            self.view.setCurrentIndex(self.model.index(row))

    @Slot(object)
    def _on_tabs_tab_opened(self, tab: ChatTab) -> None:
        tab.busy_changed.connect(self.schedule_refresh)  # a message sent, a reply done: new activity
        self.schedule_refresh()
