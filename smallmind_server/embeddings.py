"""``POST /v1/embeddings``: one vector per input from the loaded chat model, in OpenAI's shape.

Each input is an engine request (``BatchedInferenceEngine.submit_embedding``): its rows share the
scheduler's forward passes with chat traffic, and its vector is the L2-normalized mean of the
model's final hidden states over the input's tokens. ``encoding_format`` "float" or "base64"
(little-endian float32, as OpenAI sends it); ``dimensions`` only as the model's own width. A chat
model's embeddings are a convenience, not what a retrieval model gives.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, field_validator
from starlette.requests import Request

from engine import ContextOverflowError, EngineStoppedError, GenerationEvent, QueueFullError, RequestHandle

from . import serving
from .limits import MAX_EMBEDDING_INPUTS, MAX_NAME_CHARS, MAX_PROMPT_CHARS
from .protocol import ApiError, _Strict
from .serving import RETRY_AFTER_S, ServerState

MAX_INPUTS = MAX_EMBEDDING_INPUTS


class EmbeddingRequest(_Strict):
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)]
        | Annotated[list[int], Field(min_length=1)]
        | Annotated[
            list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1, max_length=MAX_INPUTS)
        ]
    )
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: Annotated[str, Field(max_length=MAX_NAME_CHARS)] | None = None

    @field_validator("input")
    @classmethod
    def _total_size(cls, value: Any) -> Any:
        items = [value] if isinstance(value, str) or (value and isinstance(value[0], int)) else value
        total = sum(len(item) for item in items)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the inputs hold {total:,} characters or tokens; at most {MAX_PROMPT_CHARS:,}")
        return value

    def inputs(self) -> list[str | list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and isinstance(value[0], int):
            return [list(value)]
        return list(value)  # type: ignore[arg-type]


async def embed(state: ServerState, body: EmbeddingRequest, request: Request) -> dict[str, Any]:
    engine, _ = state.require_engine()
    width = engine.model.config.hidden_size
    if body.dimensions is not None and body.dimensions != width:
        raise ApiError(400, f"dimensions = {body.dimensions} is not supported: this model's embeddings have "
                       f"{width} dimensions and cannot be shortened", param="dimensions")  # fmt: skip
    state.count_kind("embeddings")
    loop = asyncio.get_running_loop()
    inputs = body.inputs()
    queues: list[asyncio.Queue[GenerationEvent]] = [asyncio.Queue() for _ in inputs]

    def work() -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for item, queue in zip(inputs, queues, strict=True):
                handles.append(engine.submit_embedding(item, _forward_to(loop, queue)))
                state.in_flight.add(handles[-1])
        except BaseException:
            for handle in handles:
                handle.cancel()
                state.in_flight.discard(handle)
            raise
        return handles

    try:
        handles = await loop.run_in_executor(None, work)
    except QueueFullError as exc:
        raise ApiError(429, str(exc), "rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from exc  # fmt: skip
    except ContextOverflowError as exc:
        raise ApiError(400, str(exc), param="input", code="context_length_exceeded") from exc
    except EngineStoppedError as exc:
        raise ApiError(503, str(exc), "server_error", code="shutting_down") from exc
    except ValueError as exc:
        raise ApiError(400, str(exc), param="input") from exc
    results = await _wait(state, handles, queues, request)
    data = [{"object": "embedding", "index": i, "embedding": _encoded(r.embedding, body.encoding_format)}
            for i, r in enumerate(results)]  # fmt: skip
    n_tokens = sum(r.prompt_tokens for r in results)
    return {"object": "list", "data": data, "model": state.model_name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}}  # fmt: skip


def _forward_to(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[GenerationEvent]) -> Any:
    return lambda event: loop.call_soon_threadsafe(queue.put_nowait, event)


async def _wait(
    state: ServerState,
    handles: list[RequestHandle],
    queues: list[asyncio.Queue[GenerationEvent]],
    request: Request,
) -> list[Any]:
    async def result_of(queue: asyncio.Queue[GenerationEvent]) -> Any:
        while True:
            event = await queue.get()
            if event.result is not None:
                return event.result

    work = asyncio.ensure_future(asyncio.gather(*(result_of(q) for q in queues)))
    watch = asyncio.ensure_future(serving.wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        for handle in handles:
            state.in_flight.discard(handle)
        if not work.done():
            work.cancel()
            for handle in handles:
                handle.cancel()
    if not work.done() or work.cancelled():
        raise ApiError(499, "the client closed the connection", code="client_closed")
    results = work.result()
    for result in results:
        state.count_finished("embeddings", result.finish_reason)
        serving.check_result(result)
    return results


def _encoded(vector: np.ndarray | None, encoding: str) -> list[float] | str:
    assert vector is not None
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(v) for v in vector]
