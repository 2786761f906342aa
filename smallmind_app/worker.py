"""The engine worker: the only module of the app that imports ``engine``.

``EngineWorker`` is a QObject moved to one long-lived QThread (see ``engine_client.py``). The GUI
calls its slots through queued signals; it answers with signals that carry plain values (str, int,
float, dict, list). It drives ``BatchedInferenceEngine.step()`` from a zero-interval QTimer that
runs while the engine has work and stops when it is idle, so queued submit/cancel/settings calls
are handled between two steps. Engine events arrive inside ``step()`` on this thread; they are
buffered and sent on as one signal per conversation (text pieces joined), at most every
``TEXT_FLUSH_S`` seconds, and at once when a request ends.

The plain functions ``engine_options``, ``validate_settings`` and ``session_limits`` are what the
settings and their dialog need from the engine's option classes, so they never import engine types.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from PySide6.QtCore import QCoreApplication, QObject, Qt, QTimer, Signal, Slot

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    CacheBudgetError,
    ContextOverflowError,
    EngineError,
    GenerationEvent,
    GenerationResult,
    GgufFile,
    InferenceOptions,
    InMemoryRuntimeMetrics,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    ModelFileError,
    ModelNotFoundError,
    QueueFullError,
    SessionId,
    Tokenizer,
    download,
    kernels,
)
from engine.kv_cache import KV_DTYPES, Q8_BLOCK, ModelShape
from engine.kv_disk import DiskKvTier
from engine.remote import RemoteEngine, RemoteRequestHandle

from . import paths
from .endpoints import LOCAL_ENGINE
from .snapshots import result_dict, stats_dict
from .wording import Problem, engine_problem, too_long

log = logging.getLogger(__name__)

STATS_INTERVAL_MS = 250
TEXT_FLUSH_S = 0.03  # text of several steps is joined into one signal per conversation
DOWNLOAD_PROGRESS_S = 0.1  # at most 10 progress signals a second
DOWNLOAD_JOIN_S = 8.0  # pull_model stops pip within 5 s of a cancel
ENDPOINT_TEST_TIMEOUT_S = 10.0  # Settings → Engines → Test connection
DISK_CLOSE_S = 20.0  # at shutdown, the KV sessions' writes to disk may take this long (then given up)


class EngineWorker(QObject):
    """Owns the model and the batched engine; lives on the worker thread. See the module docstring."""

    model_loading = Signal(str, str)  # path, what the load does besides reading it ("" or a note)
    model_loaded = Signal(dict)  # model_info(): name, path, n_layers, context_length, bytes_per_token...
    model_load_failed = Signal(str, str)  # path, reason
    model_missing = Signal(str)  # no model given and the default one is not installed: the message
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
    remote_stats_updated = Signal(dict)  # endpoint id -> remote_stats() figures of its engine
    _remote_event = Signal(str, object)  # conversation id, GenerationEvent: from a remote engine's thread
    shut_down = Signal()

    def __init__(self) -> None:
        super().__init__()
        self._engine: BatchedInferenceEngine | None = None
        self._model_path = ""
        self._opened_paths: list[str] = []  # every model file loaded since the start, for list_models
        self._kv = KvCacheOptions()
        self._batching = BatchingOptions()
        self._handles: dict[str, Any] = {}  # conversation id -> RequestHandle
        self._events: list[tuple[str, GenerationEvent]] = []  # filled inside step()
        self._text: dict[str, list[str]] = {}  # pending text pieces per conversation
        self._n_generated: dict[str, int] = {}  # tokens generated so far by each conversation's reply
        self._max_new_tokens: dict[str, int] = {}  # each running reply's own max_new_tokens
        self._last_text_flush = 0.0
        self._server: Any = None  # smallmind_server.background.BackgroundServer while serving
        self._step_timer: QTimer | None = None
        self._wait_timer: QTimer | None = None
        self._stats_timer: QTimer | None = None
        self._download: threading.Thread | None = None
        self._download_cancel = threading.Event()
        self.pull_model: Callable[..., Path] = download.pull_model  # tests swap in a fake (no network)
        self._remotes: dict[str, RemoteEngine] = {}  # endpoint id -> its engine (see set_endpoints)
        self._endpoint_of: dict[str, str] = {}  # conversation id -> endpoint id ("local" when absent)
        self._remote_requests: dict[str, str] = {}  # conversation id -> endpoint id of its running reply
        self._remote_last: dict[str, dict[str, Any]] = {}  # endpoint id -> its last reply's figures
        self._remote_flush: QTimer | None = None
        self._remote_specs: dict[str, tuple[str, str, str, str]] = {}  # what each remote was made from

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
        self._remote_flush = QTimer(self, interval=round(TEXT_FLUSH_S * 1000))
        self._remote_flush.setSingleShot(True)
        self._remote_flush.timeout.connect(self._flush)

    # -- the in-app API server ----------------------------------------------------------------------
    @Slot(int, str)
    def start_server(self, port: int, api_key: str) -> None:
        """Serve this engine over the OpenAI-compatible API on 127.0.0.1:``port``; requests from other
        programs are batched with the tabs' (their submits wake this worker's step loop)."""
        from smallmind_server.background import BackgroundServer

        if self._engine is None:
            self.server_stopped.emit("no model is loaded")
            return
        if self._server is not None:
            self.stop_server()
        server = BackgroundServer(self._engine, Path(self._model_path or "model").stem)
        try:
            url = server.start(port=port, api_key=api_key or None)
        except (OSError, ValueError, RuntimeError) as exc:
            log.warning("the API server did not start on port %d: %s", port, exc)
            self.server_stopped.emit(f"could not start on port {port}: {exc}")
            return
        self._server = server
        log.info("API server at %s", url)
        self.server_started.emit(url)

    @Slot()
    def stop_server(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        self.server_stopped.emit("")

    @Slot()
    def _on_work_arrived(self) -> None:
        self._schedule()

    # -- remote engines -------------------------------------------------------------------------
    @Slot(list)
    def set_endpoints(self, endpoints: list) -> None:
        """The remote engines of Settings → Engines: dicts of id, name, base_url, model, api_key. An
        endpoint that changed or went is stopped (its replies in flight end with an error)."""
        wanted = {str(e["id"]): (str(e["base_url"]), str(e.get("model") or ""), str(e.get("api_key") or ""),
                                 str(e.get("name") or "")) for e in endpoints}  # fmt: skip
        for endpoint_id, remote in list(self._remotes.items()):
            if wanted.get(endpoint_id) != self._remote_specs.get(endpoint_id):
                remote.stop()
                del self._remotes[endpoint_id]
                self._remote_specs.pop(endpoint_id, None)
        for endpoint_id, spec in wanted.items():
            if endpoint_id in self._remotes:
                continue
            base_url, model, api_key, name = spec
            try:
                self._remotes[endpoint_id] = RemoteEngine(base_url, model or None, api_key or None, name=name)
            except ValueError as exc:
                log.warning("endpoint %s is not usable: %s", name, exc)
                continue
            self._remote_specs[endpoint_id] = spec
        if self._remotes and self._stats_timer is not None and not self._stats_timer.isActive():
            self._stats_timer.start()
        self._emit_stats()

    @Slot(str, str)
    def set_conversation_engine(self, conversation_id: str, engine_id: str) -> None:
        """Route the conversation's next replies to ``engine_id`` ("local" or an endpoint id)."""
        if engine_id == LOCAL_ENGINE:
            self._endpoint_of.pop(conversation_id, None)
        else:
            self._endpoint_of[conversation_id] = engine_id

    @Slot(str, str)
    def test_endpoint(self, base_url: str, api_key: str) -> None:
        """List a server's models on a short-lived thread (never blocking this one): ``endpoint_tested``."""

        def work() -> None:
            try:
                remote = RemoteEngine(base_url, api_key=api_key or None, timeout_s=ENDPOINT_TEST_TIMEOUT_S)
                models = remote.list_models()
            except (EngineError, ValueError) as exc:
                self.endpoint_tested.emit(base_url, [], str(exc))
                return
            except Exception as exc:  # report anything: the dialog waits for an answer
                log.exception("testing %s failed", base_url)
                self.endpoint_tested.emit(base_url, [], f"{type(exc).__name__}: {exc}")
                return
            self.endpoint_tested.emit(base_url, models, "")

        threading.Thread(target=work, name="smallmind-endpoint-test", daemon=True).start()

    def _submit_remote(self, conversation_id: str, messages: list, sampling: dict) -> None:
        """Send the reply to the tab's server; its events come back through ``_on_remote_event``."""
        endpoint_id = self._endpoint_of[conversation_id]
        remote = self._remotes.get(endpoint_id)
        if remote is None:
            self._refuse(conversation_id, Problem("This tab's server is not in Settings → Engines any more; "
                                                  "pick another engine at the top of the tab."))  # fmt: skip
            return
        try:
            options = InferenceOptions.from_dict(sampling)
            handle = remote.submit(messages, options, session_id=conversation_id,
                                   on_event=partial(self._remote_event.emit, conversation_id))  # fmt: skip
        except (EngineError, ValueError) as exc:
            log.info("request of %s refused: %s", conversation_id, exc)
            self._refuse(conversation_id, Problem(f"Not sent: {exc}"))
            return
        self._handles[conversation_id] = handle
        self._n_generated[conversation_id] = 0
        self._max_new_tokens[conversation_id] = options.max_new_tokens
        self._remote_requests[conversation_id] = endpoint_id

    @Slot(str, object)
    def _on_remote_event(self, conversation_id: str, event: GenerationEvent) -> None:
        """A remote engine's event, now on this thread: buffered and sent on like the local ones."""
        handle = self._handles.get(conversation_id)
        if (
            handle is None
            or not isinstance(handle, RemoteRequestHandle)
            or handle.request_id != event.request_id
        ):
            return  # its tab was closed, or it was given up
        if event.kind == "token":  # a chunk of text: one token on most servers (the result has the count)
            self._n_generated[conversation_id] = self._n_generated.get(conversation_id, 0) + 1
        result = event.result
        if result is not None and (endpoint_id := self._remote_requests.get(conversation_id)):
            self._remote_last[endpoint_id] = {
                "last_ttft_ms": result.ttft_ms, "last_tokens_per_s": result.decode_tokens_per_s,
                "last_tokens": result.generated_tokens, "last_finish_reason": result.finish_reason,
            }  # fmt: skip
        self._events.append((conversation_id, event))
        self._flush(force=event.result is not None)
        if self._text and self._remote_flush is not None and not self._remote_flush.isActive():
            self._remote_flush.start()  # text held back by the flush interval goes out shortly

    def remote_stats(self) -> dict[str, dict[str, Any]]:
        """Each remote engine's figures for the stats dock: its own tokens/s and TTFT."""
        out: dict[str, dict[str, Any]] = {}
        for endpoint_id, remote in self._remotes.items():
            m = remote.metrics.snapshot()
            out[endpoint_id] = {
                "name": remote.name, "model": remote.model or "", "url": remote.api_url,
                "tokens_per_second": m.tokens_per_second, "ttft_p50_ms": m.ttft_p50_ms,
                "in_flight": m.in_flight, "completed": m.completed, "failed": m.failed + m.timed_out,
                **self._remote_last.get(endpoint_id, {}),
            }  # fmt: skip
        return out

    @Slot()
    def shutdown(self) -> None:
        """Stop everything (running requests fail with a clear message), then end the thread."""
        if self._server is not None:
            self._server.stop()
            self._server = None
        for timer in (self._step_timer, self._wait_timer, self._stats_timer):
            if timer is not None:
                timer.stop()
        self.cancel_download()
        if self._download is not None:
            self._download.join(DOWNLOAD_JOIN_S)
        if self._engine is not None:
            self._engine.stop()
            self._flush(force=True)
            self._engine.store.close(DISK_CLOSE_S)  # idle sessions to disk: warm after a restart
            self._engine = None
        for remote in self._remotes.values():
            remote.stop()
        self._remotes.clear()
        self._handles.clear()
        thread = self.thread()
        app = QCoreApplication.instance()
        if app is not None:
            self.moveToThread(app.thread())  # so that the GUI thread may delete it after the join
        self.shut_down.emit()
        thread.quit()

    # -- model ----------------------------------------------------------------------------------
    @Slot(str)
    def load_model(self, path: str) -> None:
        """Load ``path`` ("" = $SMALLMIND_MODEL, else the installed default model) and start serving."""
        try:
            resolved = download.resolve_model_path(path or None)
        except ModelNotFoundError as exc:
            if path:
                self.model_load_failed.emit(path, "the file does not exist")
            else:
                self.model_missing.emit(str(exc))
            return
        except ModelFileError as exc:
            self.model_load_failed.emit(exc.path, exc.reason)
            return
        compiling = kernels.backend() == "numba" and not kernels.compiled_on_disk()
        note = "compiling the kernels for this computer, once" if compiling else ""
        self.model_loading.emit(str(resolved), note)
        try:
            gguf = GgufFile(resolved)
            model = Model.from_gguf(gguf)
            tokenizer = Tokenizer.from_gguf(gguf)
        except ModelFileError as exc:
            log.warning("cannot load %s: %s", resolved, exc.reason)
            self.model_load_failed.emit(str(resolved), exc.reason)
            return
        except Exception as exc:  # an unreadable file may fail in many ways; report it, keep serving
            log.exception("cannot load %s", resolved)
            self.model_load_failed.emit(str(resolved), f"{type(exc).__name__}: {exc}")
            return
        self._replace_engine(model, tokenizer, str(resolved))

    def _replace_engine(self, model: Model, tokenizer: Tokenizer, path: str) -> None:
        if self._engine is not None:
            self._engine.stop()  # requests of the old model fail with "the engine was stopped..."
            self._flush(force=True)
            self._handles.clear()
            self._engine.store.close(DISK_CLOSE_S)  # its sessions to disk, for when it is loaded again
        store = LruKvCacheStore(with_disk_dir(self._kv))
        server = self._server
        if server is not None:  # the API server serves the engine it was started on: stop it first
            self.stop_server()
        self._engine = BatchedInferenceEngine(
            model, tokenizer, self._batching, store, InMemoryRuntimeMetrics()
        )
        self._engine.add_wakeup_listener(self._work_arrived.emit)  # queued: steps on this thread
        self._model_path = path
        if path not in self._opened_paths:
            self._opened_paths.append(path)
        self.model_loaded.emit(self.model_info())
        self._emit_stats()
        if self._stats_timer is not None:
            self._stats_timer.start()

    def model_info(self) -> dict[str, Any]:
        assert self._engine is not None
        c = self._engine.model.config
        return {
            "name": c.name,
            "path": self._model_path,
            "file_name": Path(self._model_path).name,
            "architecture": c.architecture,
            "n_layers": c.n_layers,
            "n_heads": c.n_heads,
            "n_kv_heads": c.n_kv_heads,
            "head_dim": c.head_dim,
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "context_length": c.context_length,
            "bytes_per_token": self._engine.model.kv_shape(self._kv.dtype).bytes_per_token,
            "session_token_limit": self._engine.session_token_limit(),
            # no chat template in the file: a base model, which continues text (the window says so)
            "base_model": not self._engine.tokenizer.has_own_template,
        }

    # -- requests -------------------------------------------------------------------------------
    @Slot(str, list, dict)
    def submit(self, conversation_id: str, messages: list, sampling: dict) -> None:
        """Queue a reply for the conversation (its KV session id is the conversation id)."""
        if conversation_id in self._handles:
            self._refuse(conversation_id, Problem("A reply is already being generated here."))
            return
        if self._endpoint_of.get(conversation_id, LOCAL_ENGINE) != LOCAL_ENGINE:
            self._submit_remote(conversation_id, messages, sampling)
            return
        if self._engine is None:
            self._refuse(conversation_id, Problem("No model is loaded; open Settings to choose one."))
            return
        try:
            options = InferenceOptions.from_dict(sampling)
        except ValueError as exc:
            self._refuse(conversation_id, Problem(f"Invalid sampling settings: {exc}"))
            return
        try:
            handle = self._engine.submit(
                messages,
                options,
                session_id=SessionId(conversation_id),
                on_event=partial(self._on_engine_event, conversation_id),
            )
        except ContextOverflowError as exc:
            log.info("request of %s refused: %s", conversation_id, exc)
            self._refuse(conversation_id, self._too_long(exc, options.max_new_tokens))
            return
        except (EngineError, ValueError) as exc:
            log.info("request of %s refused: %s", conversation_id, exc)
            problem = engine_problem(str(exc))
            if isinstance(exc, CacheBudgetError):
                problem = dataclasses.replace(problem, text=f"Not sent: {problem.text}")
            else:
                problem = dataclasses.replace(problem, text=engine_problem(submit_error_message(exc)).text)
            self._refuse(conversation_id, problem)
            return
        self._handles[conversation_id] = handle
        self._n_generated[conversation_id] = 0
        self._max_new_tokens[conversation_id] = options.max_new_tokens
        self._schedule()

    def _limit_setting(self) -> str:
        """The option that sets a tab's token limit now ("" when it is the model's context)."""
        assert self._engine is not None
        limit, kv = self._engine.session_token_limit(), self._kv
        if not kv.enabled or limit >= self._engine.model.config.context_length:
            return ""
        if limit == kv.max_tokens_per_session:
            return "kv_cache.max_tokens_per_session"
        return "kv_cache.max_bytes_per_session"

    def _limits_of(self, conversation_id: str, result: GenerationResult) -> dict[str, Any]:
        """Which limit cut or trimmed a reply: its max new tokens, or the tab's limit (and its setting)."""
        max_new_tokens = self._max_new_tokens.pop(conversation_id, 0)
        limits: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if self._engine is None or self._remote_requests.pop(conversation_id, None) is not None:
            return limits  # a remote reply: the local tab limits say nothing about it
        if result.finish_reason == "length":
            full = result.generated_tokens < max_new_tokens
            limits["stopped_by"] = "session" if full else "max_new_tokens"
        if limits.get("stopped_by") == "session" or result.context_trimmed:
            limits["session_limit"] = self._engine.session_token_limit()
            limits["limit_setting"] = self._limit_setting()
        return limits

    def _refuse(self, conversation_id: str, problem: Problem) -> None:
        info = {"setting": problem.setting, "suggested": problem.suggested}
        self.request_failed.emit(conversation_id, problem.text, info)

    def _too_long(self, exc: ContextOverflowError, max_new_tokens: int) -> Problem:
        """A message over the tab's limit: which setting set that limit, and a value that fits it."""
        assert self._engine is not None
        context = self._engine.model.config.context_length
        per_token = self._engine.model.kv_shape(self._kv.dtype).bytes_per_token
        needed = exc.n_tokens + min(max_new_tokens, 1024)  # the message and room for a reply
        if not self._kv.enabled or exc.limit >= context or needed > context:
            return too_long(exc.n_tokens, exc.limit, context, "", None)
        if exc.limit == self._kv.max_tokens_per_session:
            suggested = min(context, -(-needed // 1024) * 1024)
            return too_long(exc.n_tokens, exc.limit, context, "kv_cache.max_tokens_per_session", suggested)
        mib = 1 << 20
        suggested = min(self._kv.max_bytes_total, -(-needed * per_token // mib) * mib)
        ok = suggested >= needed * per_token
        return too_long(
            exc.n_tokens, exc.limit, context, "kv_cache.max_bytes_per_session", suggested if ok else None
        )

    @Slot(str, str)
    def count_tokens(self, conversation_id: str, text: str) -> None:
        """How many tokens the prompt box's text is (the tab shows it under the box)."""
        if self._engine is not None:
            n_tokens = len(self._engine.tokenizer.encode(text))
            remote = conversation_id in self._endpoint_of  # a server's limit is its own: no local one shown
            limit = 0 if remote else self._engine.session_token_limit()
            self.tokens_counted.emit(conversation_id, text, n_tokens, limit)

    @Slot(str)
    def cancel(self, conversation_id: str) -> None:
        handle = self._handles.get(conversation_id)
        if handle is not None:
            handle.cancel()
            self._schedule()

    @Slot(str)
    def remove_session(self, conversation_id: str) -> None:
        """A closed tab: stop its request and forget it and its KV entry (at once, or when it ends).

        The request's later events are dropped: the tab may be reopened and send a new message before
        the engine has reaped the old request, and the old reply must not land in the new one.
        """
        handle = self._handles.pop(conversation_id, None)
        self._text.pop(conversation_id, None)
        self._endpoint_of.pop(conversation_id, None)
        self._remote_requests.pop(conversation_id, None)
        if handle is not None:
            handle.cancel()
            self._schedule()
        if self._engine is not None:
            self._engine.store.remove(SessionId(conversation_id), to_disk=True)  # reopened: warm
            self._emit_stats()

    @Slot(list)
    def prefetch_sessions(self, conversation_ids: list) -> None:
        """Tabs were opened (at start, or reopened): their K/V files start coming into memory."""
        if self._engine is not None:
            for conversation_id in conversation_ids:
                self._engine.store.prefetch(SessionId(conversation_id))

    @Slot(str)
    def forget_session(self, conversation_id: str) -> None:
        """A deleted conversation: its KV session goes from memory and from the disk tier."""
        self.remove_session(conversation_id)
        if self._engine is not None:
            self._engine.store.forget(SessionId(conversation_id))

    @Slot()
    def clear_disk_cache(self) -> None:
        """Settings → Clear: delete every KV session file (the sessions in memory stay)."""
        if self._engine is not None and self._engine.store.get_stats().disk_enabled:
            self._engine.store.clear_disk()
            self._engine.store.flush_disk()
            self._emit_stats()
            return
        options = with_disk_dir(self._kv)  # no model, or the tier is off: clear its folder all the same
        tier = DiskKvTier(options.disk_dir or str(paths.kv_disk_dir()), options.max_disk_bytes)
        tier.clear()
        tier.close()

    @Slot(dict, dict)
    def apply_settings(self, kv: dict, batching: dict) -> None:
        """New KV cache and batching options, live; shrinking the byte budget evicts at once."""
        try:
            kv_options = KvCacheOptions.from_dict(dict(kv))
            batching_options = BatchingOptions.from_dict(dict(batching))
        except ValueError as exc:
            self.settings_rejected.emit(str(exc))
            return
        self._kv, self._batching = kv_options, batching_options
        applied: dict[str, Any] = {"kv_cache": kv_options.to_dict(), "batching": batching_options.to_dict()}
        if self._engine is not None:
            self._engine.update_options(batching=batching_options, cache=with_disk_dir(kv_options))
            applied["session_token_limit"] = self._engine.session_token_limit()
            applied["limit_setting"] = self._limit_setting()
            applied["bytes_per_token"] = self._engine.model.kv_shape(kv_options.dtype).bytes_per_token
            self._emit_stats()
            self._schedule()
        self.settings_applied.emit(applied)

    # -- stepping -------------------------------------------------------------------------------
    def _on_engine_event(self, conversation_id: str, event: GenerationEvent) -> None:
        """Inside step(): buffer the event, unless its request was given up (its tab was closed)."""
        handle = self._handles.get(conversation_id)
        if handle is not None and handle.request_id == event.request_id:
            self._events.append((conversation_id, event))

    def _schedule(self) -> None:
        """Step now (zero-interval timer), after the batch wait (single shot), or not at all (idle)."""
        if self._step_timer is None or self._wait_timer is None:
            return
        wait = self._engine.seconds_until_ready() if self._engine is not None else None
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
        engine = self._engine
        if engine is None:
            self._schedule()
            return
        try:
            worked = engine.step()
        except Exception:  # the engine fails requests itself; this is a bug: log it, keep serving
            log.exception("engine step failed")
            worked = False
        self._flush(force=not engine.has_work)
        if not worked and engine.has_work and self._step_timer is not None and self._wait_timer is not None:
            self._step_timer.stop()  # nothing ran: never spin, look again in a moment
            wait = engine.seconds_until_ready() or 0.0
            self._wait_timer.start(max(1, math.ceil(wait * 1000)))
            return
        self._schedule()

    def _flush(self, force: bool = False) -> None:
        """Send what the last steps produced: progress, joined text, then the results."""
        events, self._events = self._events, []
        progress: dict[str, tuple[int, int]] = {}
        finished: list[tuple[str, GenerationResult]] = []
        waiting = self._waiting_after(events)
        for conversation_id, event in events:
            if event.kind == "prefill":
                progress[conversation_id] = (event.prompt_done, event.prompt_total)
            if event.text:
                self._text.setdefault(conversation_id, []).append(event.text)
            if event.kind != "prefill" and event.token_ids:
                self._n_generated[conversation_id] = self._n_generated.get(conversation_id, 0) + len(
                    event.token_ids
                )
            if event.result is not None:
                finished.append((conversation_id, event.result))
        for conversation_id, (done, total) in progress.items():
            if conversation_id not in waiting:
                self.prompt_progressed.emit(conversation_id, done, total)
        for conversation_id in waiting:  # its text so far first: text after "waiting" would hide it
            pieces = self._text.pop(conversation_id, None)
            if pieces:
                n_tokens = self._n_generated.get(conversation_id, 0)
                self.text_generated.emit(conversation_id, "".join(pieces), n_tokens)
            self.request_waiting.emit(conversation_id)
        now = time.perf_counter()
        if force or finished or now - self._last_text_flush >= TEXT_FLUSH_S:
            pending, self._text = self._text, {}
            for conversation_id, pieces in pending.items():
                n_tokens = self._n_generated.get(conversation_id, 0)
                self.text_generated.emit(conversation_id, "".join(pieces), n_tokens)
            self._last_text_flush = now
        for conversation_id, result in finished:
            self._handles.pop(conversation_id, None)
            self._n_generated.pop(conversation_id, None)
            data = result_dict(result) | self._limits_of(conversation_id, result)
            if data.get("error"):  # the precise message to the log, the user's words to the tab
                log.warning("reply of %s failed: %s", conversation_id, data["error"])
                problem = engine_problem(str(data["error"]))
                setting = problem.setting
                if setting == "kv_cache.max_tokens_per_session" and self._engine is not None:
                    setting = self._limit_setting()  # the option that sets the tab's limit now
                data.update(error=problem.text, error_detail=data["error"], error_setting=setting)
            self.request_finished.emit(conversation_id, data)
        if finished:
            self._emit_stats()  # the dock shows the session unpinned at once

    @staticmethod
    def _waiting_after(events: list[tuple[str, GenerationEvent]]) -> set[str]:
        """Conversations whose last event in this batch says they wait for KV memory."""
        last = {conversation_id: event.kind for conversation_id, event in events}
        return {conversation_id for conversation_id, kind in last.items() if kind == "waiting"}

    # -- stats ----------------------------------------------------------------------------------
    @Slot()
    def _emit_stats(self) -> None:
        if self._remotes:
            self.remote_stats_updated.emit(self.remote_stats())
        if self._engine is not None:
            stats = stats_dict(self._engine)
            for session in stats["sessions"]:  # a reply queued for it: it is not the next to be evicted
                session["waiting"] = not session["pinned"] and session["session_id"] in self._handles
            if self._server is not None:  # the in-app API server: plain values for the dock
                stats["api"] = {"url": self._server.url, "in_flight": self._server.requests_in_flight,
                                "served": self._server.requests_served}  # fmt: skip
            self.stats_updated.emit(stats)

    # -- models and downloads -------------------------------------------------------------------
    @Slot(list)
    def list_models(self, known_paths: list) -> None:
        """Emit ``models_listed``: the catalog, then the other GGUF files (`known_paths`, those loaded
        since the start, the models directory's)."""
        loaded = self._model_path if self._engine else ""
        self.models_listed.emit(list_models([*known_paths, *self._opened_paths], loaded))

    @Slot(str, bool)
    def start_download(self, key: str = "", accept_license: bool = False) -> None:
        """Fetch catalog model `key` ("" = the default) on a plain Python thread (the same code as
        `smallmind models pull KEY`). A license that must be accepted is remembered when
        `accept_license`; without it, and not accepted before, the download fails at once."""
        if self._download is not None and self._download.is_alive():
            return
        spec = download.CATALOG.get(key or download.DEFAULT_MODEL.key)
        if spec is None:
            self.download_failed.emit(f"no model {key!r} in the catalog")
            return
        try:
            if accept_license and not download.license_accepted(spec):
                download.accept_license(spec)
        except OSError as exc:
            self.download_failed.emit(f"could not remember the license acceptance: {exc}")
            return
        if not download.license_accepted(spec):
            self.download_failed.emit(f"the {spec.license} of {spec.name} has not been accepted")
            return
        self._download_cancel = threading.Event()
        self._download = threading.Thread(
            target=self._download_main,
            args=(spec, self._download_cancel),
            name="smallmind-download",
            daemon=True,
        )
        self._download.start()

    @Slot()
    def cancel_download(self) -> None:
        self._download_cancel.set()

    def _download_main(self, spec: download.ModelSpec, cancel: threading.Event) -> None:
        last = [0.0, ""]

        def progress(phase: str, done: int, total: int) -> None:
            now = time.monotonic()
            if phase != last[1] or now - float(last[0]) >= DOWNLOAD_PROGRESS_S or (total and done >= total):
                last[0], last[1] = now, phase
                self.download_progressed.emit(phase, int(done), int(total))

        pip_args = download.find_links_args(os.environ.get(download.FIND_LINKS_ENV, "").strip())
        try:
            path = self.pull_model(spec, progress=progress, cancel=cancel, pip_args=pip_args)
        except EngineError as exc:
            self.download_failed.emit(str(exc))
        except Exception as exc:  # report anything; the dialog must not hang on a lost error
            log.exception("model download failed")
            self.download_failed.emit(f"{type(exc).__name__}: {exc}")
        else:
            self.download_finished.emit(str(path))


def list_models(known_paths: list[str], loaded_path: str) -> list[dict[str, Any]]:
    """What the Models dialog lists, as plain dicts: each catalog model (installed = present with its
    size and SHA-256), then every other GGUF file in `known_paths`, the loaded one and the models dir.

    Keys: key ("" for a file), name, path, size_bytes, license, license_url, license_acceptance (it
    must be accepted before a download), license_accepted (it was, or need not be), installed, loaded.
    A catalog file is verified from its SHA-256 sidecar; one without a sidecar is hashed once here.
    """
    loaded = str(Path(loaded_path).resolve()) if loaded_path else ""
    rows: list[dict[str, Any]] = []
    for spec in download.CATALOG.values():
        path = download.default_model_path(spec)
        rows.append(
            {
                "key": spec.key, "name": spec.name, "path": str(path), "size_bytes": spec.size_bytes,
                "license": spec.license, "license_url": spec.license_url,
                "license_acceptance": spec.license_acceptance,
                "license_accepted": download.license_accepted(spec),
                "installed": download.verify_installed(spec),
            }
        )  # fmt: skip
    listed = {str(Path(row["path"]).resolve()) for row in rows}
    files = [Path(p) for p in (*known_paths, loaded_path) if p]
    files += [model.path for model in download.installed_models()]
    for path in files:
        resolved = str(path.resolve())
        if resolved in listed or not path.is_file():
            continue
        listed.add(resolved)
        rows.append(
            {
                "key": "", "name": path.stem, "path": str(path), "size_bytes": path.stat().st_size,
                "license": "", "license_url": "", "license_acceptance": False, "license_accepted": True,
                "installed": True,
            }
        )  # fmt: skip
    for row in rows:
        row["loaded"] = bool(loaded) and str(Path(row["path"]).resolve()) == loaded
    return rows


def with_disk_dir(options: KvCacheOptions) -> KvCacheOptions:
    """The options with the app's KV folder (in its cache dir) when the settings name none."""
    if options.disk_dir is not None:
        return options
    return dataclasses.replace(options, disk_dir=str(paths.kv_disk_dir()))


def submit_error_message(exc: Exception) -> str:
    """A sentence for the tab: what happened, the engine's numbers, what the user can do."""
    if isinstance(exc, QueueFullError):
        return f"Not sent: the engine is busy ({exc}). Press Regenerate to send it again in a moment."
    if isinstance(exc, ContextOverflowError):
        return f"Not sent: the conversation is too long for one KV session ({exc})."
    if isinstance(exc, CacheBudgetError):
        return f"Not sent: the KV cache budget is exhausted ({exc})."
    return f"Not sent: {exc}"


def default_model_description() -> dict[str, Any]:
    """What the first-run dialog offers to download."""
    spec = download.DEFAULT_MODEL
    return {"name": spec.name, "size_bytes": spec.size_bytes, "license": spec.license}


# -- what the settings and their dialog need ------------------------------------------------------
_SETTINGS_SECTIONS: dict[str, Any] = {
    "kv_cache": KvCacheOptions,
    "batching": BatchingOptions,
    "sampling": InferenceOptions,
}


def engine_options() -> dict[str, dict[str, tuple[Any, str]]]:
    """Each settings section's engine options: {section: {name: (default, type as annotated)}}.

    The types are the dataclass annotations as text ("int", "float", "int | None", ...).
    """
    return {
        section: {f.name: (getattr(cls(), f.name), str(f.type)) for f in dataclasses.fields(cls)}
        for section, cls in _SETTINGS_SECTIONS.items()
    }


# validate_settings's section names: the settings sections, "kv_cache" as "kv"
_OPTION_CLASSES: dict[str, Any] = {
    "kv" if section == "kv_cache" else section: cls for section, cls in _SETTINGS_SECTIONS.items()
}
_CLASS_PREFIX = re.compile(rf"^({'|'.join(cls.__name__ for cls in _OPTION_CLASSES.values())})\.")


def validate_settings(
    kv: Mapping[str, Any], batching: Mapping[str, Any], sampling: Mapping[str, Any]
) -> dict:
    """Every problem with these option values, as {"<section>.<field name>": message}; {} when valid.

    The engine's option classes are the judges; an invalid field is reset to its default and the
    rest checked again, so several problems are reported at once.
    """
    errors: dict[str, str] = {}
    for section, values in (("kv", kv), ("batching", batching), ("sampling", sampling)):
        cls = _OPTION_CLASSES[section]
        names = [f.name for f in dataclasses.fields(cls)]
        defaults = cls()
        current = {k: v for k, v in values.items() if k in names}
        for unknown in sorted(set(values) - set(names)):
            errors[f"{section}.{unknown}"] = f"unknown setting {unknown!r}"
        for _ in range(len(names) + 1):
            try:
                cls(**current)
                break
            except (ValueError, TypeError) as exc:
                message = _CLASS_PREFIX.sub("", str(exc))
                field = _field_named(message, names) or next(iter(current), names[0])
                errors[f"{section}.{field}"] = message
                current[field] = getattr(defaults, field)
    return errors


def _field_named(message: str, names: list[str]) -> str | None:
    """The field an engine message is about: the option name it mentions first."""
    found = [(m.start(), name) for name in names if (m := re.search(rf"\b{name}\b", message))]
    return min(found)[1] if found else None


def session_limits(kv: Mapping[str, Any], model_info: Mapping[str, Any]) -> tuple[int, int]:
    """(tokens one conversation may hold, KV bytes per token) for these KV options and this model."""
    dtype = str(kv.get("dtype", "float32"))
    head_dim = int(model_info["head_dim"])
    if dtype not in KV_DTYPES or (dtype == "q8_0" and head_dim % Q8_BLOCK):  # the engine says why
        dtype = "float32"
    shape = ModelShape(int(model_info["n_layers"]), int(model_info["n_kv_heads"]), head_dim, dtype)
    context = int(model_info["context_length"])
    if not kv.get("enabled", True):
        return context, shape.bytes_per_token
    by_tokens = int(kv.get("max_tokens_per_session", context))
    by_bytes = int(kv.get("max_bytes_per_session", 0)) // shape.bytes_per_token
    return max(0, min(by_tokens, by_bytes, context)), shape.bytes_per_token
