"""The router: every signal of the engine worker goes to the one part of the window it belongs to.

A reply's progress, text, end or refusal goes to its conversation's tab (by conversation id),
whether or not the tab is shown, so switching tabs never stops or mixes up a generation; a tab's
requests go to the worker (through ``EngineClient``). Downloads, model lists and endpoint tests go to
the dialog that asked; the engine's stats to the dock; model loading and settings to the window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from PySide6.QtCore import QObject, Slot

from ..chat.tab import ChatTab
from ..engines.endpoints import is_local

if TYPE_CHECKING:
    from .main_window import MainWindow


class WorkerRouter(QObject):
    """Connects the worker's signals (and each tab's requests) once; see the module docstring."""

    def __init__(self, window: MainWindow) -> None:
        super().__init__(window)
        self.window = window
        self.client = window.client
        self.tabs = window.tabs
        self.remote_stats: dict[str, dict[str, Any]] = {}  # endpoint id -> the worker's figures of it
        w = self.client.worker
        w.prompt_progressed.connect(self._on_worker_prompt_progressed)
        w.text_generated.connect(self._on_worker_text_generated)
        w.request_waiting.connect(self._on_worker_request_waiting)
        w.request_queued.connect(self._on_worker_request_queued)
        w.request_finished.connect(self._on_worker_request_finished)
        w.request_failed.connect(self._on_worker_request_failed)
        w.tokens_counted.connect(self._on_worker_tokens_counted)
        w.stats_updated.connect(self._on_worker_stats_updated)
        w.remote_stats_updated.connect(self._on_worker_remote_stats_updated)
        w.download_progressed.connect(self._on_worker_download_progressed)
        w.download_finished.connect(self._on_worker_download_finished)
        w.download_failed.connect(self._on_worker_download_failed)
        w.models_listed.connect(self._on_worker_models_listed)
        w.endpoint_tested.connect(self._on_worker_endpoint_tested)
        w.server_started.connect(self._on_worker_server_started)
        w.server_stopped.connect(self._on_worker_server_stopped)
        w.model_loading.connect(window.model_status.show_loading)
        w.model_loaded.connect(window.model_status.show_loaded)
        w.model_load_failed.connect(window.model_status.show_load_failed)
        w.model_missing.connect(window.model_status.show_missing)
        w.local_models_listed.connect(window.set_local_models)
        w.conversation_model_loading.connect(self._on_worker_conversation_model_loading)
        w.request_loading.connect(self._on_worker_conversation_model_loading)
        w.conversation_model_ready.connect(self._on_worker_conversation_model_ready)
        w.conversation_model_failed.connect(self._on_worker_conversation_model_failed)
        w.settings_applied.connect(window.model_status.show_applied)
        w.settings_rejected.connect(window.show_settings_rejected)

    def connect_tab(self, tab: ChatTab) -> None:
        """A tab was opened: its requests go to the worker."""
        tab.generation_requested.connect(self._on_tab_generation_requested)
        tab.continue_requested.connect(self._on_tab_continue_requested)
        tab.cancel_requested.connect(self.client.cancel)
        tab.token_count_requested.connect(self.client.count_tokens)
        tab.engine_changed.connect(self._on_tab_engine_changed)

    # -- tabs -> worker -------------------------------------------------------------------------
    @Slot(str, list)
    def _on_tab_generation_requested(self, conversation_id: str, messages: list) -> None:
        tab = self.tabs.tab_for(conversation_id)
        if tab is not None and not self.window.documents.retrieve_first(tab, messages):
            self.client.submit(conversation_id, messages, self.window.sampling_for(tab))

    @Slot(str, list)
    def _on_tab_continue_requested(self, conversation_id: str, messages: list) -> None:
        tab = self.tabs.tab_for(conversation_id)
        if tab is not None:
            self.client.continue_reply(conversation_id, messages, self.window.sampling_for(tab))

    @Slot(str, str)
    def _on_tab_engine_changed(self, conversation_id: str, engine_id: str) -> None:
        self.client.set_conversation_engine(conversation_id, engine_id, load=True)  # the user picked it
        self.show_tab_engine()

    # -- worker -> tabs -------------------------------------------------------------------------
    @Slot(str, int, int)
    def _on_worker_prompt_progressed(self, conversation_id: str, done: int, total: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_prompt_progress(done, total)

    @Slot(str, str)
    def _on_worker_conversation_model_loading(self, conversation_id: str, name: str) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.engine.show_model_loading(name)

    @Slot(str, str)
    def _on_worker_conversation_model_ready(self, conversation_id: str, name: str) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.engine.show_model_ready(name)

    @Slot(str, str, str)
    def _on_worker_conversation_model_failed(self, conversation_id: str, name: str, reason: str) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.engine.show_model_failed(name, reason)

    @Slot(str)
    def _on_worker_request_waiting(self, conversation_id: str) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_waiting("memory")

    @Slot(str, int, int)
    def _on_worker_request_queued(self, conversation_id: str, running: int, limit: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_waiting("batch", running, limit)

    @Slot(str, str, int)
    def _on_worker_text_generated(self, conversation_id: str, text: str, n_tokens: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.append_text(text, n_tokens)

    @Slot(str, dict)
    def _on_worker_request_finished(self, conversation_id: str, result: dict) -> None:
        result = self.window.documents.with_citations(conversation_id, result)  # the passages it cited
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.finish_reply(result)

    @Slot(str, str, dict)
    def _on_worker_request_failed(self, conversation_id: str, message: str, info: dict) -> None:
        self.window.documents.forget(conversation_id)
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.fail_request(message, info)

    @Slot(str, str, int, int)
    def _on_worker_tokens_counted(self, conversation_id: str, text: str, n_tokens: int, limit: int) -> None:
        if (tab := self.tabs.tab_for(conversation_id)) is not None:
            tab.show_token_count(text, n_tokens, limit)

    # -- worker -> the dock ---------------------------------------------------------------------
    @Slot(dict)
    def _on_worker_stats_updated(self, stats: dict) -> None:
        window = self.window
        if not window.closed:
            window.stats_dock.update_stats(stats, self.tabs.titles())
        if window.settings_dialog is not None:  # the KV page shows what the disk tier holds
            window.settings_dialog.set_disk_usage(stats["kv"]["disk_sessions"], stats["kv"]["disk_bytes"])

    @Slot(dict)
    def _on_worker_remote_stats_updated(self, stats: dict) -> None:
        self.remote_stats = dict(stats)
        self.show_tab_engine()

    @Slot()
    def show_tab_engine(self, *_args: Any) -> None:
        """The dock's "This tab's engine": the tab shown's engine and, for a server, its own figures."""
        tab = self.tabs.currentWidget()
        if not isinstance(tab, ChatTab) or self.window.closed:
            return
        engine_id, label = tab.engine_picker.engine_id, tab.engine_picker.currentText()
        if is_local(engine_id):
            self.window.stats_dock.show_tab_engine(label, None)
            return
        empty = {"tokens_per_second": 0.0, "ttft_p50_ms": 0.0}
        figures = self.remote_stats.get(engine_id, empty)
        url = f" ({figures['url']})" if figures.get("url") else ""
        self.window.stats_dock.show_tab_engine(label + url, figures)

    # -- worker -> dialogs ----------------------------------------------------------------------
    @Slot(str, int, int)
    def _on_worker_download_progressed(self, phase: str, done: int, total: int) -> None:
        for dialog in (self.window.first_run_dialog, self.window.models_dialog):
            if dialog is not None:
                dialog.show_progress(phase, done, total)

    @Slot(str)
    def _on_worker_download_finished(self, path: str) -> None:
        for dialog in (self.window.first_run_dialog, self.window.models_dialog):
            if dialog is not None:
                dialog.show_finished(path)
        if not self.window.model_info:  # the first model: run it; else the Models dialog's Load switches
            self.client.load_model(path)

    @Slot(str)
    def _on_worker_download_failed(self, message: str) -> None:
        for dialog in (self.window.first_run_dialog, self.window.models_dialog):
            if dialog is not None:
                dialog.show_failed(message)

    @Slot(list)
    def _on_worker_models_listed(self, rows: list) -> None:
        if self.window.models_dialog is not None:
            self.window.models_dialog.set_models(rows)

    @Slot(str, list, str)
    def _on_worker_endpoint_tested(self, base_url: str, models: list, error: str) -> None:
        if self.window.settings_dialog is not None:
            self.window.settings_dialog.engines_page.show_test_result(base_url, list(models), error)

    @Slot(str)
    def _on_worker_server_started(self, url: str) -> None:
        if self.window.server_dialog is not None:
            self.window.server_dialog.show_running(url)

    @Slot(str)
    def _on_worker_server_stopped(self, message: str) -> None:
        if self.window.server_dialog is not None:
            self.window.server_dialog.show_stopped(message)
