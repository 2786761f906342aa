"""The tab widget of conversations: new, close, reopen, rename, reorder, export, delete.

Every tab is one conversation of the ``ConversationStore`` (and one KV session in the engine: the
session id is the conversation id). Closing a tab keeps the conversation, marked closed in its
settings (``"open": false``), so that "Reopen" can bring it back; its KV session leaves memory for
the KV cache's disk tier (when on), so a reopened conversation starts warm. Deleting removes it from
the database for good, and its K/V file too.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import Signal, Slot
from PySide6.QtGui import QColor
from PySide6.QtWidgets import QInputDialog, QMenu, QTabWidget, QWidget

from ..colors import colors
from ..history.store import Conversation, ConversationStore, StoreError
from .tab import ChatTab

log = logging.getLogger(__name__)


NEW_CHAT_TITLE = "New chat"
AUTO_TITLE = "auto_title"  # conversation setting: the title follows the first message
TITLE_CHARS = 40
REOPEN_MENU_ITEMS = 20  # the Reopen menu lists the last closed conversations; the sidebar lists all


def title_from(text: str) -> str:
    """A tab title from a first message: its first line, at most ~40 characters, cut at a word."""
    line = " ".join(text.strip().splitlines()[0].split()) if text.strip() else ""
    if len(line) <= TITLE_CHARS:
        return line or NEW_CHAT_TITLE
    cut = line[:TITLE_CHARS].rsplit(" ", 1)[0] or line[:TITLE_CHARS]
    return cut.rstrip(" ,.;:") + "…"


class ConversationTabs(QTabWidget):
    tab_opened = Signal(object)  # ChatTab: connect its signals
    tab_closed = Signal(str)  # conversation id: drop its KV session
    store_failed = Signal(str)  # a sentence for the user (the change is kept in memory)
    title_changed = Signal(str, str)  # conversation id, its new title

    def __init__(self, store: ConversationStore, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("conversationTabs")
        self.setDocumentMode(True)
        self.setMovable(True)
        self.setTabsClosable(True)
        self.tabBar().setExpanding(False)
        self.store = store
        self._by_id: dict[str, ChatTab] = {}
        self.tabCloseRequested.connect(self._on_close_requested)
        self.tabBar().tabBarDoubleClicked.connect(self._on_tab_bar_double_clicked)
        self.tabBar().tabMoved.connect(self._on_tab_bar_moved)

    # -- lookups --------------------------------------------------------------------------------
    @property
    def chat_tabs(self) -> list[ChatTab]:
        return [self.widget(i) for i in range(self.count())]  # type: ignore[misc]

    def tab_for(self, conversation_id: str) -> ChatTab | None:
        return self._by_id.get(conversation_id)

    def titles(self) -> dict[str, str]:
        return {cid: tab.title for cid, tab in self._by_id.items()}

    # -- opening --------------------------------------------------------------------------------
    def restore(self) -> None:
        """At start: mark replies a crash cut off as partial, open every conversation left open."""
        try:
            self.store.mark_interrupted()
            conversations = [c for c in self.store.list_conversations() if c.settings.get("open", True)]
        except StoreError as exc:
            self.store_failed.emit(str(exc))
            conversations = []
        for conversation in conversations:
            self.add_conversation(conversation)

    def add_conversation(self, conversation: Conversation) -> ChatTab:
        try:
            messages = self.store.messages(conversation.id)
        except StoreError as exc:
            self.store_failed.emit(str(exc))
            messages = []
        tab = ChatTab(conversation, messages, self.store)
        tab.busy_changed.connect(self._on_tab_busy_changed)
        tab.first_message_sent.connect(self._on_tab_first_message_sent)
        self._by_id[conversation.id] = tab
        index = self.addTab(tab, conversation.title.replace("&", "&&"))
        self.setTabToolTip(index, conversation.title)
        self.tab_opened.emit(tab)
        return tab

    def new_chat(self, system_prompt: str) -> ChatTab:
        """A new conversation named "New chat" (unique), renamed after its first message."""
        title = self.unique_title(NEW_CHAT_TITLE)
        settings = {AUTO_TITLE: True}
        try:
            conversation = self.store.create_conversation(title, system_prompt)
            self.store.set_conversation_settings(conversation.id, settings)
        except StoreError as exc:
            self.store_failed.emit(f"{exc}. The new conversation is kept in memory only.")
            conversation = Conversation(uuid.uuid4().hex, title, system_prompt, {}, self.count(), 0.0, 0.0)
        conversation = dataclasses.replace(conversation, settings=settings)
        tab = self.add_conversation(conversation)
        self._save_order()
        self.setCurrentWidget(tab)
        tab.prompt_edit.setFocus()
        return tab

    def reopen(self, conversation_id: str) -> ChatTab | None:
        """Open a saved conversation again; its KV session starts cold."""
        if conversation_id in self._by_id:
            self.setCurrentWidget(self._by_id[conversation_id])
            return self._by_id[conversation_id]
        conversation = self.store.get_conversation(conversation_id)
        if conversation is None:
            return None
        settings = {**conversation.settings, "open": True}
        self._write(self.store.set_conversation_settings, conversation_id, settings)
        tab = self.add_conversation(conversation)
        tab.conversation_settings = settings
        self._save_order()  # it opens as the last tab, and comes back there after a restart
        self.setCurrentWidget(tab)
        return tab

    def fill_reopen_menu(self, menu: QMenu) -> None:
        """The most recently changed closed conversations (all of them are in the history sidebar)."""
        menu.clear()
        try:
            closed = [c for c in self.store.list_conversations() if not c.settings.get("open", True)]
        except StoreError as exc:
            closed = []
            self.store_failed.emit(str(exc))
        closed.sort(key=lambda c: -c.updated_at)
        if len(closed) > REOPEN_MENU_ITEMS:
            menu.addAction(f"{len(closed):,} closed: all are in View → History (Ctrl+H)").setEnabled(False)
            closed = closed[:REOPEN_MENU_ITEMS]
        for conversation in closed:
            action = menu.addAction(conversation.title)
            action.triggered.connect(lambda _=False, cid=conversation.id: self.reopen(cid))
        if not closed:
            menu.addAction("(no closed conversations)").setEnabled(False)

    # -- closing --------------------------------------------------------------------------------
    @Slot(int)
    def _on_close_requested(self, index: int) -> None:
        self.close_tab(index)

    def close_tab(self, index: int, *, keep: bool = True) -> None:
        """Close a tab: stop its reply (the text so far is kept, marked partial), drop its KV session."""
        tab = self.widget(index)
        if not isinstance(tab, ChatTab):
            return
        tab.save_pending()
        tab.save_partial_now()
        del self._by_id[tab.conversation_id]
        self.removeTab(index)
        if keep:
            tab.conversation_settings["open"] = False
            self._write(self.store.set_conversation_settings, tab.conversation_id, tab.conversation_settings)
        self.tab_closed.emit(tab.conversation_id)
        tab.deleteLater()

    def delete_conversation(self, conversation_id: str) -> None:
        tab = self._by_id.get(conversation_id)
        if tab is not None:
            self.close_tab(self.indexOf(tab), keep=False)
        self._write(self.store.delete_conversation, conversation_id)

    def save_all(self) -> None:
        """The app quits: keep the text of replies in progress and any unsaved system prompt."""
        for tab in self._by_id.values():
            tab.save_pending()
            tab.save_partial_now()

    # -- renaming, order, export ----------------------------------------------------------------
    def rename_tab(self, index: int, title: str) -> None:
        """The user's name for a tab: kept as typed (the title no longer follows the first message)."""
        tab = self.widget(index)
        title = " ".join(title.split())
        if isinstance(tab, ChatTab) and title:
            self._set_title(tab, title)
            if tab.conversation_settings.pop(AUTO_TITLE, None) is not None:
                self._write(
                    self.store.set_conversation_settings, tab.conversation_id, tab.conversation_settings
                )

    def _set_title(self, tab: ChatTab, title: str) -> None:
        index = self.indexOf(tab)
        tab.title = title
        self.setTabText(index, title.replace("&", "&&"))
        self.setTabToolTip(index, title)
        self._write(self.store.rename, tab.conversation_id, title)
        self.title_changed.emit(tab.conversation_id, title)

    def unique_title(self, base: str, exclude: str | None = None) -> str:
        """``base``, or ``base (2)``, ``(3)``…: no two conversations (open or closed) share a name."""
        try:
            taken = {title for cid, title in self.store.conversation_titles().items() if cid != exclude}
        except StoreError:
            taken = set()
        taken |= {t.title for cid, t in self._by_id.items() if cid != exclude}
        n, title = 1, base
        while title in taken:
            n += 1
            title = f"{base} ({n})"
        return title

    @Slot(str, str)
    def _on_tab_first_message_sent(self, conversation_id: str, text: str) -> None:
        """Name a new chat after its first message, as LM Studio and Jan do (F2 renames it)."""
        tab = self._by_id.get(conversation_id)
        if tab is None or not tab.conversation_settings.pop(AUTO_TITLE, False):
            return
        self._write(self.store.set_conversation_settings, conversation_id, tab.conversation_settings)
        self._set_title(tab, self.unique_title(title_from(text), exclude=conversation_id))

    def ask_rename(self, index: int) -> None:
        tab = self.widget(index)
        if not isinstance(tab, ChatTab):
            return
        dialog = QInputDialog(self, objectName="renameDialog")
        dialog.setWindowTitle("Rename chat")
        dialog.setLabelText("Name of this conversation:")
        dialog.setTextValue(tab.title)
        dialog.textValueSelected.connect(lambda text: self.rename_tab(self.indexOf(tab), text))
        dialog.open()

    @Slot(int)
    def _on_tab_bar_double_clicked(self, index: int) -> None:
        if index >= 0:
            self.ask_rename(index)

    @Slot(int, int)
    def _on_tab_bar_moved(self, _from: int, _to: int) -> None:
        self._save_order()

    def _save_order(self) -> None:
        """Save the order: the open tabs as shown, then the closed conversations as they were."""
        try:
            ids = list(self.store.conversation_titles())
        except StoreError as exc:
            self.store_failed.emit(str(exc))
            return
        known = set(ids)
        open_ids = [tab.conversation_id for tab in self.chat_tabs if tab.conversation_id in known]
        opened = set(open_ids)
        self._write(self.store.reorder, open_ids + [i for i in ids if i not in opened])

    def export_conversation(self, conversation_id: str, path: str) -> str | None:
        """Write the conversation as Markdown; None when done, else what went wrong."""
        try:
            Path(path).write_text(self.store.export_markdown(conversation_id), encoding="utf-8")
        except (StoreError, KeyError, OSError) as exc:
            return f"Cannot export to {path}: {exc}"
        return None

    # -- helpers --------------------------------------------------------------------------------
    @Slot(str, bool)
    def _on_tab_busy_changed(self, conversation_id: str, busy: bool) -> None:
        tab = self._by_id.get(conversation_id)
        if tab is not None:
            self.tabBar().setTabTextColor(self.indexOf(tab), QColor(colors()["busy"]) if busy else QColor())

    def restyle(self) -> None:
        """The theme changed: busy tabs take its color."""
        for tab in self._by_id.values():
            self._on_tab_busy_changed(tab.conversation_id, tab.is_generating)

    def _write(self, write: Callable[..., Any], *args: Any) -> None:
        try:
            write(*args)
        except (StoreError, KeyError, ValueError) as exc:
            log.warning("store write failed: %s", exc)
            self.store_failed.emit(f"Not saved: {exc}")
