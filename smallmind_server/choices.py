"""Chat and text completions with all their choices: n samples per prompt, several prompts, logprobs
and tool calls, whole or streamed.

Choice j of a prompt is the engine request forked from choice 0 (one prompt computation, the n rows
decoded together) with seed + j when a seed is given; choice index = prompt index * n + j, as
OpenAI numbers them. Usage counts each prompt once and every choice's tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Iterator, Sequence
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import Request

from engine import GenerationEvent, GenerationResult
from engine.constraints import Constraint
from engine.logprobs import TokenLogprob, finite

from . import serving, structured, tools
from .protocol import ApiError, ChatCompletionRequest, CompletionRequest, Usage
from .serving import ServerState, Submitted

Prompt = str | list[dict[str, str]]


# -- submitting every choice -----------------------------------------------------------------------------
async def submit_choices(
    state: ServerState,
    endpoint: str,
    prompts: Sequence[Prompt],
    body: ChatCompletionRequest | CompletionRequest,
    session_name: str | None,
    owner: str,
    constraint: Constraint | None = None,
    prompt_logprobs: int | None = None,
    template_tools: list[dict[str, Any]] | None = None,
) -> list[Submitted]:
    """Submit n choices per prompt; on any refusal, cancel what was submitted and re-raise. Every
    choice runs in a session of ``owner``; only the first prompt's first choice in a named one."""
    subs: list[Submitted] = []
    try:
        for i, prompt in enumerate(prompts):
            name = session_name if i == 0 else None  # a pinned session serves one request at a time
            first = await serving.submit(state, endpoint, prompt, body, name, owner, constraint=constraint,
                                         prompt_logprobs=prompt_logprobs, tools=template_tools)  # fmt: skip
            subs.append(first)
            for j in range(1, body.n):
                subs.append(await serving.submit(state, endpoint, prompt, body, None, owner, choice=j,
                                                 fork_of=first.handle, constraint=constraint,
                                                 tools=template_tools))  # fmt: skip
    except BaseException:
        for sub in subs:
            serving.finish(state, sub, None)
        raise
    return subs


def usage_of(subs: Sequence[Submitted], results: Sequence[GenerationResult | None], n: int) -> Usage:
    firsts = [r for i, r in enumerate(results) if i % n == 0 and r is not None]
    prompt = sum(r.prompt_tokens for r in firsts)
    cached = sum(r.reused_tokens for r in firsts)
    return Usage.of(prompt, sum(r.generated_tokens for r in results if r is not None), cached)


# -- waiting for every choice ------------------------------------------------------------------------------
async def batches(
    sub: Submitted,
) -> AsyncIterator[tuple[str, tuple[TokenLogprob, ...], GenerationResult | None]]:
    """(text, logprobs, result) per batch of events that arrived together; the last one has the result."""
    while True:
        batch: list[GenerationEvent] = [await sub.events.get()]
        while not sub.events.empty():
            batch.append(sub.events.get_nowait())
        text = "".join(event.text for event in batch)
        logprobs = tuple(lp for event in batch for lp in event.logprobs)
        result = next((event.result for event in batch if event.result is not None), None)
        yield text, logprobs, result
        if result is not None:
            return


async def merged(
    subs: Sequence[Submitted],
) -> AsyncGenerator[tuple[int, str, tuple[TokenLogprob, ...], GenerationResult | None], None]:
    """Every choice's batches as they come: (choice index, text, logprobs, result)."""
    queue: asyncio.Queue[tuple[int, str, tuple[TokenLogprob, ...], GenerationResult | None]] = asyncio.Queue()

    async def pump(index: int, sub: Submitted) -> None:
        async for text, logprobs, result in batches(sub):
            await queue.put((index, text, logprobs, result))

    tasks = [asyncio.ensure_future(pump(i, sub)) for i, sub in enumerate(subs)]
    remaining = len(subs)
    try:
        while remaining:
            item = await queue.get()
            remaining -= item[3] is not None
            yield item
    finally:
        for task in tasks:
            task.cancel()


async def collect_all(
    state: ServerState, subs: Sequence[Submitted], request: Request
) -> list[GenerationResult]:
    """Every choice's result; all are cancelled if the client leaves first (499)."""
    results: list[GenerationResult | None] = [None] * len(subs)

    async def run() -> None:
        async with contextlib.aclosing(merged(subs)) as events:
            async for index, _text, _logprobs, result in events:
                if result is not None:
                    results[index] = result

    work = asyncio.ensure_future(run())
    watch = asyncio.ensure_future(serving.wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    for sub, result in zip(subs, results, strict=True):
        serving.finish(state, sub, result)
    if not work.done() or work.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_closed")
    done = [r for r in results if r is not None]
    for result in done:
        serving.check_result(result)
    return done


def tags_are_tokens(engine: Any) -> bool:
    """The vocabulary has ``<tool_call>`` as a special token (Qwen's): calls are written with it."""
    tokenizer = engine.tokenizer
    ids = tokenizer.encode(tools.CALL_OPEN)
    return len(ids) == 1 and tokenizer.is_special(ids[0])


def finish_reason(result: GenerationResult, called: bool) -> str:
    """ "tool_calls" for a reply of calls that ended by itself; a cut one says "length"."""
    return "tool_calls" if called and result.finish_reason == "stop" else result.finish_reason


# -- logprobs in OpenAI's shapes ----------------------------------------------------------------------------
def chat_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob]) -> dict[str, Any]:
    def one(token_id: int, logprob: float) -> dict[str, Any]:
        return {"token": tokenizer.token_text(token_id), "logprob": finite(logprob),
                "bytes": list(tokenizer.token_bytes(token_id))}  # fmt: skip

    return {"content": [{**one(e.token_id, e.logprob), "top_logprobs": [one(i, v) for i, v in e.top]}
                        for e in entries], "refusal": None}  # fmt: skip


def completion_logprobs(tokenizer: Any, entries: Sequence[TokenLogprob | None], ids: Sequence[int],
                        offset: int = 0) -> dict[str, Any]:  # fmt: skip
    """The legacy shape: tokens, token_logprobs, top_logprobs (token text -> logprob), text_offset."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(ids, entries, strict=True):
        text = tokenizer.token_text(token_id)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if entry is None else finite(entry.logprob))
        top = None if entry is None else {tokenizer.token_text(i): finite(v) for i, v in entry.top}
        out["top_logprobs"].append(top)
    return out


# -- chat completions --------------------------------------------------------------------------------------
async def chat(
    state: ServerState, body: ChatCompletionRequest, request: Request, owner: str
) -> JSONResponse | StreamingResponse:
    engine, _ = state.require_engine()
    native = engine.tokenizer.chat_template.supports_tools  # the template has its own tool format
    constraint, kind = await structured.checked_constraint(engine.grammars, body, tags_are_tokens(engine))
    state.count_kind(kind)
    session = serving.session_name(request, body.user)
    messages, template_tools = tools.engine_messages(body, native)
    subs = await submit_choices(state, "chat", [messages], body, session, owner, constraint,
                                template_tools=template_tools)  # fmt: skip
    reply_id, created = f"chatcmpl-{subs[0].handle.request_id}-{int(time.time() * 1000)}", int(time.time())
    head = {"id": reply_id, "object": "chat.completion", "created": created, "model": state.model_name}
    if body.stream:
        stream = chat_stream(state, subs, body, {**head, "object": "chat.completion.chunk"})
        return StreamingResponse(stream, media_type="text/event-stream")
    results = await collect_all(state, subs, request)
    tokenizer = state.engine.tokenizer if state.engine is not None else None
    choices = []
    for index, result in enumerate(results):
        calls = tools.tool_calls_of(result.text) if body.tool_mode != "none" else None
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls else result.text,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        logprobs = chat_logprobs(tokenizer, result.logprobs) if body.logprobs else None
        choices.append({"index": index, "message": message, "logprobs": logprobs,
                        "finish_reason": finish_reason(result, bool(calls))})  # fmt: skip
    usage = usage_of(subs, results, body.n).model_dump()
    return JSONResponse({**head, "choices": choices, "usage": usage, "system_fingerprint": None})


async def chat_stream(
    state: ServerState, subs: list[Submitted], body: ChatCompletionRequest, head: dict[str, Any]
) -> AsyncIterator[str]:
    """The SSE body: a role chunk per choice, content / tool-call / logprob deltas, a finish chunk
    per choice, usage (when asked), ``[DONE]``."""
    tokenizer = state.engine.tokenizer if state.engine is not None else None
    parsers = [tools.ToolCallStream() if body.tool_mode != "none" else None for _ in subs]

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
              logprobs: tuple[TokenLogprob, ...] = ()) -> str:  # fmt: skip
        lp = chat_logprobs(tokenizer, logprobs) if body.logprobs and logprobs else None
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return serving.sse({**head, "choices": [choice]})

    def on_batch(
        index: int, text: str, logprobs: tuple[TokenLogprob, ...], result: GenerationResult | None
    ) -> Iterator[str]:
        parser = parsers[index]
        content, calls = parser.feed(text) if parser is not None else (text, [])
        if result is not None and parser is not None:
            content += parser.flush()
        if content or calls or logprobs:
            delta: dict[str, Any] = {"content": content} if content or not calls else {}
            if calls:
                delta["tool_calls"] = calls
            yield chunk(index, delta, logprobs=logprobs)
        if result is not None:
            called = parser is not None and tools.scan_calls(parser.text)[0]
            yield chunk(index, {}, finish_reason(result, bool(called)))

    first = [chunk(index, {"role": "assistant", "content": ""}) for index in range(len(subs))]
    async for out in drive(state, subs, body, head, on_batch, first):
        yield out


async def drive(
    state: ServerState,
    subs: list[Submitted],
    body: ChatCompletionRequest | CompletionRequest,
    head: dict[str, Any],
    on_batch: Callable[[int, str, tuple[TokenLogprob, ...], GenerationResult | None], Iterable[str]],
    first: Sequence[str] = (),
) -> AsyncIterator[str]:
    """An SSE body over every choice: ``first``, ``on_batch``'s chunks per batch of events, then
    usage (when asked) and ``[DONE]``; an error ends the stream with OpenAI's error object. If the
    client leaves, Starlette cancels this generator and ``finally`` cancels what still runs."""
    results: list[GenerationResult | None] = [None] * len(subs)
    try:
        for out in first:
            yield out
        async with contextlib.aclosing(merged(subs)) as events:
            async for index, text, logprobs, result in events:
                results[index] = result
                if result is not None and result.finish_reason == "error":
                    yield serving.sse(
                        ApiError(500, result.error or "generation failed", "server_error").body()
                    )
                    return
                for out in on_batch(index, text, logprobs, result):
                    yield out
        if body.include_usage:
            yield serving.sse({**head, "choices": [], "usage": usage_of(subs, results, body.n).model_dump()})
        yield serving.sse("[DONE]")
    finally:
        for sub, result in zip(subs, results, strict=True):
            serving.finish(state, sub, result)


# -- text completions --------------------------------------------------------------------------------------
async def completions(
    state: ServerState, body: CompletionRequest, request: Request, owner: str
) -> JSONResponse | StreamingResponse:
    state.count_kind("completions")
    session = serving.session_name(request, body.user)
    prompts = body.prompts()
    echo_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    subs = await submit_choices(state, "completions", prompts, body, session, owner,
                                prompt_logprobs=echo_logprobs)  # fmt: skip
    reply_id, created = f"cmpl-{subs[0].handle.request_id}-{int(time.time() * 1000)}", int(time.time())
    head = {"id": reply_id, "object": "text_completion", "created": created, "model": state.model_name}
    tokenizer = state.engine.tokenizer if state.engine is not None else None
    if body.stream:
        return StreamingResponse(completion_stream(state, subs, body, head, tokenizer),
                                 media_type="text/event-stream")  # fmt: skip
    results = await collect_all(state, subs, request)
    choices = []
    for index, (sub, result) in enumerate(zip(subs, results, strict=True)):
        echoed = prompts[index // body.n] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            entries: list[TokenLogprob | None] = list(result.logprobs)
            ids = [e.token_id for e in result.logprobs]
            if body.echo:
                entries, ids = [*_prompt_entries(subs, index, body.n), *entries], [*sub.prompt_ids, *ids]
            logprobs = completion_logprobs(tokenizer, entries, ids)
        choices.append({"index": index, "text": echoed + result.text, "logprobs": logprobs,
                        "finish_reason": result.finish_reason})  # fmt: skip
    usage = usage_of(subs, results, body.n).model_dump()
    return JSONResponse({**head, "choices": choices, "usage": usage})


def _prompt_entries(subs: Sequence[Submitted], index: int, n: int) -> list[TokenLogprob | None]:
    """A choice's prompt logprobs: its prompt's first choice computed them (a forked one copies K/V)."""
    first = subs[index - index % n]
    entries = list(first.handle.prompt_logprobs)
    return entries + [None] * (len(first.prompt_ids) - len(entries))


async def completion_stream(
    state: ServerState, subs: list[Submitted], body: CompletionRequest, head: dict[str, Any], tokenizer: Any
) -> AsyncIterator[str]:
    prompts = body.prompts()
    echoed = [False] * len(subs)

    def chunk(index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None = None) -> str:
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return serving.sse({**head, "choices": [choice]})

    def on_batch(
        index: int, text: str, logprobs: tuple[TokenLogprob, ...], result: GenerationResult | None
    ) -> Iterator[str]:
        if body.echo and not echoed[index]:  # the prompt is computed once a batch arrives
            echoed[index] = True
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(
                    tokenizer, _prompt_entries(subs, index, body.n), subs[index].prompt_ids
                )
            yield chunk(index, prompts[index // body.n], None, lp)
        if text or logprobs:
            lp = None
            if body.logprobs is not None:
                lp = completion_logprobs(tokenizer, list(logprobs), [e.token_id for e in logprobs])
            yield chunk(index, text, None, lp)
        if result is not None:
            yield chunk(index, "", result.finish_reason)

    async for out in drive(state, subs, body, head, on_batch):
        yield out
