"""The GUI thread's handle on the engine worker: owns the QThread, sends commands as queued signals.

Qt for Python's worker pattern: the ``EngineWorker`` QObject is moved to one long-lived QThread
(never a QThread subclass: the thread needs its own event loop so that queued submit and cancel
calls arrive between two engine steps). Every method here only emits a signal; the worker (or one
of its parts, ``worker.models`` and ``worker.tools``: its children, on its thread) runs the slot on
its thread. ``shutdown`` asks the worker to stop the engine and waits for the thread.
"""

from __future__ import annotations

import logging
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal

from .engine_worker import EngineWorker

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_MS = 30_000  # loading a model cannot be interrupted; everything else ends within a step


class EngineClient(QObject):
    load_model_requested = Signal(str)
    submit_requested = Signal(str, list, dict)
    continue_requested = Signal(str, list, dict)  # conversation id, messages (the cut reply last), sampling
    cancel_requested = Signal(str)
    count_tokens_requested = Signal(str, str)
    remove_session_requested = Signal(str)
    apply_settings_requested = Signal(dict, dict, dict)  # KV cache, batching, loaded models
    download_requested = Signal(str, bool)  # catalog key ("" = the default model), license accepted now
    list_models_requested = Signal(list)
    download_cancel_requested = Signal()
    shutdown_requested = Signal()
    server_start_requested = Signal(int, str)  # port, API key ("" = none)
    server_stop_requested = Signal()
    endpoints_requested = Signal(list)  # Settings → Engines, keys included (never logged)
    conversation_engine_requested = Signal(str, str, bool)  # conversation id, engine id, load its model now
    endpoint_test_requested = Signal(str, str)  # base URL, API key
    forget_session_requested = Signal(str)  # a deleted conversation: its KV session, memory and disk
    clear_disk_requested = Signal()  # Settings → KV cache → Clear: the disk tier's files
    prefetch_requested = Signal(list)  # conversation ids of opened tabs: read their K/V files ahead

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thread = QThread()
        self.thread.setObjectName("smallmind-engine")
        self.worker = EngineWorker()
        self.worker.moveToThread(self.thread)
        self.thread.started.connect(self.worker.initialize)
        self.load_model_requested.connect(self.worker.models.load_model)
        self.submit_requested.connect(self.worker.submit)
        self.continue_requested.connect(self.worker.continue_reply)
        self.cancel_requested.connect(self.worker.cancel)
        self.count_tokens_requested.connect(self.worker.count_tokens)
        self.remove_session_requested.connect(self.worker.remove_session)
        self.apply_settings_requested.connect(self.worker.apply_settings)
        self.download_requested.connect(self.worker.tools.start_download)
        self.download_cancel_requested.connect(self.worker.tools.cancel_download)
        self.list_models_requested.connect(self.worker.tools.list_models)
        self.shutdown_requested.connect(self.worker.shutdown)
        self.server_start_requested.connect(self.worker.tools.start_server)
        self.server_stop_requested.connect(self.worker.tools.stop_server)
        self.endpoints_requested.connect(self.worker.set_endpoints)
        self.conversation_engine_requested.connect(self.worker.models.set_conversation_engine)
        self.endpoint_test_requested.connect(self.worker.tools.test_endpoint)
        self.forget_session_requested.connect(self.worker.forget_session)
        self.clear_disk_requested.connect(self.worker.clear_disk_cache)
        self.prefetch_requested.connect(self.worker.prefetch_sessions)
        self._stopped = False

    def start(self) -> None:
        self.thread.start()

    # -- commands (queued to the worker thread) ---------------------------------------------------
    def load_model(self, path: str = "") -> None:
        self.load_model_requested.emit(path)

    def submit(self, conversation_id: str, messages: list[dict[str, str]], sampling: dict[str, Any]) -> None:
        self.submit_requested.emit(conversation_id, messages, sampling)

    def continue_reply(
        self, conversation_id: str, messages: list[dict[str, str]], sampling: dict[str, Any]
    ) -> None:
        self.continue_requested.emit(conversation_id, messages, sampling)

    def cancel(self, conversation_id: str) -> None:
        self.cancel_requested.emit(conversation_id)

    def count_tokens(self, conversation_id: str, text: str) -> None:
        self.count_tokens_requested.emit(conversation_id, text)

    def remove_session(self, conversation_id: str) -> None:
        self.remove_session_requested.emit(conversation_id)

    def forget_session(self, conversation_id: str) -> None:
        self.forget_session_requested.emit(conversation_id)

    def clear_disk_cache(self) -> None:
        self.clear_disk_requested.emit()

    def prefetch_sessions(self, conversation_ids: list[str]) -> None:
        self.prefetch_requested.emit(list(conversation_ids))

    def apply_settings(
        self, kv: dict[str, Any], batching: dict[str, Any], models: dict[str, Any] | None = None
    ) -> None:
        """``models``: max_loaded_bytes and idle_ttl_s of the local models (None: unchanged)."""
        self.apply_settings_requested.emit(kv, batching, dict(models or {}))

    def start_download(self, key: str = "", accept_license: bool = False) -> None:
        self.download_requested.emit(key, accept_license)

    def list_models(self, known_paths: list[str]) -> None:
        """The worker answers with ``models_listed`` (see ``downloads.list_models``)."""
        self.list_models_requested.emit(list(known_paths))

    def start_server(self, port: int, api_key: str = "") -> None:
        self.server_start_requested.emit(port, api_key)

    def stop_server(self) -> None:
        self.server_stop_requested.emit()

    def cancel_download(self) -> None:
        self.download_cancel_requested.emit()

    def set_endpoints(self, endpoints: list[dict[str, str]]) -> None:
        """The remote engines (id, name, base_url, model, api_key); see ``RemoteRequests.set_endpoints``."""
        self.endpoints_requested.emit(list(endpoints))

    def set_conversation_engine(self, conversation_id: str, engine_id: str, load: bool = False) -> None:
        """Which engine answers the conversation ("local", "model:<path>" or an endpoint id); ``load``:
        load its local model now (the user picked it), else when its first reply needs it."""
        self.conversation_engine_requested.emit(conversation_id, engine_id, load)

    def test_endpoint(self, base_url: str, api_key: str) -> None:
        """The worker answers with ``endpoint_tested`` (base URL, model ids, error)."""
        self.endpoint_test_requested.emit(base_url, api_key)

    # -- shutdown -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.thread.isRunning()

    def shutdown(self, timeout_ms: int = SHUTDOWN_TIMEOUT_MS) -> bool:
        """Stop the engine (running requests fail cleanly) and join the thread; True when it ended."""
        if self._stopped:
            return not self.thread.isRunning()
        self._stopped = True
        if not self.thread.isRunning():
            return True
        self.shutdown_requested.emit()
        finished = self.thread.wait(timeout_ms)
        if not finished:
            log.error("the engine thread did not stop within %d ms", timeout_ms)
        return bool(finished)
