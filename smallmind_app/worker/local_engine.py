"""The local models as the worker drives them: a ``ModelPool`` with every GGUF file opened, the
default model (the status bar's; new tabs and tabs on "local" use it), which model answers each
tab, and the KV cache, batching and pool options they run with. No Qt: the worker calls these on its
thread and turns what they return into its signals.

Each tab's replies go to its model's engine in the pool (loaded on demand under the memory limit of
Settings → Engines → "Loaded models: memory limit"); every model shares one KV store, with a session
per (model, conversation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine import (
    BatchedInferenceEngine,
    BatchingOptions,
    EngineError,
    GenerationEvent,
    GenerationResult,
    GgufFile,
    InferenceOptions,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    ModelFileError,
    ModelNotFoundError,
    SessionId,
    Tokenizer,
    download,
    kernels,
)
from engine.batching import int8_activations_available
from engine.kv_disk import DiskKvTier
from engine.model_defaults import model_defaults
from engine.model_pool import ModelPool, ModelPoolOptions
from engine.prompting import Continuation

from .. import paths, wording
from ..wording import Problem
from .engine_options import with_disk_dir
from .limits import finished_reply, limit_setting, refusal
from .snapshots import model_info, pool_stats_dict

log = logging.getLogger(__name__)

DISK_CLOSE_S = 20.0  # at shutdown, the KV sessions' writes to disk may take this long (then given up)


class ModelLoadFailed(Exception):
    """A model that cannot be used: ``path``, ``reason``; ``missing`` when none was given and the
    default model is not installed (then ``reason`` is the engine's message, with its hints)."""

    def __init__(self, path: str, reason: str, missing: bool = False) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.missing = path, reason, missing


def resolve_model(path: str) -> str:
    """The file to load for ``path`` ("" = $SMALLMIND_MODEL, else the installed default model)."""
    try:
        return str(download.resolve_model_path(path or None))
    except ModelNotFoundError as exc:
        raise ModelLoadFailed(
            path, "the file does not exist" if path else str(exc), missing=not path
        ) from exc
    except ModelFileError as exc:
        raise ModelLoadFailed(exc.path, exc.reason) from exc


def compiling_note() -> str:
    """What loading does besides reading the file ("" or a note for the status bar)."""
    compiling = kernels.backend() == "numba" and not kernels.compiled_on_disk()
    return "compiling the kernels for this computer, once" if compiling else ""


def read_model(path: str) -> tuple[Model, Tokenizer]:
    """The pool's loader: a model and its tokenizer, or ModelLoadFailed in the user's words."""
    try:
        gguf = GgufFile(path)
        return Model.from_gguf(gguf), Tokenizer.from_gguf(gguf)
    except ModelFileError as exc:
        log.warning("cannot load %s: %s", path, exc.reason)
        raise ModelLoadFailed(str(path), exc.reason) from exc
    except Exception as exc:  # an unreadable file may fail in many ways; report it, keep serving
        log.exception("cannot load %s", path)
        raise ModelLoadFailed(str(path), f"{type(exc).__name__}: {exc}") from exc


class LocalEngine:
    """The pool of local models (``pool`` is None until the first model is opened); see the module
    docstring. ``engine`` is the default model's engine once it is loaded."""

    def __init__(self) -> None:
        self.pool: ModelPool | None = None
        self.default_id: str | None = None  # the default model's id in the pool
        self.opened_paths: list[str] = []  # every model file opened since the start, for list_models
        self.kv = KvCacheOptions()
        self.batching = BatchingOptions()
        self.pool_options = ModelPoolOptions()
        self._model_of: dict[str, str] = {}  # conversation id -> model id (absent: the default model)
        self._states: dict[str, str] = {}  # model id -> its state last reported (see ``changes``)
        self._defaults: dict[str, dict[str, Any]] = {}  # model path -> its own defaults (system prompt...)
        self._sent_limits: dict[str, tuple[int, str]] = {}  # conversation id -> the tab's limit at submit
        self._int8_available: bool | None = None  # the CPU's answer, asked once (kernels_info)

    # -- models ---------------------------------------------------------------------------------
    def open(self, path: str, wakeup: Callable[[], None]) -> str:
        """Make the model file available (loaded when first used, or by ``load``); its id."""
        if self.pool is None:
            store = LruKvCacheStore(with_disk_dir(self.kv))
            self.pool = ModelPool(None, self.pool_options, self.batching, store, loader=read_model)
            self.pool.add_wakeup_listener(wakeup)
        model_id = self.pool.add_model(path)
        if path not in self.opened_paths:
            self.opened_paths.append(path)
        return model_id

    def open_installed(self, wakeup: Callable[[], None]) -> None:
        """Every GGUF file of the models directory, available to the tabs' pickers (loaded when used)."""
        for model in download.installed_models():
            self.open(str(model.path), wakeup)

    def use_as_default(self, model_id: str) -> None:
        """The status bar's model, and the one of new tabs and tabs on "local"; loaded now."""
        assert self.pool is not None
        self.default_id = model_id
        self.pool.load(model_id)

    @property
    def engine(self) -> BatchedInferenceEngine | None:
        if self.pool is None or self.default_id is None:
            return None
        return self.pool.loaded_engine(self.default_id)

    @property
    def model_path(self) -> str:
        return str(self.pool.path_of(self.default_id)) if self.pool and self.default_id else ""

    def route(
        self, conversation_id: str, model_path: str | None, wakeup: Callable[[], None], load: bool = False
    ) -> str | None:
        """The conversation's replies go to ``model_path`` (None: the default model); the model's id
        (None: no model yet). ``load``: start loading it now, so its first reply does not wait."""
        if model_path is None:
            self._model_of.pop(conversation_id, None)
            model_id = self.default_id
        else:
            model_id = self._model_of[conversation_id] = self.open(model_path, wakeup)
        if load and model_id is not None and self.pool is not None:
            self.pool.load(model_id)
        return model_id

    def model_of(self, conversation_id: str) -> str | None:
        return self._model_of.get(conversation_id, self.default_id)

    def load_error(self, model_id: str) -> str | None:
        """Why the model's last load failed (None: it did not, or it is loading again)."""
        if self.pool is None:
            return None
        return next(
            (m.error for m in self.pool.models() if m.model_id == model_id and m.state == "failed"), None
        )

    def is_loaded(self, model_id: str) -> bool:
        return self.pool is not None and self.pool.is_loaded(model_id)

    def changes(self) -> list[tuple[str, str, str | None]]:
        """(model id, its state now, its error) of every model whose state changed since the last call."""
        if self.pool is None:
            return []
        out = []
        for row in self.pool.models():
            if self._states.get(row.model_id) != row.state:
                self._states[row.model_id] = row.state
                out.append((row.model_id, row.state, row.error))
        return out

    def model_info(self, model_id: str | None = None) -> dict[str, Any]:
        """The window's facts of a loaded model (the default one by default)."""
        assert self.pool is not None
        model_id = model_id or self.default_id
        assert model_id is not None
        engine = self.pool.loaded_engine(model_id)
        assert engine is not None
        path = str(self.pool.path_of(model_id))
        return model_info(engine, path, self.kv.dtype) | {"model_id": model_id, **self.defaults(path)}

    def defaults(self, path: str) -> dict[str, Any]:
        """The model's own defaults (``engine.model_defaults``): read once from the file's metadata."""
        if path not in self._defaults:
            try:
                self._defaults[path] = {"model_defaults": model_defaults(path).to_dict()}
            except (EngineError, OSError, ValueError) as exc:
                log.warning("cannot read the defaults of %s: %s", path, exc)
                self._defaults[path] = {"model_defaults": {}}
        return self._defaults[path]

    def models(self) -> list[dict[str, Any]]:
        """Every model of the pool for the picker and the dock: id, path, state, weights, requests."""
        if self.pool is None:
            return []
        return [
            {"model_id": m.model_id, "path": m.path, "state": m.state, "weights_bytes": m.weights_bytes,
             "n_requests": m.n_requests, "load_s": m.load_s, "error": m.error,
             "default": m.model_id == self.default_id, **self.defaults(m.path)}
            for m in self.pool.models()
        ]  # fmt: skip

    # -- requests -------------------------------------------------------------------------------
    def submit(
        self,
        conversation_id: str,
        messages: list,
        sampling: dict,
        on_event: Callable[[GenerationEvent], None],
        continuing: bool = False,
    ) -> tuple[Any, int] | Problem:
        """Queue a reply with the conversation's model (its KV session: the conversation id, with
        that model); ``continuing``: go on from the last message, a cut reply. Its handle and max new
        tokens, or why not, in the user's words. A model not loaded is loaded first (its handle's
        first event says "loading")."""
        model_id = self.model_of(conversation_id)
        if self.pool is None or model_id is None:
            return Problem(wording.NO_MODEL)
        if (error := self.load_error(model_id)) is not None:  # picking it again tries again
            return Problem(wording.NO_MODEL if model_id == self.default_id else f"Not sent: {error}")
        try:
            options = InferenceOptions.from_dict(sampling)
        except ValueError as exc:
            return Problem(wording.invalid_sampling(str(exc)))
        prompt = Continuation(messages) if continuing else messages
        try:
            handle = self.pool.submit(model_id, prompt, options, SessionId(conversation_id), on_event)
        except (EngineError, ValueError) as exc:
            log.info("request of %s refused: %s", conversation_id, exc)
            engine = self.pool.loaded_engine(model_id)
            if engine is None:
                return Problem(f"Not sent: {exc}")
            return refusal(exc, options.max_new_tokens, engine, self.kv)
        if (engine := self.pool.loaded_engine(model_id)) is not None:  # else: its limit when it ends
            limit = engine.session_token_limit()
            self._sent_limits[conversation_id] = (limit, limit_setting(self.kv, engine))
        return handle, options.max_new_tokens

    def batch_state(self, conversation_id: str) -> tuple[int, int]:
        """(replies its model's engine runs, how many may run at once): a reply still queued when they
        are equal waits for a place in the batch (a model not loaded yet: (0, limit), it waits for that)."""
        model_id = self.model_of(conversation_id)
        engine = self.pool.loaded_engine(model_id) if self.pool is not None and model_id else None
        limit = self.batching.max_batch_size if self.batching.enabled else 1
        return (0 if engine is None else engine.metrics.snapshot().running), limit

    def model_name(self, conversation_id: str | None = None) -> str:
        """The name a reply's footer shows: the model's file name without .gguf."""
        model_id = self.model_of(conversation_id) if conversation_id else self.default_id
        if self.pool is None or model_id is None:
            return "model"
        return Path(self.pool.path_of(model_id)).stem

    def limit_setting(self) -> str:
        """The option that sets a tab's token limit now ("" when it is the model's context)."""
        assert self.engine is not None
        return limit_setting(self.kv, self.engine)

    def finished_reply(
        self, conversation_id: str, result: GenerationResult, max_new_tokens: int, remote: bool
    ) -> dict[str, Any]:
        """A reply's result for the tab (``limits.finished_reply``): no local limits for a remote one."""
        model_id = self.model_of(conversation_id)
        engine = (
            None if remote or self.pool is None or model_id is None else self.pool.loaded_engine(model_id)
        )
        trimmed_at = None if remote else self._sent_limits.pop(conversation_id, None)  # what trimmed it
        data = finished_reply(conversation_id, result, max_new_tokens, engine, self.kv, trimmed_at)
        if not remote:
            data |= {"model": self.model_name(conversation_id), "engine": "local"}
        return data

    def count_tokens(self, conversation_id: str, text: str) -> tuple[int, int] | None:
        """(tokens of ``text``, the tokens a tab may hold) with the conversation's model, if loaded."""
        model_id = self.model_of(conversation_id)
        engine = self.pool.loaded_engine(model_id) if self.pool is not None and model_id else None
        if engine is None:
            return None
        return len(engine.tokenizer.encode(text)), engine.session_token_limit()

    # -- KV sessions: a conversation has one per model ----------------------------------------------
    def _sessions(self, conversation_id: str) -> list[SessionId]:
        assert self.pool is not None
        return self.pool.sessions_of(SessionId(conversation_id))

    def remove_session(self, conversation_id: str) -> None:
        """A closed tab: its KV entries leave memory (to the disk tier: reopened, it starts warm)."""
        self._model_of.pop(conversation_id, None)
        self._sent_limits.pop(conversation_id, None)
        if self.pool is not None:
            for session in self._sessions(conversation_id):
                self.pool.store.remove(session, to_disk=True)

    def prefetch(self, conversation_ids: list) -> None:
        if self.pool is not None:
            for conversation_id in conversation_ids:
                for session in self._sessions(conversation_id):
                    self.pool.store.prefetch(session)

    def forget(self, conversation_id: str) -> None:
        """A deleted conversation: its KV sessions go from the disk tier too."""
        if self.pool is not None:
            for session in self._sessions(conversation_id):
                self.pool.store.forget(session)

    def clear_disk(self) -> bool:
        """Delete every KV session file (the sessions in memory stay); True when the store did it."""
        if self.pool is not None and self.pool.store.get_stats().disk_enabled:
            self.pool.store.clear_disk()
            self.pool.store.flush_disk()
            return True
        options = with_disk_dir(self.kv)  # no model, or the tier is off: clear its folder all the same
        tier = DiskKvTier(options.disk_dir or str(paths.kv_disk_dir()), options.max_disk_bytes)
        tier.clear()
        tier.close()
        return False

    # -- options, stats, shutdown -------------------------------------------------------------------
    def apply(self, kv: dict, batching: dict, pool: dict | None = None) -> dict[str, Any]:
        """New KV cache, batching and pool options, live (ValueError: not taken); what was applied."""
        kv_options = KvCacheOptions.from_dict(dict(kv))
        batching_options = BatchingOptions.from_dict(dict(batching))
        pool_options = ModelPoolOptions(**pool) if pool is not None else self.pool_options
        self.kv, self.batching, self.pool_options = kv_options, batching_options, pool_options
        applied: dict[str, Any] = {"kv_cache": kv_options.to_dict(), "batching": batching_options.to_dict()}
        if self.pool is not None:
            self.pool.update_options(pool_options, batching_options, with_disk_dir(kv_options))
        if self.engine is not None:
            applied["session_token_limit"] = self.engine.session_token_limit()
            applied["limit_setting"] = self.limit_setting()
            applied["bytes_per_token"] = self.engine.model.kv_shape(kv_options.dtype).bytes_per_token
        applied["kernels"] = self.kernels_info()
        return applied

    def kernels_info(self) -> dict[str, Any]:
        """The kernels as Settings and the dock show them: ``path`` ("numba" or "numpy"; "" before a
        model and when ``$SMALLMIND_KERNELS`` names none), ``threads`` in effect, ``int8_available``
        (8-bit activations can run here) and the ``activations`` in effect (before a model: the ones
        it will get)."""
        if self._int8_available is None:
            self._int8_available = int8_activations_available()
        engine = self.engine
        if engine is not None:
            path, activations = engine.kernel_path, engine.activations
        else:
            path, activations = "", self.batching.activations if self._int8_available else "float32"
            with contextlib.suppress(ValueError):  # the model's load says what $SMALLMIND_KERNELS lacks
                path = kernels.backend()
        return {"path": path, "threads": kernels.threads(), "int8_available": self._int8_available,
                "activations": activations}  # fmt: skip

    def stats(self, replying: set[str]) -> dict[str, Any] | None:
        """The dock's snapshot (None without a model); ``replying``: conversations with a reply queued."""
        if self.pool is None or self.default_id is None:
            return None
        stats = pool_stats_dict(self.pool, self.default_id)
        stats["kernels"] = self.kernels_info()
        for session in stats["sessions"]:  # a reply queued for it: it is not the next to be evicted
            session["waiting"] = not session["pinned"] and session["session_id"] in replying
        return stats

    def loaded_path(self) -> str:
        return self.model_path if self.engine is not None else ""

    def stop(self) -> None:
        """Every request fails with "the engine was stopped..." (their events come in the next flush)."""
        if self.pool is not None:
            self.pool.stop()

    def close(self) -> None:
        """After ``stop``: idle sessions to disk (warm after a restart)."""
        if self.pool is not None:
            self.pool.store.close(DISK_CLOSE_S)
            self.pool = None
