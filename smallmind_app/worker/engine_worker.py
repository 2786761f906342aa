"""The engine worker: the app's one bridge to the engine (with the Qt-free modules beside it).

``EngineWorker`` is a QObject moved to one long-lived QThread (see ``client.py``). The GUI calls its
slots through queued signals; it answers with signals that carry plain values (str, int, float,
dict, list). It drives the local models' ``ModelPool.step()`` (one step of one model's engine) from a
zero-interval QTimer that runs while a model has work and stops when all are idle, so queued
submit/cancel/settings calls are handled between two steps; models load on the pool's own thread.
Engine events arrive inside ``step()`` on this thread and leave as signals
through ``replies.Replies``. Beside it, without Qt: the loaded model's engine and options
(``local_engine``), remote engines (``remote_requests``), downloads (``downloads``), the in-app API
server (``api_server``), the settings' checks (``engine_options``).
"""

from __future__ import annotations

import logging
import math
import threading
from functools import partial
from pathlib import Path
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, Qt, QTimer, Signal, Slot

from engine import GenerationEvent, GenerationResult

from .. import wording
from ..engines.endpoints import LOCAL_ENGINE, model_path_of
from ..wording import Problem
from . import replies
from .api_server import ApiServer
from .downloads import ModelDownloads, list_models
from .local_engine import LocalEngine, ModelLoadFailed, compiling_note, resolve_model
from .remote_requests import RemoteRequests, probe_endpoint
from .replies import Replies

log = logging.getLogger(__name__)

STATS_INTERVAL_MS = 250


class EngineWorker(QObject):
    """Drives the local engine (``self.local``) and the others; lives on the worker thread."""

    model_loading = Signal(str, str)  # path, what the load does besides reading it ("" or a note)
    model_loaded = Signal(dict)  # model_info(): name, path, n_layers, context_length, bytes_per_token...
    model_load_failed = Signal(str, str)  # path, reason
    model_missing = Signal(str)  # no model given and the default one is not installed: the message
    local_models_listed = Signal(list)  # LocalEngine.models(): every local model, its state (a change)
    conversation_model_loading = Signal(str, str)  # conversation id, model name: its model is loading
    conversation_model_ready = Signal(str, str)  # conversation id, model name: its model is loaded
    conversation_model_failed = Signal(str, str, str)  # conversation id, model name, why it did not load
    request_loading = Signal(str, str)  # conversation id, model name: its reply waits for the model's load
    prompt_progressed = Signal(str, int, int)  # conversation id, prompt tokens done, prompt tokens
    text_generated = Signal(str, str, int)  # conversation id, new text (pieces joined), tokens so far
    request_finished = Signal(str, dict)  # conversation id, result_dict()
    request_failed = Signal(str, str, dict)  # conversation id, message, {"setting", "suggested"} (at submit)
    request_waiting = Signal(str)  # conversation id: its request waits for KV memory (queued or preempted)
    stats_updated = Signal(dict)  # stats_dict(): "kv", "metrics", "sessions", "limits"
    settings_applied = Signal(dict)  # {"kv_cache", "batching", "session_token_limit", "bytes_per_token"}
    settings_rejected = Signal(str)
    tokens_counted = Signal(str, str, int, int)  # conversation id, text, its tokens, the tab's token limit
    download_progressed = Signal(str, int, int)  # phase, done, total (bytes; total 0 = unknown)
    download_finished = Signal(str)  # path of the installed model
    download_failed = Signal(str)
    models_listed = Signal(list)  # list_models(): one dict per catalog model and GGUF file
    server_started = Signal(str)  # the in-app API server's base URL
    server_stopped = Signal(str)  # why it stopped or could not start ("" = asked to)
    _work_arrived = Signal()  # emitted from other threads (the API server's) when they submit
    endpoint_tested = Signal(str, list, str)  # base URL, the model ids it offers, why not ("" = it works)
    remote_stats_updated = Signal(dict)  # endpoint id -> RemoteRequests.stats() figures of its engine
    _remote_event = Signal(str, object)  # conversation id, GenerationEvent: from a remote engine's thread
    _local_event = Signal(str, object)  # conversation id, GenerationEvent: from the model loader's thread
    shut_down = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.local = LocalEngine()  # the loaded model's engine and its options
        self._replies = Replies()
        self._remote = RemoteRequests()
        self._api = ApiServer()
        self._downloads = ModelDownloads(
            self.download_progressed.emit, self.download_finished.emit, self.download_failed.emit
        )
        self._step_timer: QTimer | None = None
        self._wait_timer: QTimer | None = None
        self._stats_timer: QTimer | None = None
        self._remote_flush: QTimer | None = None
        self._expiry_timer: QTimer | None = None
        self._loading_for: dict[str, str] = {}  # conversation id -> the model id it waits for
        self._thread_ident = 0  # the worker thread's (set in initialize)
        self._default_reported: str | None = None  # the default model whose model_loaded was sent

    @property
    def pull_model(self) -> Any:
        """What fetches a catalog model (``download.pull_model``); tests swap in a fake (no network)."""
        return self._downloads.pull_model

    @pull_model.setter
    def pull_model(self, pull: Any) -> None:
        self._downloads.pull_model = pull

    @property
    def stepping(self) -> bool:
        """Whether a step is due (now, or after the batch wait): False while the engine is idle."""
        timers = (self._step_timer, self._wait_timer)
        return any(timer is not None and timer.isActive() for timer in timers)

    # -- lifecycle ------------------------------------------------------------------------------
    @Slot()
    def initialize(self) -> None:
        """Connected to ``QThread.started``: timers are made here so they belong to this thread."""
        threading.current_thread().name = "smallmind-engine"  # for the log file
        self._step_timer = QTimer(self, interval=0)
        self._step_timer.timeout.connect(self._run_step)
        self._wait_timer = QTimer(self)
        self._wait_timer.setSingleShot(True)
        self._wait_timer.timeout.connect(self._run_step)
        self._stats_timer = QTimer(self, interval=STATS_INTERVAL_MS)
        self._stats_timer.timeout.connect(self._emit_stats)
        self._work_arrived.connect(self._on_work_arrived, Qt.ConnectionType.QueuedConnection)
        self._remote_event.connect(self._on_remote_event, Qt.ConnectionType.QueuedConnection)
        self._local_event.connect(self._on_local_event, Qt.ConnectionType.QueuedConnection)
        self._thread_ident = threading.get_ident()
        self._expiry_timer = QTimer(self)  # an idle model's time-to-live ends: it is unloaded
        self._expiry_timer.setSingleShot(True)
        self._expiry_timer.timeout.connect(self._on_expiry_timer_timeout)
        self._remote_flush = QTimer(self, interval=round(replies.TEXT_FLUSH_S * 1000))
        self._remote_flush.setSingleShot(True)
        self._remote_flush.timeout.connect(self._flush)

    @Slot()
    def shutdown(self) -> None:
        """Stop everything (running requests fail with a clear message), then end the thread."""
        self._api.stop()
        for timer in (self._step_timer, self._wait_timer, self._stats_timer, self._expiry_timer):
            if timer is not None:
                timer.stop()
        self._downloads.stop()
        if self.local.pool is not None:
            self.local.stop()
            self._flush(force=True)
            self.local.close()  # idle sessions to disk: warm after a restart
        self._remote.stop()
        self._replies.clear()
        thread = self.thread()
        app = QCoreApplication.instance()
        if app is not None:
            self.moveToThread(app.thread())  # so that the GUI thread may delete it after the join
        self.shut_down.emit()
        thread.quit()

    # -- the in-app API server ----------------------------------------------------------------------
    @Slot(int, str)
    def start_server(self, port: int, api_key: str) -> None:
        """Serve the local models over the OpenAI-compatible API on 127.0.0.1:``port`` (``api_server``):
        each by its ``model`` id, the default model for a request without one."""
        if self.local.engine is None or self.local.pool is None:
            self.server_stopped.emit("no model is loaded")
            return
        if self._api.running:
            self.stop_server()
        try:
            url = self._api.start(
                self.local.pool, self.local.engine, self.local.default_id or "", port, api_key
            )
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("the API server did not start on port %d: %s", port, exc)
            self.server_stopped.emit(f"could not start on port {port}: {exc}")
            return
        self.server_started.emit(url)

    @Slot()
    def stop_server(self) -> None:
        self._api.stop()
        self.server_stopped.emit("")

    @Slot()
    def _on_work_arrived(self) -> None:
        self._check_models()
        self._schedule()

    # -- remote engines (``remote_requests``) ------------------------------------------------------
    @Slot(list)
    def set_endpoints(self, endpoints: list) -> None:
        """The remote engines of Settings → Engines: dicts of id, name, base_url, model, api_key."""
        self._remote.set_endpoints(endpoints)
        if self._remote and self._stats_timer is not None and not self._stats_timer.isActive():
            self._stats_timer.start()
        self._emit_stats()

    @Slot(str, str, bool)
    def set_conversation_engine(self, conversation_id: str, engine_id: str, load: bool) -> None:
        """Route the conversation's next replies to ``engine_id``: "local" (the default model),
        "model:<path>" (another local model) or an endpoint id. ``load``: load its model now (the
        user picked it; the tab hears when it is loading and when it is ready), else at its first
        reply (a tab restored at start)."""
        path = model_path_of(engine_id)
        local = path is not None or engine_id == LOCAL_ENGINE
        self._remote.route(conversation_id, LOCAL_ENGINE if local else engine_id)
        if not local:
            return
        if path is not None:
            try:
                path = resolve_model(path)
            except ModelLoadFailed as failed:
                self.conversation_model_failed.emit(conversation_id, Path(failed.path).stem, failed.reason)
                return
        model_id = self.local.route(conversation_id, path, self._work_arrived.emit, load)
        if model_id is None or not load:
            return
        name = self.local.model_name(conversation_id)
        if self.local.is_loaded(model_id):
            self.conversation_model_ready.emit(conversation_id, name)
        else:
            self._loading_for[conversation_id] = model_id
            self.conversation_model_loading.emit(conversation_id, name)
        self._check_models()

    @Slot(str, str)
    def test_endpoint(self, base_url: str, api_key: str) -> None:
        """List a server's models on a short-lived thread (never blocking this one): ``endpoint_tested``."""
        probe_endpoint(base_url, api_key, self.endpoint_tested.emit)

    @Slot(str, object)
    def _on_remote_event(self, conversation_id: str, event: GenerationEvent) -> None:
        """A remote engine's event, now on this thread: buffered and sent on like the local ones."""
        if not self._remote.is_current(self._replies.handles.get(conversation_id), event):
            return  # its tab was closed, or it was given up
        if event.result is not None:
            self._remote.record(conversation_id, event.result)
        self._replies.add_remote(conversation_id, event)
        self._flush(force=event.result is not None)
        if (
            self._replies.text_pending
            and self._remote_flush is not None
            and not self._remote_flush.isActive()
        ):
            self._remote_flush.start()  # text held back by the flush interval goes out shortly

    # -- model ----------------------------------------------------------------------------------
    @Slot(str)
    def load_model(self, path: str) -> None:
        """Make ``path`` ("" = $SMALLMIND_MODEL, else the installed default model) the default model
        and load it (on the pool's thread: the other models keep answering); ``model_loaded`` when it
        is ready. The models loaded before stay loaded (within the memory limit), as their tabs' are."""
        try:
            resolved = resolve_model(path)
        except ModelLoadFailed as failed:
            if failed.missing:
                self.model_missing.emit(failed.reason)
            else:
                self.model_load_failed.emit(failed.path, failed.reason)
            return
        self.model_loading.emit(resolved, compiling_note())
        model_id = self.local.open(resolved, self._work_arrived.emit)  # queued: steps here
        self.local.open_installed(self._work_arrived.emit)
        self.local.use_as_default(model_id)
        self._default_reported = None
        self._check_models()

    def model_info(self) -> dict[str, Any]:
        return self.local.model_info()

    @Slot()
    def _on_expiry_timer_timeout(self) -> None:
        if self.local.pool is not None:
            self.local.pool.expire_idle()
        self._check_models()

    def _check_models(self) -> None:
        """Tell what changed among the local models: the default model loaded (``model_loaded``) or
        failed, the tabs waiting for a model, the list for the pickers and the dock; set the timer
        of the next idle model's time-to-live."""
        pool = self.local.pool
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
            self.model_loaded.emit(self.model_info())
            self._emit_stats()
            if self._stats_timer is not None:
                self._stats_timer.start()
        for conversation_id, model_id in list(self._loading_for.items()):
            if self.local.is_loaded(model_id):
                del self._loading_for[conversation_id]
                self.conversation_model_ready.emit(conversation_id, self.local.model_name(conversation_id))
        if changes:
            self.local_models_listed.emit(self.local.models())

    def _model_failed(self, model_id: str, error: str) -> None:
        path = str(self.local.pool.path_of(model_id)) if self.local.pool is not None else model_id
        reason = error.split(f"{path}: ", 1)[-1]
        if model_id == self.local.default_id and self._default_reported != model_id:
            self.model_load_failed.emit(path, reason)
        for conversation_id, waiting in list(self._loading_for.items()):
            if waiting == model_id:
                del self._loading_for[conversation_id]
                self.conversation_model_failed.emit(conversation_id, Path(path).stem, reason)

    # -- requests -------------------------------------------------------------------------------
    @Slot(str, list, dict)
    def submit(self, conversation_id: str, messages: list, sampling: dict) -> None:
        """Queue a reply for the conversation (its KV session id is the conversation id)."""
        self._submit(conversation_id, messages, sampling, continuing=False)

    @Slot(str, list, dict)
    def continue_reply(self, conversation_id: str, messages: list, sampling: dict) -> None:
        """Go on with the conversation's last reply (the last of ``messages``, cut by its token limit
        or stopped) from where it stopped; its K/V are reused, so the prompt is not computed again."""
        if self._remote.answers(conversation_id):
            self._refuse(conversation_id, Problem(wording.CONTINUE_LOCAL_ONLY))
            return
        self._submit(conversation_id, messages, sampling, continuing=True)

    def _submit(self, conversation_id: str, messages: list, sampling: dict, continuing: bool) -> None:
        if conversation_id in self._replies:
            self._refuse(conversation_id, Problem(wording.ALREADY_GENERATING))
            return
        loading = False
        if self._remote.answers(conversation_id):  # a remote engine's events hop to this thread first
            on_event = partial(self._remote_event.emit, conversation_id)
            started = self._remote.submit(conversation_id, messages, sampling, on_event)
        else:
            model_id = self.local.model_of(conversation_id)
            loading = model_id is not None and not self.local.is_loaded(model_id)
            on_event = partial(self._local_event_from_any_thread, conversation_id)
            started = self.local.submit(conversation_id, messages, sampling, on_event, continuing)
        if isinstance(started, Problem):
            self._refuse(conversation_id, started)
            return
        self._replies.start(conversation_id, *started)  # handle, max new tokens
        if loading:  # it waits for its model's load
            self.request_loading.emit(conversation_id, self.local.model_name(conversation_id))
        self._schedule()

    def _local_event_from_any_thread(self, conversation_id: str, event: GenerationEvent) -> None:
        """A local request's event: inside a step (this thread), or from the model loader's thread (its
        model failed to load), which hops here first."""
        if threading.get_ident() == self._thread_ident:
            self._replies.add(conversation_id, event)
        else:
            self._local_event.emit(conversation_id, event)

    @Slot(str, object)
    def _on_local_event(self, conversation_id: str, event: GenerationEvent) -> None:
        self._replies.add(conversation_id, event)
        self._flush(force=event.result is not None)

    def _finished_reply(self, conversation_id: str, result: GenerationResult) -> dict[str, Any]:
        max_new_tokens = self._replies.pop_max_new_tokens(conversation_id)
        author = self._remote.author(conversation_id)
        remote = self._remote.finished(conversation_id)
        return self.local.finished_reply(conversation_id, result, max_new_tokens, remote) | author

    def _refuse(self, conversation_id: str, problem: Problem) -> None:
        info = {"setting": problem.setting, "suggested": problem.suggested}
        self.request_failed.emit(conversation_id, problem.text, info)

    @Slot(str, str)
    def count_tokens(self, conversation_id: str, text: str) -> None:
        """How many tokens the prompt box's text is (the tab shows it under the box)."""
        counted = self.local.count_tokens(conversation_id, text)
        if counted is not None:
            n_tokens, limit = counted
            if self._remote.answers(conversation_id):  # a server's limit is its own: none shown
                limit = 0
            self.tokens_counted.emit(conversation_id, text, n_tokens, limit)

    @Slot(str)
    def cancel(self, conversation_id: str) -> None:
        handle = self._replies.handles.get(conversation_id)
        if handle is not None:
            handle.cancel()
            self._flush()  # a reply waiting for its model's load ended here: no step would send it
            self._schedule()

    @Slot(str)
    def remove_session(self, conversation_id: str) -> None:
        """A closed tab: stop its request and forget it and its KV entry (at once, or when it ends).

        The request's later events are dropped: the tab may be reopened and send a new message before
        the engine has reaped the old request, and the old reply must not land in the new one.
        """
        handle = self._replies.drop(conversation_id)
        self._remote.forget(conversation_id)
        self._loading_for.pop(conversation_id, None)
        if handle is not None:
            handle.cancel()
            self._schedule()
        self.local.remove_session(conversation_id)  # reopened: warm
        if self.local.engine is not None:
            self._emit_stats()

    @Slot(list)
    def prefetch_sessions(self, conversation_ids: list) -> None:
        """Tabs were opened (at start, or reopened): their K/V files start coming into memory."""
        self.local.prefetch(conversation_ids)

    @Slot(str)
    def forget_session(self, conversation_id: str) -> None:
        """A deleted conversation: its KV session goes from memory and from the disk tier."""
        self.remove_session(conversation_id)
        self.local.forget(conversation_id)

    @Slot()
    def clear_disk_cache(self) -> None:
        """Settings → Clear: delete every KV session file (the sessions in memory stay)."""
        if self.local.clear_disk():
            self._emit_stats()

    @Slot(dict, dict, dict)
    def apply_settings(self, kv: dict, batching: dict, models: dict) -> None:
        """New KV cache, batching and loaded-models options (``models``: max_loaded_bytes, idle_ttl_s;
        empty: unchanged), live; shrinking the byte budget evicts at once, a smaller memory limit for
        models unloads idle ones at once."""
        try:
            applied = self.local.apply(kv, batching, models or None)
        except ValueError as exc:
            self.settings_rejected.emit(str(exc))
            return
        if self.local.engine is not None:
            self._emit_stats()
            self._schedule()
        self.settings_applied.emit(applied)

    # -- stepping -------------------------------------------------------------------------------
    def _schedule(self) -> None:
        """Step now (zero-interval timer), after the batch wait (single shot), or not at all (idle)."""
        if self._step_timer is None or self._wait_timer is None:
            return
        pool = self.local.pool
        wait = pool.seconds_until_ready() if pool is not None else None
        if wait is None:
            self._step_timer.stop()
            self._wait_timer.stop()
        elif wait > 0:
            self._step_timer.stop()
            if not self._wait_timer.isActive():
                self._wait_timer.start(max(1, math.ceil(wait * 1000)))
        else:
            self._wait_timer.stop()
            if not self._step_timer.isActive():
                self._step_timer.start()

    @Slot()
    def _run_step(self) -> None:
        pool = self.local.pool
        if pool is None:
            self._schedule()
            return
        try:
            worked = pool.step()
        except Exception:  # the engine fails requests itself; this is a bug: log it, keep serving
            log.exception("engine step failed")
            worked = False
        self._flush(force=not pool.has_work)
        if not pool.has_work:  # models went idle: their time-to-live starts
            self._check_models()
        if not worked and pool.has_work and self._step_timer is not None and self._wait_timer is not None:
            self._step_timer.stop()  # nothing ran: never spin, look again in a moment
            wait = pool.seconds_until_ready() or 0.0
            self._wait_timer.start(max(1, math.ceil(wait * 1000)))
            return
        self._schedule()

    def _flush(self, force: bool = False) -> None:
        """Send what the last steps produced: progress, joined text, then the results."""
        signals = self._replies.flush(self._finished_reply, force)
        for name, args in signals:
            getattr(self, name).emit(*args)
        if any(name == "request_finished" for name, _ in signals):
            self._emit_stats()  # the dock shows the session unpinned at once

    # -- stats ----------------------------------------------------------------------------------
    @Slot()
    def _emit_stats(self) -> None:
        if self._remote:
            self.remote_stats_updated.emit(self._remote.stats())
        stats = self.local.stats(set(self._replies.handles))
        if stats is not None:
            if (api := self._api.stats()) is not None:  # the in-app API server: plain values for the dock
                stats["api"] = api
            self.stats_updated.emit(stats)

    # -- models and downloads (``downloads``) -----------------------------------------------------
    @Slot(list)
    def list_models(self, known_paths: list) -> None:
        """Emit ``models_listed``: the catalog, then the other GGUF files (`known_paths`, those loaded
        since the start, the models directory's)."""
        loaded = self.local.loaded_path()
        self.models_listed.emit(list_models([*known_paths, *self.local.opened_paths], loaded))

    @Slot(str, bool)
    def start_download(self, key: str = "", accept_license: bool = False) -> None:
        """Fetch catalog model `key` ("" = the default) on a plain Python thread (``ModelDownloads``)."""
        self._downloads.start(key, accept_license)

    @Slot()
    def cancel_download(self) -> None:
        self._downloads.cancel()
