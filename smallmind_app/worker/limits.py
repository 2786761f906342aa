"""Which limit stopped or refused a reply, and the setting that would let it through. No Qt.

A tab holds at most ``session_token_limit`` tokens: the model's context, or less when a KV cache
option sets it (``max_tokens_per_session``, or ``max_bytes_per_session`` / bytes per token). The
tab names that option and offers a value that fits; the sentences themselves are in ``wording``.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from engine import (
    BatchedInferenceEngine,
    CacheBudgetError,
    ContextOverflowError,
    GenerationResult,
    KvCacheOptions,
    QueueFullError,
)

from ..wording import MiB, Problem, engine_problem, not_sent, too_long
from .snapshots import result_dict

log = logging.getLogger(__name__)


def limit_setting(kv: KvCacheOptions, engine: BatchedInferenceEngine) -> str:
    """The option that sets a tab's token limit now ("" when it is the model's context)."""
    limit, context = engine.session_token_limit(), engine.model.config.context_length
    if not kv.enabled or limit >= context:
        return ""
    if limit == kv.max_tokens_per_session:
        return "kv_cache.max_tokens_per_session"
    return "kv_cache.max_bytes_per_session"


def reply_limits(
    result: GenerationResult, max_new_tokens: int, session_limit: int, setting: str
) -> dict[str, Any]:
    """Which limit cut or trimmed a local reply: its max new tokens, or the tab's limit (and its setting)."""
    limits: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if result.finish_reason == "length":
        full = result.generated_tokens < max_new_tokens
        limits["stopped_by"] = "session" if full else "max_new_tokens"
    if limits.get("stopped_by") == "session" or result.context_trimmed:
        limits["session_limit"] = session_limit
        limits["limit_setting"] = setting
    return limits


def too_long_problem(
    exc: ContextOverflowError, max_new_tokens: int, kv: KvCacheOptions, context: int, per_token: int
) -> Problem:
    """A message over the tab's limit: which setting set that limit, and a value that fits it."""
    needed = exc.n_tokens + min(max_new_tokens, 1024)  # the message and room for a reply
    if not kv.enabled or exc.limit >= context or needed > context:
        return too_long(exc.n_tokens, exc.limit, context, "", None)
    if exc.limit == kv.max_tokens_per_session:
        suggested = min(context, -(-needed // 1024) * 1024)
        return too_long(exc.n_tokens, exc.limit, context, "kv_cache.max_tokens_per_session", suggested)
    suggested = min(kv.max_bytes_total, -(-needed * per_token // MiB) * MiB)
    ok = suggested >= needed * per_token
    return too_long(
        exc.n_tokens, exc.limit, context, "kv_cache.max_bytes_per_session", suggested if ok else None
    )


def finished_reply(
    conversation_id: str,
    result: GenerationResult,
    max_new_tokens: int,
    engine: BatchedInferenceEngine | None,
    kv: KvCacheOptions,
) -> dict[str, Any]:
    """A reply's result for the tab: its figures, the limit that cut it (``engine``: the local engine
    that gave it, None for a remote one), its error in the user's words."""
    limits: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    if engine is not None:
        limits = reply_limits(result, max_new_tokens, engine.session_token_limit(), limit_setting(kv, engine))
    data = result_dict(result) | limits
    if data.get("error"):  # the precise message to the log, the user's words to the tab
        log.warning("reply of %s failed: %s", conversation_id, data["error"])
        problem = engine_problem(str(data["error"]))
        setting = problem.setting
        if setting == "kv_cache.max_tokens_per_session" and engine is not None:
            setting = limit_setting(kv, engine)  # the option that sets the tab's limit now
        data.update(error=problem.text, error_detail=data["error"], error_setting=setting)
    return data


def refusal(
    exc: Exception, max_new_tokens: int, engine: BatchedInferenceEngine, kv: KvCacheOptions
) -> Problem:
    """What the tab says of a request the engine did not take, and the setting that would do."""
    if isinstance(exc, ContextOverflowError):
        context = engine.model.config.context_length
        per_token = engine.model.kv_shape(kv.dtype).bytes_per_token
        return too_long_problem(exc, max_new_tokens, kv, context, per_token)
    problem = engine_problem(str(exc))
    if isinstance(exc, CacheBudgetError):
        return dataclasses.replace(problem, text=f"Not sent: {problem.text}")
    return dataclasses.replace(problem, text=engine_problem(submit_error_message(exc)).text)


_REFUSAL_KINDS = {QueueFullError: "queue_full", ContextOverflowError: "context_overflow",
                  CacheBudgetError: "cache_budget"}  # fmt: skip


def submit_error_message(exc: Exception) -> str:
    """A sentence for the tab: what happened, the engine's numbers, what the user can do."""
    kind = next((kind for cls, kind in _REFUSAL_KINDS.items() if isinstance(exc, cls)), "")
    return not_sent(kind, str(exc))
