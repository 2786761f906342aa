"""The worker's side of the window's tools: the in-app API server (Tools → Local server…), the model
list and downloads (Tools → Models…, the first-run dialog) and an endpoint's test (Settings →
Engines → Test).

``WorkerTools`` is a part of the ``EngineWorker`` (its child QObject, on the worker's thread): the
``EngineClient`` queues these slots to it and it answers with the worker's signals. The work itself
is in the Qt-free modules beside it: ``api_server``, ``downloads`` (a download runs on a plain
Python thread), ``remote_requests.probe_endpoint`` (a short-lived thread).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, Slot

from .api_server import ApiServer
from .downloads import ModelDownloads, list_models
from .remote_requests import probe_endpoint

if TYPE_CHECKING:
    from .engine_worker import EngineWorker

log = logging.getLogger(__name__)


class WorkerTools(QObject):
    """See the module docstring; ``api`` is the server (None-safe to stop), ``downloads`` the fetcher."""

    def __init__(self, worker: EngineWorker) -> None:
        super().__init__(worker)
        self.worker = worker
        self.api = ApiServer()
        self.downloads = ModelDownloads(
            worker.download_progressed.emit, worker.download_finished.emit, worker.download_failed.emit
        )

    # -- the in-app API server (``api_server``) ------------------------------------------------------
    @Slot(int, str)
    def start_server(self, port: int, api_key: str) -> None:
        """Serve the local models over the OpenAI-compatible API on 127.0.0.1:``port`` (``api_server``):
        each by its ``model`` id, the default model for a request without one."""
        local, worker = self.worker.local, self.worker
        if local.engine is None or local.pool is None:
            worker.server_stopped.emit("no model is loaded")
            return
        if self.api.running:
            self.stop_server()
        try:
            url = self.api.start(local.pool, local.engine, local.default_id or "", port, api_key)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("the API server did not start on port %d: %s", port, exc)
            worker.server_stopped.emit(f"could not start on port {port}: {exc}")
            return
        worker.server_started.emit(url)

    @Slot()
    def stop_server(self) -> None:
        self.api.stop()
        self.worker.server_stopped.emit("")

    # -- remote engines: a test of Settings → Engines ---------------------------------------------------
    @Slot(str, str)
    def test_endpoint(self, base_url: str, api_key: str) -> None:
        """List a server's models on a short-lived thread (never blocking this one): ``endpoint_tested``."""
        probe_endpoint(base_url, api_key, self.worker.endpoint_tested.emit)

    # -- models and downloads (``downloads``) -----------------------------------------------------
    @Slot(list)
    def list_models(self, known_paths: list) -> None:
        """Emit ``models_listed``: the catalog, then the other GGUF files (`known_paths`, those loaded
        since the start, the models directory's)."""
        local = self.worker.local
        loaded = local.loaded_path()
        self.worker.models_listed.emit(list_models([*known_paths, *local.opened_paths], loaded))

    @Slot(str, bool)
    def start_download(self, key: str = "", accept_license: bool = False) -> None:
        """Fetch catalog model `key` ("" = the default) on a plain Python thread (``ModelDownloads``)."""
        self.downloads.start(key, accept_license)

    @Slot()
    def cancel_download(self) -> None:
        self.downloads.cancel()
