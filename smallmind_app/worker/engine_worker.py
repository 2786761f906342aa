"""The engine worker: the app's one bridge to the engine (with the Qt-free modules beside it).

``EngineWorker`` is a QObject moved to one long-lived QThread (see ``client.py``). The GUI calls its
slots through queued signals; it answers with signals that carry plain values (str, int, float,
dict, list); every signal the window hears is declared here. It keeps the requests and their
replies: submit, continue, cancel, the sessions, the settings, the stats. Engine events arrive inside
``ModelPool.step()`` (one step of one model's engine) on this thread and leave as signals through
``replies.Replies``.

Its parts, child QObjects on its thread: ``step_loop.StepLoop`` (when a step runs: at once while a
model has work, so queued calls are handled between two steps; never while all are idle),
``model_loading.ModelLoading`` (which engine answers a conversation; models load on the pool's own
thread, idle ones unload) and ``tools.WorkerTools`` (the in-app API server, downloads, the model
list, an endpoint's test). Beside it, without Qt: the loaded models' engines (``local_engine``),
remote engines (``remote_requests``), ``downloads``, ``api_server``, the settings' checks
(``engine_options``).
"""

from __future__ import annotations

import logging
import threading
from functools import partial
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, Qt, QTimer, Signal, Slot

from engine import GenerationEvent, GenerationResult

from .. import wording
from ..wording import Problem
from . import replies
from .local_engine import LocalEngine
from .model_loading import ModelLoading
from .remote_requests import RemoteRequests
from .replies import Replies
from .step_loop import StepLoop
from .tools import WorkerTools

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
    request_queued = Signal(str, int, int)  # conversation id, replies running, how many may: no place yet
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
        self.local = LocalEngine()  # the loaded models' engines and their options
        self.remote = RemoteRequests()  # the servers of Settings → Engines, and who they answer
        self._replies = Replies()
        self.steps = StepLoop(self.local, self)  # when pool.step() runs
        self.models = ModelLoading(self, self._work_arrived.emit)  # loads, routes, unloads the models
        self.tools = WorkerTools(self)  # the API server, downloads, the model list, endpoint tests
        self._stats_timer: QTimer | None = None
        self._remote_flush: QTimer | None = None
        self._said_queued: set[str] = set()  # conversations told that they wait for a batch slot
        self._thread_ident = 0  # the worker thread's (set in initialize)

    @property
    def pull_model(self) -> Any:
        """What fetches a catalog model (``download.pull_model``); tests swap in a fake (no network)."""
        return self.tools.downloads.pull_model

    @pull_model.setter
    def pull_model(self, pull: Any) -> None:
        self.tools.downloads.pull_model = pull

    @property
    def stepping(self) -> bool:
        """Whether a step is due (now, or after the batch wait): False while the engine is idle."""
        return self.steps.stepping

    # -- lifecycle ------------------------------------------------------------------------------
    @Slot()
    def initialize(self) -> None:
        """Connected to ``QThread.started``: timers are made here so they belong to this thread."""
        threading.current_thread().name = "smallmind-engine"  # for the log file
        self.steps.initialize()
        self.steps.stepped.connect(self._on_steps_stepped)
        self._stats_timer = QTimer(self, interval=STATS_INTERVAL_MS)
        self._stats_timer.timeout.connect(self._emit_stats)
        self._work_arrived.connect(self._on_work_arrived, Qt.ConnectionType.QueuedConnection)
        self._remote_event.connect(self._on_remote_event, Qt.ConnectionType.QueuedConnection)
        self._local_event.connect(self._on_local_event, Qt.ConnectionType.QueuedConnection)
        self._thread_ident = threading.get_ident()
        self.models.initialize()  # its timer: an idle model's time-to-live
        self.models.default_loaded.connect(self._on_models_default_loaded)
        self._remote_flush = QTimer(self, interval=round(replies.TEXT_FLUSH_S * 1000))
        self._remote_flush.setSingleShot(True)
        self._remote_flush.timeout.connect(self._flush)

    @Slot()
    def shutdown(self) -> None:
        """Stop everything (running requests fail with a clear message), then end the thread."""
        self.tools.api.stop()
        self.steps.stop()
        if self._stats_timer is not None:
            self._stats_timer.stop()
        self.models.stop()
        self.tools.downloads.stop()
        if self.local.pool is not None:
            self.local.stop()
            self._flush(force=True)
            self.local.close()  # idle sessions to disk: warm after a restart
        self.remote.stop()
        self._replies.clear()
        thread = self.thread()
        app = QCoreApplication.instance()
        if app is not None:
            self.moveToThread(app.thread())  # so that the GUI thread may delete it after the join
        self.shut_down.emit()
        thread.quit()

    # -- the parts' news ---------------------------------------------------------------------------
    @Slot()
    def _on_work_arrived(self) -> None:
        """A submit from another thread (the API server's), or a model's load ended: step."""
        self.models.check()
        self.steps.schedule()

    @Slot()
    def _on_steps_stepped(self) -> None:
        """Send what the step produced (all of it when the models went idle)."""
        pool = self.local.pool  # a step ran: there is one
        self._flush(force=not pool.has_work)
        if not pool.has_work:  # models went idle: their time-to-live starts
            self.models.check()

    @Slot()
    def _on_models_default_loaded(self) -> None:
        self._emit_stats()
        if self._stats_timer is not None:
            self._stats_timer.start()

    # -- remote engines (``remote_requests``) ------------------------------------------------------
    @Slot(list)
    def set_endpoints(self, endpoints: list) -> None:
        """The remote engines of Settings → Engines: dicts of id, name, base_url, model, api_key."""
        self.remote.set_endpoints(endpoints)
        if self.remote and self._stats_timer is not None and not self._stats_timer.isActive():
            self._stats_timer.start()
        self._emit_stats()

    @Slot(str, object)
    def _on_remote_event(self, conversation_id: str, event: GenerationEvent) -> None:
        """A remote engine's event, now on this thread: buffered and sent on like the local ones."""
        if not self.remote.is_current(self._replies.handles.get(conversation_id), event):
            return  # its tab was closed, or it was given up
        if event.result is not None:
            self.remote.record(conversation_id, event.result)
        self._replies.add_remote(conversation_id, event)
        self._flush(force=event.result is not None)
        if (
            self._replies.text_pending
            and self._remote_flush is not None
            and not self._remote_flush.isActive()
        ):
            self._remote_flush.start()  # text held back by the flush interval goes out shortly

    # -- requests -------------------------------------------------------------------------------
    @Slot(str, list, dict)
    def submit(self, conversation_id: str, messages: list, sampling: dict) -> None:
        """Queue a reply for the conversation (its KV session id is the conversation id)."""
        self._submit(conversation_id, messages, sampling, continuing=False)

    @Slot(str, list, dict)
    def continue_reply(self, conversation_id: str, messages: list, sampling: dict) -> None:
        """Go on with the conversation's last reply (the last of ``messages``, cut by its token limit
        or stopped) from where it stopped; its K/V are reused, so the prompt is not computed again."""
        if self.remote.answers(conversation_id):
            self._refuse(conversation_id, Problem(wording.CONTINUE_LOCAL_ONLY))
            return
        self._submit(conversation_id, messages, sampling, continuing=True)

    def _submit(self, conversation_id: str, messages: list, sampling: dict, continuing: bool) -> None:
        if conversation_id in self._replies:
            self._refuse(conversation_id, Problem(wording.ALREADY_GENERATING))
            return
        loading = False
        if self.remote.answers(conversation_id):  # a remote engine's events hop to this thread first
            on_event = partial(self._remote_event.emit, conversation_id)
            started = self.remote.submit(conversation_id, messages, sampling, on_event)
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
        self.steps.schedule()

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
        author = self.remote.author(conversation_id)
        remote = self.remote.finished(conversation_id)
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
            if self.remote.answers(conversation_id):  # a server's limit is its own: none shown
                limit = 0
            self.tokens_counted.emit(conversation_id, text, n_tokens, limit)

    @Slot(str)
    def cancel(self, conversation_id: str) -> None:
        handle = self._replies.handles.get(conversation_id)
        if handle is not None:
            handle.cancel()
            self._flush()  # a reply waiting for its model's load ended here: no step would send it
            self.steps.schedule()

    @Slot(str)
    def remove_session(self, conversation_id: str) -> None:
        """A closed tab: stop its request and forget it and its KV entry (at once, or when it ends).

        The request's later events are dropped: the tab may be reopened and send a new message before
        the engine has reaped the old request, and the old reply must not land in the new one.
        """
        handle = self._replies.drop(conversation_id)
        self.remote.forget(conversation_id)
        self.models.forget(conversation_id)
        if handle is not None:
            handle.cancel()
            self.steps.schedule()
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
            self.steps.schedule()
        self.settings_applied.emit(applied)

    # -- sending the replies -----------------------------------------------------------------------
    def _flush(self, force: bool = False) -> None:
        """Send what the last steps produced: progress, joined text, then the results."""
        signals = self._replies.flush(self._finished_reply, force)
        for name, args in signals:
            getattr(self, name).emit(*args)
        if any(name == "request_finished" for name, _ in signals):
            self._emit_stats()  # the dock shows the session unpinned at once

    # -- stats ----------------------------------------------------------------------------------
    def _say_queued(self) -> None:
        """Tell a tab whose reply is still queued because every place in the batch is taken."""
        queued = [cid for cid in self._replies.queued() if not self.remote.answers(cid)]
        self._said_queued &= set(queued)
        for conversation_id in queued:
            running, limit = self.local.batch_state(conversation_id)  # its model's batch
            if running < limit:
                continue  # it starts at the next step (or waits for memory or its model's load)
            if conversation_id not in self._said_queued:
                self._said_queued.add(conversation_id)
                self.request_queued.emit(conversation_id, running, limit)

    @Slot()
    def _emit_stats(self) -> None:
        self._say_queued()
        if self.remote:
            self.remote_stats_updated.emit(self.remote.stats())
        stats = self.local.stats(set(self._replies.handles))
        if stats is not None:
            if (api := self.tools.api.stats()) is not None:  # the in-app API server, for the dock
                stats["api"] = api
            self.stats_updated.emit(stats)
