"""Documents in the window: the Tools → Documents… action and dialog, each tab's Documents button and
citation panel, retrieval before a message is sent, and re-indexing when files change.

On send, a tab that uses libraries has its messages go to the retrieval worker first; the passages
come back added after the last message (the conversation before it unchanged, so the KV cache is
reused), the tab says how many tokens they take of its budget, and only then is the request
submitted. The reply's stats keep the citations, so the numbered sources under it (and the passage
each opens in the side panel) come back with the conversation. Libraries are updated in the
background at start, when their files change (a file watcher, debounced) and on demand.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QFileSystemWatcher, QObject, QTimer, Signal, Slot
from PySide6.QtGui import QAction

from ..worker.documents import DocumentsClient, local_tokenizer
from .choices import SETTINGS_KEY, budget_of, documents_setting, libraries_of, retrieval_status
from .citation_panel import CitationPanel
from .dialog import DocumentsDialog
from .toggle import DocumentsToggle

if TYPE_CHECKING:
    from ..chat.tab import ChatTab
    from ..window.main_window import MainWindow

log = logging.getLogger(__name__)

WATCH_DEBOUNCE_MS = 1000  # a burst of saves becomes one update
MAX_WATCHED_PATHS = 4000  # folders and files watched (inotify watches are a limited resource)


class DocumentsFeature(QObject):
    libraries_listed = Signal(list)  # the rows the dialog shows (worker.documents.library_rows)

    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.client = DocumentsClient(local_tokenizer(window.client.worker), self)
        self.rows: list[dict[str, Any]] = []
        self.dialog: DocumentsDialog | None = None
        self.pending: dict[str, dict[str, Any]] = {}  # conversation id -> the documents of its request
        self.awaiting: dict[str, int] = {}  # conversation id -> its retrieval waiting for passages
        self._retrievals = 0
        self.toggles: dict[str, DocumentsToggle] = {}
        self.panels: dict[str, CitationPanel] = {}
        self.watcher = QFileSystemWatcher(self)
        self._changed: set[str] = set()
        self._debounce = QTimer(self, singleShot=True, interval=WATCH_DEBOUNCE_MS)
        self._debounce.timeout.connect(self._update_changed)
        self.watcher.directoryChanged.connect(self._on_watcher_changed)
        self.watcher.fileChanged.connect(self._on_watcher_changed)
        self.action = QAction("&Documents…", window, objectName="actionDocuments")
        self.action.triggered.connect(self.open_dialog)
        window.addAction(self.action)
        window.tools_menu.insertAction(window.tools_menu.actions()[0], self.action)
        window.tabs.tab_opened.connect(self._on_tabs_tab_opened)
        indexer, retriever = self.client.indexer, self.client.retriever
        indexer.progressed.connect(self._on_indexer_progressed)
        indexer.finished.connect(self._on_indexer_finished)
        indexer.failed.connect(self._on_indexer_failed)
        retriever.listed.connect(self._on_retriever_listed)
        retriever.retrieved.connect(self._on_retriever_retrieved)
        retriever.retrieval_failed.connect(self._on_retriever_retrieval_failed)
        self.client.list_libraries()
        self.client.update()  # files changed while the app was closed: caught up in the background

    # -- commands ---------------------------------------------------------------------------------
    @Slot()
    def open_dialog(self) -> DocumentsDialog:
        if self.dialog is None:
            self.dialog = DocumentsDialog(self, self.window)
            self.dialog.set_rows(self.rows)
        self.dialog.show()
        self.dialog.raise_()
        self.client.list_libraries()
        return self.dialog

    def add_library(self, name: str, sources: list[str]) -> None:
        self.client.add_library(name, sources)

    def remove_library(self, name: str) -> None:
        self.client.remove_library(name)

    def update_libraries(self, names: list[str] | None = None) -> None:
        self.client.update(names)

    @Slot()
    def stop_indexing(self) -> None:
        self.client.stop_update()

    def shutdown(self) -> None:
        self.client.shutdown()

    # -- tabs -------------------------------------------------------------------------------------
    @Slot(object)
    def _on_tabs_tab_opened(self, tab: ChatTab) -> None:
        settings = tab.conversation_settings
        toggle = DocumentsToggle(libraries_of(settings), budget_of(settings), tab)
        toggle.set_available([row["name"] for row in self.rows])
        toggle.changed.connect(lambda names, budget, tab=tab: self._on_toggle_changed(tab, names, budget))
        tab.header_row.insertWidget(1, toggle)
        panel = CitationPanel(tab)
        tab.transcript_row.addWidget(panel)
        tab.cancel_requested.connect(lambda cid, tab=tab: self._on_tab_cancel_requested(tab, cid))
        tab.transcript.citation_requested.connect(
            lambda index, number, tab=tab: self.show_citation(tab, index, number)
        )
        self.toggles[tab.conversation_id] = toggle
        self.panels[tab.conversation_id] = panel
        tab.destroyed.connect(lambda _=None, cid=tab.conversation_id: self._forget_tab(cid))

    def _forget_tab(self, conversation_id: str) -> None:
        self.toggles.pop(conversation_id, None)
        self.panels.pop(conversation_id, None)

    def _on_toggle_changed(self, tab: ChatTab, names: list[str], budget: int) -> None:
        tab.model.set_setting(SETTINGS_KEY, documents_setting(names, budget))

    def show_citation(self, tab: ChatTab, index: int, number: int) -> bool:
        """Open citation ``number`` of reply ``index`` in the tab's side panel."""
        if not 0 <= index < len(tab.entries):
            return False
        citations = tab.entries[index].stats.get("citations") or []
        citation = next((c for c in citations if c.get("number") == number), None)
        panel = self.panels.get(tab.conversation_id)
        if citation is None or panel is None:
            return False
        panel.show_citation(citation)
        return True

    def retrieve_first(self, tab: ChatTab, messages: list[dict[str, str]]) -> bool:
        """True when the tab's messages go to retrieval first (they are submitted once it answers)."""
        names = libraries_of(tab.conversation_settings)
        if not names or not messages or messages[-1].get("role") != "user":
            return False
        tab.status_label.setText("searching the documents…")
        self._retrievals += 1
        self.awaiting[tab.conversation_id] = self._retrievals
        request = f"{tab.conversation_id}#{self._retrievals}"  # an answer to an older request is dropped
        self.client.retrieve(request, messages, names, budget_of(tab.conversation_settings))
        return True

    def _answered(self, request: str) -> ChatTab | None:
        """The tab still waiting for this retrieval (None: stopped, closed, or sent again since)."""
        conversation_id, _, number = request.rpartition("#")
        if self.awaiting.get(conversation_id) != int(number or 0):
            return None
        del self.awaiting[conversation_id]
        tab = self.window.tabs.tab_for(conversation_id)
        return tab if tab is not None and tab.is_generating else None

    def _on_tab_cancel_requested(self, tab: ChatTab, conversation_id: str) -> None:
        """Stop before the passages came: nothing was submitted, so the reply ends here."""
        if self.awaiting.pop(conversation_id, None) is not None:
            tab.finish_reply({"finish_reason": "cancelled", "text": ""})

    def with_citations(self, conversation_id: str, result: dict[str, Any]) -> dict[str, Any]:
        """The finished request's result, with the citations of the passages it was sent with."""
        documents = self.pending.pop(conversation_id, None)
        return {**result, **documents} if documents else result

    def forget(self, conversation_id: str) -> None:
        self.pending.pop(conversation_id, None)

    @Slot(str, list, list, int, int)
    def _on_retriever_retrieved(self, request: str, messages: list, citations: list, n_tokens: int,
                                budget: int) -> None:  # fmt: skip
        tab = self._answered(request)
        if tab is None:
            return
        conversation_id = tab.conversation_id
        if citations:
            self.pending[conversation_id] = {"citations": citations, "documents_tokens": n_tokens,
                                             "documents_budget": budget}  # fmt: skip
        tab.status_label.setText(retrieval_status(citations, n_tokens, budget))
        self.window.client.submit(conversation_id, messages, self.window.sampling_for(tab))

    @Slot(str, list, str)
    def _on_retriever_retrieval_failed(self, request: str, messages: list, message: str) -> None:
        tab = self._answered(request)
        if tab is None:
            return
        tab.add_notice(f"Documents not used for this message: {message}", "error")
        self.window.client.submit(tab.conversation_id, messages, self.window.sampling_for(tab))

    # -- indexing ---------------------------------------------------------------------------------
    @Slot(str, int, int, str)
    def _on_indexer_progressed(self, name: str, done: int, total: int, path: str) -> None:
        if self.dialog is not None:
            self.dialog.show_progress(name, done, total, path)

    @Slot(str, dict)
    def _on_indexer_finished(self, name: str, report: dict) -> None:
        if self.dialog is not None:
            self.dialog.show_finished(name, report)
        self._watch([*report.get("folders", []), *report.get("files", [])])
        self.client.list_libraries()

    @Slot(str, str)
    def _on_indexer_failed(self, name: str, message: str) -> None:
        log.warning("documents: %s: %s", name, message)
        if self.dialog is not None:
            self.dialog.show_failed(name, message)
        self.client.list_libraries()

    @Slot(list)
    def _on_retriever_listed(self, rows: list) -> None:
        self.rows = list(rows)
        names = [row["name"] for row in self.rows]
        for toggle in self.toggles.values():
            toggle.set_available(names)
        if self.dialog is not None:
            self.dialog.set_rows(self.rows)
        self._watch([source for row in self.rows for source in row["sources"]])
        self.libraries_listed.emit(self.rows)

    # -- re-indexing when files change --------------------------------------------------------------
    def _watch(self, paths: list[str]) -> None:
        """Watch folders (files added or removed) and files (changed in place: their folder is not told)."""
        watched = set(self.watcher.directories()) | set(self.watcher.files())
        room = MAX_WATCHED_PATHS - len(watched)
        new = [p for p in dict.fromkeys(paths) if p not in watched][: max(room, 0)]
        if new:
            self.watcher.addPaths(new)

    @Slot(str)
    def _on_watcher_changed(self, path: str) -> None:
        self._changed.add(path)
        self._debounce.start()

    @Slot()
    def _update_changed(self) -> None:
        changed, self._changed = self._changed, set()
        names = [row["name"] for row in self.rows
                 if any(path == source or path.startswith(source.rstrip("/") + "/")
                        for path in changed for source in row["sources"])]  # fmt: skip
        if names:
            self.client.update(names)
