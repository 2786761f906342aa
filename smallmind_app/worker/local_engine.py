"""The local engine as the worker drives it: a model read from a GGUF file, the batched engine
around it, and the KV cache and batching options it runs with. No Qt: the worker calls these on its
thread and turns what they return into its signals.
"""

from __future__ import annotations

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
    InMemoryRuntimeMetrics,
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
from engine.kv_disk import DiskKvTier

from .. import paths, wording
from ..wording import Problem
from .engine_options import with_disk_dir
from .limits import finished_reply, limit_setting, refusal
from .snapshots import model_info, stats_dict

log = logging.getLogger(__name__)

DISK_CLOSE_S = 20.0  # when a model goes, its KV sessions' writes to disk may take this long (then given up)


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
    try:
        gguf = GgufFile(path)
        return Model.from_gguf(gguf), Tokenizer.from_gguf(gguf)
    except ModelFileError as exc:
        log.warning("cannot load %s: %s", path, exc.reason)
        raise ModelLoadFailed(path, exc.reason) from exc
    except Exception as exc:  # an unreadable file may fail in many ways; report it, keep serving
        log.exception("cannot load %s", path)
        raise ModelLoadFailed(path, f"{type(exc).__name__}: {exc}") from exc


class LocalEngine:
    """The batched engine of the loaded model (``engine`` is None until one is loaded)."""

    def __init__(self) -> None:
        self.engine: BatchedInferenceEngine | None = None
        self.model_path = ""
        self.opened_paths: list[str] = []  # every model file loaded since the start, for list_models
        self.kv = KvCacheOptions()
        self.batching = BatchingOptions()

    def start(self, model: Model, tokenizer: Tokenizer, path: str, wakeup: Callable[[], None]) -> None:
        """Serve ``model``; ``wakeup`` is called (from any thread) when a request arrives."""
        store = LruKvCacheStore(with_disk_dir(self.kv))
        self.engine = BatchedInferenceEngine(model, tokenizer, self.batching, store, InMemoryRuntimeMetrics())
        self.engine.add_wakeup_listener(wakeup)
        self.model_path = path
        if path not in self.opened_paths:
            self.opened_paths.append(path)

    def stop(self) -> None:
        """Its requests fail with "the engine was stopped..." (their events come in the next flush)."""
        if self.engine is not None:
            self.engine.stop()

    def close(self) -> None:
        """After ``stop``: idle sessions to disk (warm when the model is loaded again); no engine."""
        if self.engine is not None:
            self.engine.store.close(DISK_CLOSE_S)
            self.engine = None

    def model_info(self) -> dict[str, Any]:
        assert self.engine is not None
        return model_info(self.engine, self.model_path, self.kv.dtype)

    def submit(
        self,
        conversation_id: str,
        messages: list,
        sampling: dict,
        on_event: Callable[[GenerationEvent], None],
    ) -> tuple[Any, int] | Problem:
        """Queue a reply (its KV session id is the conversation id): its handle and max new tokens,
        or why not, in the user's words."""
        if self.engine is None:
            return Problem(wording.NO_MODEL)
        try:
            options = InferenceOptions.from_dict(sampling)
        except ValueError as exc:
            return Problem(wording.invalid_sampling(str(exc)))
        try:
            handle = self.engine.submit(
                messages, options, session_id=SessionId(conversation_id), on_event=on_event
            )
        except (EngineError, ValueError) as exc:
            log.info("request of %s refused: %s", conversation_id, exc)
            return refusal(exc, options.max_new_tokens, self.engine, self.kv)
        return handle, options.max_new_tokens

    def limit_setting(self) -> str:
        """The option that sets a tab's token limit now ("" when it is the model's context)."""
        assert self.engine is not None
        return limit_setting(self.kv, self.engine)

    def finished_reply(
        self, conversation_id: str, result: GenerationResult, max_new_tokens: int, remote: bool
    ) -> dict[str, Any]:
        """A reply's result for the tab (``limits.finished_reply``): no local limits for a remote one."""
        engine = None if remote else self.engine
        return finished_reply(conversation_id, result, max_new_tokens, engine, self.kv)

    def count_tokens(self, text: str) -> tuple[int, int]:
        """(tokens of ``text``, the tokens a tab may hold)."""
        assert self.engine is not None
        return len(self.engine.tokenizer.encode(text)), self.engine.session_token_limit()

    # -- KV sessions ----------------------------------------------------------------------------
    def remove_session(self, conversation_id: str) -> None:
        """A closed tab: its KV entry leaves memory (to the disk tier: reopened, it starts warm)."""
        if self.engine is not None:
            self.engine.store.remove(SessionId(conversation_id), to_disk=True)

    def prefetch(self, conversation_ids: list) -> None:
        if self.engine is not None:
            for conversation_id in conversation_ids:
                self.engine.store.prefetch(SessionId(conversation_id))

    def forget(self, conversation_id: str) -> None:
        """A deleted conversation: its KV session goes from the disk tier too."""
        if self.engine is not None:
            self.engine.store.forget(SessionId(conversation_id))

    def clear_disk(self) -> bool:
        """Delete every KV session file (the sessions in memory stay); True when the store did it."""
        if self.engine is not None and self.engine.store.get_stats().disk_enabled:
            self.engine.store.clear_disk()
            self.engine.store.flush_disk()
            return True
        options = with_disk_dir(self.kv)  # no model, or the tier is off: clear its folder all the same
        tier = DiskKvTier(options.disk_dir or str(paths.kv_disk_dir()), options.max_disk_bytes)
        tier.clear()
        tier.close()
        return False

    def apply(self, kv: dict, batching: dict) -> dict[str, Any]:
        """New KV cache and batching options, live (ValueError: not taken); what was applied."""
        kv_options = KvCacheOptions.from_dict(dict(kv))
        batching_options = BatchingOptions.from_dict(dict(batching))
        self.kv, self.batching = kv_options, batching_options
        applied: dict[str, Any] = {"kv_cache": kv_options.to_dict(), "batching": batching_options.to_dict()}
        if self.engine is not None:
            self.engine.update_options(batching=batching_options, cache=with_disk_dir(kv_options))
            applied["session_token_limit"] = self.engine.session_token_limit()
            applied["limit_setting"] = self.limit_setting()
            applied["bytes_per_token"] = self.engine.model.kv_shape(kv_options.dtype).bytes_per_token
        return applied

    def stats(self, replying: set[str]) -> dict[str, Any] | None:
        """The dock's snapshot (None without a model); ``replying``: conversations with a reply queued."""
        if self.engine is None:
            return None
        stats = stats_dict(self.engine)
        for session in stats["sessions"]:  # a reply queued for it: it is not the next to be evicted
            session["waiting"] = not session["pinned"] and session["session_id"] in replying
        return stats

    def loaded_path(self) -> str:
        return self.model_path if self.engine is not None else ""

    def model_name(self) -> str:
        return Path(self.model_path or "model").stem
