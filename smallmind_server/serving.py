"""Serving one completion request: tokenize and check it, submit it, stream or collect its events.

The prompt is tokenized here (in a worker thread) to refuse what does not fit with both numbers
instead of letting the engine drop old turns, to pick the KV session by prefix, and to default
``max_tokens`` to what is left of the context. A request whose client leaves is cancelled at once
(``handle.cancel()``: the engine drops it at its next step).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request

from engine import (
    BatchedInferenceEngine,
    ContextOverflowError,
    EngineStoppedError,
    GenerationEvent,
    GenerationResult,
    InferenceOptions,
    QueueFullError,
    RequestHandle,
    SessionId,
)
from engine.constraints import Constraint
from engine.prompting import check_messages, clean_text

from .limits import MAX_SESSION_ID_CHARS
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest
from .sessions import InFlight, SessionRouter

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
Prompt = str | list[dict[str, str]]


@dataclass
class ServerState:
    """What the routes share: the engine (None while loading), limits, sessions, counters."""

    engine: BatchedInferenceEngine | None
    model_name: str
    max_tokens_cap: int
    router: SessionRouter | None = None
    in_flight: InFlight = field(default_factory=InFlight)
    finished: Counter[tuple[str, str]] = field(default_factory=Counter)  # (endpoint, finish_reason)
    lock: threading.Lock = field(default_factory=threading.Lock)
    kinds: Counter[str] = field(default_factory=Counter)  # requests by kind (chat, json_schema, tools...)

    def count_kind(self, kind: str) -> None:
        with self.lock:
            self.kinds[kind] += 1

    def attach(self, engine: BatchedInferenceEngine) -> None:
        """Serve with ``engine`` from now on (the model finished loading)."""
        self.router = SessionRouter(engine.store)
        self.engine = engine

    def require_engine(self) -> tuple[BatchedInferenceEngine, SessionRouter]:
        if self.engine is None or self.router is None:
            raise ApiError(503, "the model is still loading; try again shortly", "server_error",
                           code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})  # fmt: skip
        if self.in_flight.closing:
            raise ApiError(503, "the server is shutting down", "server_error", code="shutting_down")
        return self.engine, self.router

    def count_finished(self, endpoint: str, finish_reason: str) -> None:
        with self.lock:
            self.finished[(endpoint, finish_reason)] += 1

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip


@dataclass
class Submitted:
    """A request the engine accepted: its handle, its event queue, what usage needs."""

    endpoint: str
    handle: RequestHandle
    events: asyncio.Queue[GenerationEvent]
    session: SessionId | None  # None: a choice forked from another (n > 1), in a session of its own
    prompt_ids: list[int]


def encode(engine: BatchedInferenceEngine, prompt: Prompt, tools: Sequence[Any] | None = None) -> list[int]:
    tokenizer = engine.tokenizer
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty or only whitespace", param="prompt")
        return list(tokenizer.encode(clean_text(prompt)))
    try:
        messages = check_messages(prompt, allow_tools=tools is not None)
    except ValueError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    return list(tokenizer.encode_messages(messages, add_generation_prompt=True, tools=tools))


def _max_new_tokens(
    requested: int | None, n_prompt: int, limit: int, cap: int, what: str, field: str = "max_tokens"
) -> int:
    if requested is not None and requested > min(cap, limit):
        whose = f"this server's limit of {cap}" if cap <= limit else f"the model's context of {limit} tokens"
        raise ApiError(400, f"{field} is {requested}, more than {whose}",
                       param=field, code="max_tokens_exceeded")  # fmt: skip
    total = n_prompt + (requested or 1)
    if total > limit:
        detail = (
            f"However, you requested {total} tokens "
            f"({n_prompt} in the {what}, {requested} in the completion)."
            if requested
            else f"However, your {what} resulted in {n_prompt} tokens."
        )
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. {detail} "
                       "Please reduce the length of the prompt or of max_tokens.",
                       param="messages" if what == "messages" else "prompt",
                       code="context_length_exceeded")  # fmt: skip
    return requested if requested is not None else min(cap, limit - n_prompt)


def inference_options(
    request: ChatCompletionRequest | CompletionRequest,
    max_new_tokens: int,
    choice: int = 0,
    constraint: Constraint | None = None,
    prompt_logprobs: int | None = None,
) -> InferenceOptions:
    """The engine options of one choice. Defaults are OpenAI's: no repetition penalty unless asked
    (``repetition_penalty``, or llama.cpp's ``repeat_penalty``); choice i of n samples with seed + i."""
    given = {
        "temperature": request.temperature, "top_p": request.top_p, "top_k": request.top_k,
        "min_p": request.min_p, "repetition_penalty": request.repetition_penalty,
        "seed": None if request.seed is None else request.seed + choice,
        "presence_penalty": request.presence_penalty, "frequency_penalty": request.frequency_penalty,
        "logit_bias": request.logit_bias, "logprobs": request.top_k_logprobs,
        "prompt_logprobs": prompt_logprobs, "constraint": constraint,
    }  # fmt: skip
    if request.repetition_penalty is None:  # llama.cpp's name, as its clients (and RemoteEngine) send it
        given["repetition_penalty"] = request.repeat_penalty if request.repeat_penalty is not None else 1.0
    options: dict[str, Any] = {name: value for name, value in given.items() if value is not None}
    return InferenceOptions(max_new_tokens=max_new_tokens, stop=tuple(request.stop or ()),
                            stop_on_eos=not request.ignore_eos, **options)  # fmt: skip


async def submit(
    state: ServerState,
    endpoint: str,
    prompt: Prompt,
    request: ChatCompletionRequest | CompletionRequest,
    session_name: str | None,
    owner: str,
    *,
    choice: int = 0,
    fork_of: RequestHandle | None = None,
    constraint: Constraint | None = None,
    prompt_logprobs: int | None = None,
    tools: Sequence[Any] | None = None,
) -> Submitted:
    """Tokenize, check and submit in a worker thread; raises ApiError for everything refused.
    ``owner`` (see ``access.py``): the request sees and leaves cached K/V only within it.

    ``choice`` i of n > 1 is forked from choice 0 (``fork_of``: it copies that one's prompt K/V,
    in a session of the same owner); ``constraint`` is the grammar its output must match; ``tools``
    go to a chat template with its own tool format."""
    engine, router = state.require_engine()
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
    what = "messages" if endpoint == "chat" else "prompt"

    def on_event(event: GenerationEvent) -> None:
        loop.call_soon_threadsafe(events.put_nowait, event)

    def work() -> Submitted:
        ids = encode(engine, prompt, tools)
        limit = engine.session_token_limit()
        field = "max_completion_tokens" if getattr(request, "max_completion_tokens", None) else "max_tokens"
        cap = state.max_tokens_cap
        max_new = _max_new_tokens(request.requested_max_tokens, len(ids), limit, cap, what, field)
        options = inference_options(request, max_new, choice, constraint, prompt_logprobs)
        session = router.acquire(ids, owner, session_name)
        try:
            handle = engine.submit(prompt, options, session, on_event, fork_of=fork_of, tools=tools)
        except BaseException:
            if session is not None:
                router.release(session, ids)
            raise
        state.in_flight.add(handle)
        return Submitted(endpoint, handle, events, session, ids)

    future = loop.run_in_executor(None, work)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:  # the client left while we tokenized: cancel what was submitted
        future.add_done_callback(lambda f: _cancel_quietly(state, f))
        raise
    except QueueFullError as exc:
        raise ApiError(429, str(exc), "rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from exc  # fmt: skip
    except ContextOverflowError as exc:
        raise ApiError(400, str(exc), param=what, code="context_length_exceeded") from exc
    except EngineStoppedError as exc:
        raise ApiError(503, str(exc), "server_error", code="shutting_down") from exc
    except ValueError as exc:
        raise ApiError(400, str(exc)) from exc


def _cancel_quietly(state: ServerState, future: asyncio.Future[Submitted]) -> None:
    if not future.cancelled() and future.exception() is None:
        finish(state, future.result(), None)


def finish(state: ServerState, sub: Submitted, result: GenerationResult | None) -> None:
    """The request ended (result) or its client left (None): cancel, count, release the session."""
    if result is None:
        sub.handle.cancel()
    state.in_flight.discard(sub.handle)
    reason = result.finish_reason if result is not None else "cancelled"
    state.count_finished(sub.endpoint, reason)
    if state.router is not None and sub.session is not None:
        state.router.release(sub.session, sub.prompt_ids, keep=reason != "error")


async def event_batches(sub: Submitted) -> AsyncIterator[tuple[str, GenerationResult | None]]:
    """(text, result) per batch of events that arrived together; the last one has the result."""
    while True:
        batch = [await sub.events.get()]
        while not sub.events.empty():
            batch.append(sub.events.get_nowait())
        text = "".join(event.text for event in batch)
        result = next((event.result for event in batch if event.result is not None), None)
        yield text, result
        if result is not None:
            return


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(state: ServerState, sub: Submitted, request: Request) -> GenerationResult:
    """Wait for the whole result, cancelling the request if the client leaves first."""

    async def run() -> GenerationResult:
        async for _text, result in event_batches(sub):
            if result is not None:
                return result
        raise AssertionError("the event stream ended without a result")

    work = asyncio.ensure_future(run())
    watch = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            finish(state, sub, None)
    if not work.done():
        raise ApiError(499, "the client closed the connection", code="client_closed")
    result = work.result()
    finish(state, sub, result)
    return result


def check_result(result: GenerationResult) -> None:
    if result.finish_reason == "error":
        raise ApiError(500, result.error or "generation failed", "server_error")
    if result.finish_reason == "cancelled":
        raise ApiError(503, "the request was cancelled: the server is shutting down", "server_error",
                       code="shutting_down")  # fmt: skip


def session_name(request: Request, user: str | None) -> str | None:
    """The session a request names (``X-Session-Id``, else ``user``): within the requester's own
    sessions only (the router keys it by owner)."""
    header = (request.headers.get("x-session-id") or "").strip()
    if len(header) > MAX_SESSION_ID_CHARS:
        raise ApiError(400, f"the X-Session-Id header has {len(header):,} characters; at most "
                       f"{MAX_SESSION_ID_CHARS} are allowed", param="X-Session-Id")  # fmt: skip
    return header or user


def sse(payload: Mapping[str, Any] | str) -> str:
    import json

    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def sse_stream(
    state: ServerState,
    sub: Submitted,
    chunk: Callable[[str, str | None], dict[str, Any]],
    usage_chunk: Callable[[GenerationResult], dict[str, Any]] | None,
    first: dict[str, Any] | None = None,
) -> AsyncIterator[str]:
    """The SSE body: an optional first chunk, one chunk per event batch, usage, ``[DONE]``.

    If the client leaves, Starlette cancels this generator: ``finally`` cancels the request.
    """
    result: GenerationResult | None = None
    try:
        if first is not None:
            yield sse(first)
        async for text, result in event_batches(sub):
            if result is not None and result.finish_reason == "error":
                if text:
                    yield sse(chunk(text, None))
                error = ApiError(500, result.error or "generation failed", "server_error")
                yield sse(error.body())
                break
            if text:
                yield sse(chunk(text, None))
            if result is not None:
                yield sse(chunk("", result.finish_reason))
        if result is not None and usage_chunk is not None:
            yield sse(usage_chunk(result))
        yield sse("[DONE]")
    finally:
        finish(state, sub, result)
