"""The local models as the window sees them: which engine answers each conversation, loading a model
(the default one, or a tab's), telling who waits for it when it is ready or failed, and unloading an
idle model when its time-to-live ends.

``ModelLoading`` is a part of the ``EngineWorker`` (its child QObject, on the worker's thread): the
``EngineClient`` queues ``load_model`` and ``set_conversation_engine`` to it, and it answers with
the worker's signals (``model_loaded``, ``conversation_model_ready``, ...). The models themselves
load on the pool's own thread (``local_engine.LocalEngine``, ``engine/model_pool.py``); ``check``
reads what changed, after a step, a submit or a timer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from ..engines.endpoints import LOCAL_ENGINE, model_path_of
from .local_engine import ModelLoadFailed, compiling_note, resolve_model

if TYPE_CHECKING:
    from .engine_worker import EngineWorker


class ModelLoading(QObject):
    """See the module docstring; ``wake`` tells the worker (from any thread) that a model has work."""

    default_loaded = Signal()  # the default model has just loaded (after the worker's model_loaded)

    def __init__(self, worker: EngineWorker, wake: Callable[[], None]) -> None:
        super().__init__(worker)
        self.worker = worker
        self.local = worker.local
        self._wake = wake
        self._expiry_timer: QTimer | None = None
        self._loading_for: dict[str, str] = {}  # conversation id -> the model id it waits for
        self._default_reported: str | None = None  # the default model whose model_loaded was sent

    def initialize(self) -> None:
        """On the worker's thread (``EngineWorker.initialize``): the timer belongs to it."""
        self._expiry_timer = QTimer(self)  # an idle model's time-to-live ends: it is unloaded
        self._expiry_timer.setSingleShot(True)
        self._expiry_timer.timeout.connect(self._on_expiry_timer_timeout)

    def stop(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.stop()

    @Slot(str)
    def load_model(self, path: str) -> None:
        """Make ``path`` ("" = $SMALLMIND_MODEL, else the installed default model) the default model
        and load it (on the pool's thread: the other models keep answering); ``model_loaded`` when it
        is ready. The models loaded before stay loaded (within the memory limit), as their tabs' are."""
        worker = self.worker
        try:
            resolved = resolve_model(path)
        except ModelLoadFailed as failed:
            if failed.missing:
                worker.model_missing.emit(failed.reason)
            else:
                worker.model_load_failed.emit(failed.path, failed.reason)
            return
        worker.model_loading.emit(resolved, compiling_note())
        model_id = self.local.open(resolved, self._wake)  # queued: steps on the worker's thread
        self.local.open_installed(self._wake)
        self.local.use_as_default(model_id)
        self._default_reported = None
        self.check()

    @Slot(str, str, bool)
    def set_conversation_engine(self, conversation_id: str, engine_id: str, load: bool) -> None:
        """Route the conversation's next replies to ``engine_id``: "local" (the default model),
        "model:<path>" (another local model) or an endpoint id. ``load``: load its model now (the
        user picked it; the tab hears when it is loading and when it is ready), else at its first
        reply (a tab restored at start)."""
        worker = self.worker
        path = model_path_of(engine_id)
        local = path is not None or engine_id == LOCAL_ENGINE
        worker.remote.route(conversation_id, LOCAL_ENGINE if local else engine_id)
        if not local:
            return
        if path is not None:
            try:
                path = resolve_model(path)
            except ModelLoadFailed as failed:
                worker.conversation_model_failed.emit(conversation_id, Path(failed.path).stem, failed.reason)
                return
        model_id = self.local.route(conversation_id, path, self._wake, load)
        if model_id is None or not load:
            return
        name = self.local.model_name(conversation_id)
        if self.local.is_loaded(model_id):
            worker.conversation_model_ready.emit(conversation_id, name)
        else:
            self._loading_for[conversation_id] = model_id
            worker.conversation_model_loading.emit(conversation_id, name)
        self.check()

    def forget(self, conversation_id: str) -> None:
        """A closed tab waits for no model any more."""
        self._loading_for.pop(conversation_id, None)

    @Slot()
    def _on_expiry_timer_timeout(self) -> None:
        if self.local.pool is not None:
            self.local.pool.expire_idle()
        self.check()

    def check(self) -> None:
        """Tell what changed among the local models: the default model loaded (``model_loaded``) or
        failed, the tabs waiting for a model, the list for the pickers and the dock; set the timer
        of the next idle model's time-to-live."""
        worker, pool = self.worker, self.local.pool
        expiry = pool.seconds_until_expiry() if pool is not None else None
        if self._expiry_timer is not None and expiry is not None:
            self._expiry_timer.start(max(1, min(math.ceil(expiry * 1000) + 1, 2**31 - 1)))
        changes = self.local.changes()
        default = self.local.default_id
        for model_id, state, error in changes:
            if state == "failed" and error:
                self._model_failed(model_id, error)
        if default is not None and self.local.is_loaded(default) and self._default_reported != default:
            self._default_reported = default
            worker.model_loaded.emit(self.local.model_info())
            self.default_loaded.emit()
        for conversation_id, model_id in list(self._loading_for.items()):
            if self.local.is_loaded(model_id):
                del self._loading_for[conversation_id]
                worker.conversation_model_ready.emit(conversation_id, self.local.model_name(conversation_id))
        if changes:
            worker.local_models_listed.emit(self.local.models())

    def _model_failed(self, model_id: str, error: str) -> None:
        path = str(self.local.pool.path_of(model_id)) if self.local.pool is not None else model_id
        reason = error.split(f"{path}: ", 1)[-1]
        if model_id == self.local.default_id and self._default_reported != model_id:
            self.worker.model_load_failed.emit(path, reason)
        for conversation_id, waiting in list(self._loading_for.items()):
            if waiting == model_id:
                del self._loading_for[conversation_id]
                self.worker.conversation_model_failed.emit(conversation_id, Path(path).stem, reason)
