"""The main window: conversation tabs, the stats dock, menus, and the routing of the worker's signals.

Every tab is one conversation and one KV session (the session id is the conversation id). Closing a
tab keeps the conversation in the database (marked closed; "Reopen" brings it back, cold) and
removes its KV session; deleting a conversation removes it for good. The worker's answers are
routed to the tab of their conversation whether or not the tab is shown, so switching tabs never
stops or mixes up a generation.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from PySide6.QtCore import QCoreApplication, Qt, Slot
from PySide6.QtGui import QAction, QCloseEvent, QColor, QKeySequence
from PySide6.QtWidgets import (
    QFileDialog,
    QInputDialog,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QTabWidget,
    QToolButton,
    QWidget,
)

from .chat_tab import ChatTab
from .engine_client import EngineClient
from .first_run import FirstRunDialog
from .settings import AppSettings, SettingsError, save_settings
from .settings_dialog import SettingsDialog
from .stats_dock import StatsDock
from .store import Conversation, ConversationStore, StoreError
from .worker import default_model_description

log = logging.getLogger(__name__)
MODEL_ENV = "SMALLMIND_MODEL"


class MainWindow(QMainWindow):
    def __init__(self, settings: AppSettings, store: ConversationStore, client: EngineClient) -> None:
        super().__init__()
        self.setObjectName("mainWindow")
        self.setWindowTitle("SmallMind")
        self.resize(1320, 840)
        self.settings = settings
        self.store = store
        self.client = client
        self.model_info: dict[str, Any] = {}
        self.first_run_dialog: FirstRunDialog | None = None
        self.settings_dialog: SettingsDialog | None = None
        self.error_dialog: QMessageBox | None = None
        self._tabs: dict[str, ChatTab] = {}
        self._closed = False
        self.tabs = QTabWidget(objectName="conversationTabs", documentMode=True, movable=True, tabsClosable=True)
        self.tabs.tabCloseRequested.connect(self._on_tabs_close_requested)
        self.tabs.tabBar().tabBarDoubleClicked.connect(self._on_tab_bar_double_clicked)
        self.tabs.tabBar().tabMoved.connect(self._on_tab_bar_moved)
        self.tabs.tabBar().setExpanding(False)
        self.setCentralWidget(self.tabs)
        self.stats_dock = StatsDock(self)
        self.addDockWidget(Qt.DockWidgetArea.RightDockWidgetArea, self.stats_dock)
        self.resizeDocks([self.stats_dock], [400], Qt.Orientation.Horizontal)
        self._build_actions()
        self._build_status_bar()
        self._connect_worker()
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self._shutdown)

    # -- construction ---------------------------------------------------------------------------
    def _action(self, name: str, text: str, slot: Any, shortcut: QKeySequence | str | None = None) -> QAction:
        action = QAction(text, self, objectName=name)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        action.triggered.connect(slot)
        self.addAction(action)
        return action

    def _build_actions(self) -> None:
        self.action_new = self._action("actionNewChat", "&New chat", self.new_chat, QKeySequence.StandardKey.AddTab)
        self.action_new.setShortcut(QKeySequence("Ctrl+T"))
        self.action_close = self._action("actionCloseChat", "&Close chat", self.close_current_tab, "Ctrl+W")
        self.action_rename = self._action("actionRenameChat", "&Rename chat…", self._on_rename_triggered, "F2")
        self.action_export = self._action("actionExportChat", "&Export to Markdown…", self._on_export_triggered,
                                          "Ctrl+E")  # fmt: skip
        self.action_delete = self._action("actionDeleteChat", "&Delete conversation…", self._on_delete_triggered)
        self.action_settings = self._action("actionSettings", "&Settings…", self.open_settings, "Ctrl+,")
        self.action_quit = self._action("actionQuit", "&Quit", self.close, QKeySequence.StandardKey.Quit)
        chat = self.menuBar().addMenu("&Chat")
        for action in (self.action_new, self.action_close, self.action_rename):
            chat.addAction(action)
        self.reopen_menu = chat.addMenu("Re&open conversation")
        self.reopen_menu.setObjectName("reopenMenu")
        self.reopen_menu.aboutToShow.connect(self._fill_reopen_menu)
        chat.addSeparator()
        chat.addAction(self.action_export)
        chat.addAction(self.action_delete)
        chat.addSeparator()
        chat.addAction(self.action_quit)
        tools = self.menuBar().addMenu("&Tools")
        tools.addAction(self.action_settings)
        dock_action = self.stats_dock.toggleViewAction()
        dock_action.setText("Engine &stats")
        dock_action.setShortcut(QKeySequence("Ctrl+Shift+S"))
        tools.addAction(dock_action)
        plus = QToolButton(objectName="newChatButton", text="+", autoRaise=True)
        plus.setToolTip("New chat (Ctrl+T)")
        plus.clicked.connect(self.new_chat)
        self.tabs.setCornerWidget(plus, Qt.Corner.TopRightCorner)

    def _build_status_bar(self) -> None:
        self.model_label = QLabel("No model loaded", objectName="modelStatus")
        self.busy_label = QLabel(objectName="busyStatus")
        self.load_bar = QProgressBar(objectName="modelLoadProgress", maximumWidth=160, maximumHeight=14)
        self.load_bar.setRange(0, 0)
        self.load_bar.setVisible(False)
        bar = self.statusBar()
        bar.addWidget(self.model_label)
        bar.addWidget(self.load_bar)
        bar.addPermanentWidget(self.busy_label)

    def _connect_worker(self) -> None:
        w = self.client.worker
        w.model_loading.connect(self._on_worker_model_loading)
        w.model_loaded.connect(self._on_worker_model_loaded)
        w.model_load_failed.connect(self._on_worker_model_load_failed)
        w.model_missing.connect(self._on_worker_model_missing)
        w.prompt_progressed.connect(self._on_worker_prompt_progressed)
        w.text_generated.connect(self._on_worker_text_generated)
        w.request_finished.connect(self._on_worker_request_finished)
        w.request_failed.connect(self._on_worker_request_failed)
        w.stats_updated.connect(self._on_worker_stats_updated)
        w.settings_rejected.connect(self._on_worker_settings_rejected)
        w.download_progressed.connect(self._on_worker_download_progressed)
        w.download_finished.connect(self._on_worker_download_finished)
        w.download_failed.connect(self._on_worker_download_failed)

    def start(self, model_path: str | None = None) -> None:
        """Start the worker, load the model, restore the open conversations."""
        self.client.start()
        self.client.apply_settings(dict(self.settings.kv_cache), dict(self.settings.batching))
        if model_path is None:
            model_path = "" if os.environ.get(MODEL_ENV, "").strip() else (self.settings.model_path or "")
        self.client.load_model(model_path)
        try:
            self.store.mark_interrupted()
            conversations = [c for c in self.store.list_conversations() if c.settings.get("open", True)]
        except StoreError as exc:
            self.show_error("Conversations unavailable", str(exc))
            conversations = []
        for conversation in conversations:
            self._add_tab(conversation)
        if not self._tabs:
            self.new_chat()

    # -- tabs -----------------------------------------------------------------------------------
    def _add_tab(self, conversation: Conversation) -> ChatTab:
        try:
            messages = self.store.messages(conversation.id)
        except StoreError as exc:
            self.show_error("Cannot read the conversation", str(exc))
            messages = []
        tab = ChatTab(conversation, messages, self.store)
        tab.generation_requested.connect(self._on_tab_generation_requested)
        tab.cancel_requested.connect(self.client.cancel)
        tab.busy_changed.connect(self._on_tab_busy_changed)
        self._tabs[conversation.id] = tab
        index = self.tabs.addTab(tab, conversation.title)
        self.tabs.setTabToolTip(index, conversation.title)
        return tab

    @property
    def chat_tabs(self) -> list[ChatTab]:
        return [self.tabs.widget(i) for i in range(self.tabs.count())]  # type: ignore[misc]

    def tab_for(self, conversation_id: str) -> ChatTab | None:
        return self._tabs.get(conversation_id)

    @Slot()
    def new_chat(self) -> ChatTab:
        n = len(self._tabs) + 1
        try:
            conversation = self.store.create_conversation(f"Chat {n}", self.settings.system_prompt)
        except StoreError as exc:
            self.show_error("The conversation cannot be saved", f"{exc}\nIt is kept in memory only.")
            conversation = Conversation(os.urandom(16).hex(), f"Chat {n}", self.settings.system_prompt, {}, n, 0, 0)
        tab = self._add_tab(conversation)
        self.tabs.setCurrentWidget(tab)
        tab.prompt_edit.setFocus()
        return tab

    @Slot()
    def close_current_tab(self) -> None:
        if self.tabs.currentIndex() >= 0:
            self.close_tab(self.tabs.currentIndex())

    @Slot(int)
    def _on_tabs_close_requested(self, index: int) -> None:
        self.close_tab(index)

    def close_tab(self, index: int, *, keep: bool = True) -> None:
        """Close a tab: stop its reply (the text so far is kept), drop its KV session."""
        tab = self.tabs.widget(index)
        if not isinstance(tab, ChatTab):
            return
        tab.save_pending()
        tab.save_partial_now()
        self.client.remove_session(tab.conversation_id)
        del self._tabs[tab.conversation_id]
        self.tabs.removeTab(index)
        if keep:
            tab.conversation_settings["open"] = False
            self._store_write(self.store.set_conversation_settings, tab.conversation_id, tab.conversation_settings)
        tab.deleteLater()
        self._update_busy()
        if not self._tabs and not self._closed:
            self.new_chat()

    def rename_tab(self, index: int, title: str) -> None:
        tab = self.tabs.widget(index)
        title = title.strip()
        if isinstance(tab, ChatTab) and title:
            tab.title = title
            self.tabs.setTabText(index, title)
            self.tabs.setTabToolTip(index, title)
            self._store_write(self.store.rename, tab.conversation_id, title)

    @Slot(int)
    def _on_tab_bar_double_clicked(self, index: int) -> None:
        if index >= 0:
            self._ask_rename(index)

    @Slot()
    def _on_rename_triggered(self) -> None:
        if self.tabs.currentIndex() >= 0:
            self._ask_rename(self.tabs.currentIndex())

    def _ask_rename(self, index: int) -> None:
        dialog = QInputDialog(self, objectName="renameDialog")
        dialog.setWindowTitle("Rename chat")
        dialog.setLabelText("Name of this conversation:")
        dialog.setTextValue(self.tabs.tabText(index))
        tab = self.tabs.widget(index)
        dialog.textValueSelected.connect(lambda text: self.rename_tab(self.tabs.indexOf(tab), text))
        dialog.open()

    @Slot(int, int)
    def _on_tab_bar_moved(self, _from: int, _to: int) -> None:
        try:
            ids = [c.id for c in self.store.list_conversations()]
        except StoreError as exc:
            self.statusBar().showMessage(str(exc), 8000)
            return
        open_ids = [tab.conversation_id for tab in self.chat_tabs if tab.conversation_id in ids]
        self._store_write(self.store.reorder, open_ids + [i for i in ids if i not in open_ids])

    def _fill_reopen_menu(self) -> None:
        self.reopen_menu.clear()
        try:
            closed = [c for c in self.store.list_conversations() if not c.settings.get("open", True)]
        except StoreError as exc:
            closed = []
            self.statusBar().showMessage(str(exc), 8000)
        for conversation in closed:
            action = self.reopen_menu.addAction(conversation.title)
            action.triggered.connect(lambda _=False, cid=conversation.id: self.reopen(cid))
        if not closed:
            self.reopen_menu.addAction("(no closed conversations)").setEnabled(False)

    def reopen(self, conversation_id: str) -> ChatTab | None:
        """Open a saved conversation again; its KV session starts cold."""
        if conversation_id in self._tabs:
            self.tabs.setCurrentWidget(self._tabs[conversation_id])
            return self._tabs[conversation_id]
        conversation = self.store.get_conversation(conversation_id)
        if conversation is None:
            return None
        settings = {**conversation.settings, "open": True}
        self._store_write(self.store.set_conversation_settings, conversation_id, settings)
        tab = self._add_tab(conversation)
        tab.conversation_settings = settings
        self.tabs.setCurrentWidget(tab)
        return tab

    @Slot()
    def _on_export_triggered(self) -> None:
        tab = self.tabs.currentWidget()
        if not isinstance(tab, ChatTab):
            return
        name = "".join(c if c.isalnum() or c in " -_" else "_" for c in tab.title).strip() or "conversation"
        path, _ = QFileDialog.getSaveFileName(self, "Export to Markdown", str(Path.home() / f"{name}.md"),
                                              "Markdown (*.md)")  # fmt: skip
        if path:
            self.export_conversation(tab.conversation_id, path)

    def export_conversation(self, conversation_id: str, path: str) -> bool:
        try:
            Path(path).write_text(self.store.export_markdown(conversation_id), encoding="utf-8")
        except (StoreError, KeyError, OSError) as exc:
            self.show_error("Export failed", f"Cannot export to {path}: {exc}")
            return False
        self.statusBar().showMessage(f"Exported to {path}", 6000)
        return True

    @Slot()
    def _on_delete_triggered(self) -> None:
        tab = self.tabs.currentWidget()
        if not isinstance(tab, ChatTab):
            return
        answer = QMessageBox.question(self, "Delete conversation",
                                      f"Delete “{tab.title}” and all its messages? This cannot be undone.")  # fmt: skip
        if answer == QMessageBox.StandardButton.Yes:
            self.delete_conversation(tab.conversation_id)

    def delete_conversation(self, conversation_id: str) -> None:
        tab = self._tabs.get(conversation_id)
        if tab is not None:
            self.close_tab(self.tabs.indexOf(tab), keep=False)
        self._store_write(self.store.delete_conversation, conversation_id)

    # -- tabs -> worker -------------------------------------------------------------------------
    def sampling_for(self, tab: ChatTab) -> dict[str, Any]:
        sampling = {**self.settings.sampling, **tab.conversation_settings.get("sampling", {})}
        sampling["stop"] = list(sampling.get("stop", ()))
        return sampling

    @Slot(str, list)
    def _on_tab_generation_requested(self, conversation_id: str, messages: list) -> None:
        tab = self._tabs.get(conversation_id)
        if tab is not None:
            self.client.submit(conversation_id, messages, self.sampling_for(tab))

    @Slot(str, bool)
    def _on_tab_busy_changed(self, conversation_id: str, busy: bool) -> None:
        tab = self._tabs.get(conversation_id)
        if tab is not None:
            color = QColor("#047857") if busy else QColor()
            self.tabs.tabBar().setTabTextColor(self.tabs.indexOf(tab), color)
        self._update_busy()

    def _update_busy(self) -> None:
        n = sum(tab.is_generating for tab in self._tabs.values())
        self.busy_label.setText(f"{n} tab{'s' * (n != 1)} generating" if n else "")

    # -- worker -> tabs -------------------------------------------------------------------------
    @Slot(str, int, int)
    def _on_worker_prompt_progressed(self, conversation_id: str, done: int, total: int) -> None:
        if (tab := self._tabs.get(conversation_id)) is not None:
            tab.show_prompt_progress(done, total)

    @Slot(str, str)
    def _on_worker_text_generated(self, conversation_id: str, text: str) -> None:
        if (tab := self._tabs.get(conversation_id)) is not None:
            tab.append_text(text)

    @Slot(str, dict)
    def _on_worker_request_finished(self, conversation_id: str, result: dict) -> None:
        if (tab := self._tabs.get(conversation_id)) is not None:
            tab.finish_reply(result)

    @Slot(str, str)
    def _on_worker_request_failed(self, conversation_id: str, message: str) -> None:
        if (tab := self._tabs.get(conversation_id)) is not None:
            tab.fail_request(message)

    @Slot(dict)
    def _on_worker_stats_updated(self, stats: dict) -> None:
        if not self._closed:
            titles = {cid: tab.title for cid, tab in self._tabs.items()}
            self.stats_dock.update_stats(stats, titles)

    # -- model ----------------------------------------------------------------------------------
    @Slot(str)
    def _on_worker_model_loading(self, path: str) -> None:
        self.model_label.setText(f"Loading {Path(path).name}…")
        self.load_bar.setVisible(True)

    @Slot(dict)
    def _on_worker_model_loaded(self, info: dict) -> None:
        self.model_info = dict(info)
        self.load_bar.setVisible(False)
        self.model_label.setText(
            f"{info['name']} · {info['n_layers']} layers · context {info['context_length']:,} · "
            f"{info['session_token_limit']:,} tokens per tab"
        )
        self.model_label.setToolTip(info["path"])
        self.setWindowTitle(f"SmallMind — {info['name']}")
        if self.settings_dialog is not None:
            self.settings_dialog.set_model_info(info)

    @Slot(str, str)
    def _on_worker_model_load_failed(self, path: str, reason: str) -> None:
        self.load_bar.setVisible(False)
        if not self.model_info:
            self.model_label.setText("No model loaded")
        self.show_error("Cannot load the model", f"The model file {path} cannot be used:\n\n{reason}",
                        name="modelErrorDialog")  # fmt: skip

    @Slot(str)
    def _on_worker_model_missing(self, message: str) -> None:
        self.model_label.setText("No model loaded")
        dialog = FirstRunDialog(default_model_description(), message, self)
        dialog.download_requested.connect(self.client.start_download)
        dialog.download_cancel_requested.connect(self.client.cancel_download)
        dialog.model_file_chosen.connect(self.use_model_file)
        self.first_run_dialog = dialog
        dialog.open()

    @Slot(str)
    def use_model_file(self, path: str) -> None:
        """The user picked a GGUF file: remember it and load it."""
        self._save_settings(self.settings.with_changes(model_path=path))
        self.client.load_model(path)

    @Slot(str, int, int)
    def _on_worker_download_progressed(self, phase: str, done: int, total: int) -> None:
        if self.first_run_dialog is not None:
            self.first_run_dialog.show_progress(phase, done, total)

    @Slot(str)
    def _on_worker_download_finished(self, path: str) -> None:
        if self.first_run_dialog is not None:
            self.first_run_dialog.show_finished(path)
        self.client.load_model(path)

    @Slot(str)
    def _on_worker_download_failed(self, message: str) -> None:
        if self.first_run_dialog is not None:
            self.first_run_dialog.show_failed(message)

    # -- settings -------------------------------------------------------------------------------
    @Slot()
    def open_settings(self) -> SettingsDialog:
        if self.settings_dialog is None:
            dialog = SettingsDialog(self.settings, self.model_info, self)
            dialog.settings_chosen.connect(self.apply_settings)
            dialog.finished.connect(self._on_settings_dialog_finished)
            self.settings_dialog = dialog
        self.settings_dialog.open()
        return self.settings_dialog

    @Slot(int)
    def _on_settings_dialog_finished(self, _result: int) -> None:
        if self.settings_dialog is not None:
            self.settings_dialog.deleteLater()
            self.settings_dialog = None

    @Slot(object)
    def apply_settings(self, settings: AppSettings) -> None:
        """Live: the engine takes the new options at once; a new model file is loaded on the worker."""
        old, self.settings = self.settings, settings
        self._save_settings(settings)
        self.client.apply_settings(dict(settings.kv_cache), dict(settings.batching))
        if settings.model_path != old.model_path:
            self.client.load_model(settings.model_path or "")

    def _save_settings(self, settings: AppSettings) -> None:
        self.settings = settings
        try:
            save_settings(settings)
        except SettingsError as exc:
            self.show_error("Settings not saved", f"{exc}\nThey apply until SmallMind closes.")

    @Slot(str)
    def _on_worker_settings_rejected(self, message: str) -> None:
        self.show_error("Settings not applied", message)

    # -- errors ---------------------------------------------------------------------------------
    def show_error(self, title: str, text: str, name: str = "errorDialog") -> QMessageBox:
        """A non-blocking message box (the app stays usable behind it)."""
        box = QMessageBox(QMessageBox.Icon.Warning, title, text, QMessageBox.StandardButton.Ok, self)
        box.setObjectName(name)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        self.error_dialog = box
        box.open()
        return box

    def _store_write(self, write: Any, *args: Any) -> None:
        try:
            write(*args)
        except (StoreError, KeyError, ValueError) as exc:
            log.warning("store write failed: %s", exc)
            self.statusBar().showMessage(f"Not saved: {exc}", 10000)

    # -- shutdown -------------------------------------------------------------------------------
    def closeEvent(self, event: QCloseEvent) -> None:
        self._shutdown()
        event.accept()

    @Slot()
    def _shutdown(self) -> None:
        """Keep the text of replies in progress, stop the engine, join its thread. Runs once."""
        if self._closed:
            return
        self._closed = True
        for tab in self._tabs.values():
            tab.save_pending()
            tab.save_partial_now()
        self.client.shutdown()
        self.store.close()

    def widget_named(self, name: str) -> QWidget | None:
        return self.findChild(QWidget, name)
