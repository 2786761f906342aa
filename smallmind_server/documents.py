"""Document libraries over the API: ``"smallmind": {"library": ...}`` on ``/v1/chat/completions``.

    {"messages": [...], "smallmind": {"library": "notes", "budget_tokens": 1000}}

The last message (the user's question) gets the best passages of the libraries, numbered, after its
text (``engine.documents``: the same retrieval and prompt as the desktop window, so a script gets the
window's answer); the request then goes on as any other. The reply carries the passages it was given
in ``"smallmind": {"citations": [...], "n_tokens": ..., "budget_tokens": ...}``: a top-level field of
the ``chat.completion``, or, streamed, of one extra chunk with no choices right after the first.

A layer in front of the route (ASGI middleware, inside the key and size checks): the chat route and
its protocol stay as they are. Libraries are read from the app's document index (made in the window
or by ``engine.documents``); retrieval runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.documents import DocumentIndex, Retrieval, messages_with_passages, retrieve
from engine.documents.retrieval import DEFAULT_BUDGET_TOKENS, MAX_BUDGET_TOKENS
from engine.errors import DocumentIndexError, EngineError, LibraryNotFoundError

from .protocol import ApiError
from .serving import ServerState

if TYPE_CHECKING:
    from .models import ServedModels

FIELD = "smallmind"
CHAT_PATH = "/v1/chat/completions"
MAX_LIBRARIES = 16
LibraryName = Annotated[str, Field(min_length=1, max_length=100)]


class DocumentsRequest(BaseModel):
    """The ``smallmind`` field of a chat request: which libraries, how many tokens of passages."""

    model_config = ConfigDict(extra="forbid")

    library: Annotated[list[LibraryName], Field(min_length=1, max_length=MAX_LIBRARIES)]  # a name or names
    budget_tokens: Annotated[int, Field(ge=1, le=MAX_BUDGET_TOKENS)] = DEFAULT_BUDGET_TOKENS
    max_passages: Annotated[int, Field(ge=1, le=50)] = 12

    @field_validator("library", mode="before")
    @classmethod
    def _one_or_more(cls, value: object) -> object:
        return [value] if isinstance(value, str) else value

    @property
    def libraries(self) -> list[str]:
        return list(dict.fromkeys(self.library))


def citations_field(found: Retrieval, libraries: list[str]) -> dict[str, Any]:
    """What the reply says about the passages it was given."""
    return {"libraries": libraries, "budget_tokens": found.budget_tokens, "n_tokens": found.n_tokens,
            "citations": [c.as_dict() for c in found.passages]}  # fmt: skip


class DocumentsMiddleware:
    """Adds library passages to chat requests that ask for them, and their citations to the replies."""

    def __init__(
        self,
        app: ASGIApp,
        state: ServerState,
        index_path: str | os.PathLike[str],
        models: ServedModels | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.models = models  # a model pool's: passages are counted by the model the request names
        self.index_path = Path(index_path)
        self._index: DocumentIndex | None = None
        self._opening = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != CHAT_PATH:
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        document = None
        if FIELD.encode() in body:  # most requests: no second parse of the body
            with contextlib.suppress(ValueError):  # not JSON: the route answers with its own 400
                document = json.loads(body)
        if not isinstance(document, dict) or FIELD not in document:
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            extension = _validated(document.pop(FIELD))
            found = await anyio.to_thread.run_sync(self._add_passages, document, extension)
        except ApiError as error:
            response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
            await response(scope, receive, send)
            return
        new_body = json.dumps(document).encode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(new_body)).encode())]}
        cited = _CitingSend(send, citations_field(found, extension.libraries))
        await self.app(scope, _replay(new_body, receive), cited)

    def _add_passages(self, document: dict[str, Any], extension: DocumentsRequest) -> Retrieval:
        """Retrieve for the last message and add the passages to it (in a worker thread)."""
        messages = document.get("messages")
        last = messages[-1] if isinstance(messages, list) and messages else None
        if not isinstance(messages, list) or not isinstance(last, dict) or last.get("role") != "user":
            raise ApiError(400, f"'{FIELD}.library' needs the last message to be the user's question",
                           param="messages")  # fmt: skip
        question = _text_of(last.get("content"))
        tokenizer = self._tokenizer_for(document.get("model"))
        try:
            found = retrieve(self._open_index(extension.libraries), extension.libraries, question,
                             extension.budget_tokens, _token_counter(tokenizer), None,
                             extension.max_passages)  # fmt: skip
        except LibraryNotFoundError as exc:
            raise ApiError(404, str(exc), "not_found_error", param=f"{FIELD}.library",
                           code="library_not_found") from exc  # fmt: skip
        except DocumentIndexError as exc:
            raise ApiError(500, str(exc), "server_error", code="document_index_error") from exc
        messages[-1] = messages_with_passages([{**last, "content": question}], found.passages)[0]
        return found

    def _tokenizer_for(self, model: object) -> Any:
        """The tokenizer of the model the request names (a pool's: loaded first if needed, as the
        route would), else the server's one model's."""
        if self.models is None:
            return self.state.require_engine()[0].tokenizer
        model_id = self.models.check(model if isinstance(model, str) else None)  # unknown: the 404
        try:
            engine = self.models.pool.lease(model_id)
        except EngineError as exc:
            raise ApiError(500, str(exc), "server_error", param="model", code="model_load_failed") from exc
        try:
            return engine.tokenizer
        finally:
            self.models.pool.release(model_id)

    def _open_index(self, libraries: list[str]) -> DocumentIndex:
        with self._opening:
            if self._index is None:
                if not self.index_path.exists():  # never create an index just to say it is empty
                    raise LibraryNotFoundError(libraries[0], [])
                self._index = DocumentIndex(self.index_path)
            return self._index

    def close(self) -> None:
        if self._index is not None:
            self._index.close()


def _validated(value: object) -> DocumentsRequest:
    try:
        return DocumentsRequest.model_validate(value)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(
            str(p) for p in (FIELD, *problem.get("loc", ())) if not str(p).startswith(("list[", "str"))
        )
        if problem.get("type") == "extra_forbidden":
            raise ApiError(400, f"unknown field {where!r}", param=where) from exc
        raise ApiError(400, f"{where}: {problem.get('msg')} (got {problem.get('input')!r})"[:300],
                       param=where) from exc  # fmt: skip


def _text_of(content: object) -> str:
    """A message's text: a string, or OpenAI's list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    raise ApiError(400, "the last message's content must be text", param="messages")


def _token_counter(tokenizer: Any) -> Callable[[str], int] | None:
    if tokenizer is None:
        return None
    return lambda text: len(tokenizer.encode(text, parse_special=False))


async def _read_body(receive: Receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    pending: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class _CitingSend:
    """Adds the ``smallmind`` field to a successful reply: into the JSON object, or as an extra SSE
    chunk after the first one (it copies the stream's id, created and model)."""

    def __init__(self, send: Send, field: dict[str, Any]) -> None:
        self.send = send
        self.field = field
        self.mode = "pass"
        self.start: Message | None = None
        self.buffer = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = dict(message.get("headers", []))
            kind = headers.get(b"content-type", b"").decode("latin-1")
            if message["status"] == 200 and "event-stream" in kind:
                self.mode = "stream"
            elif message["status"] == 200 and "json" in kind:
                self.mode, self.start = "json", message
                return  # sent with the body, whose length changes
            await self.send(message)
            return
        if message["type"] != "http.response.body" or self.mode == "pass":
            await self.send(message)
            return
        self.buffer += message.get("body", b"")
        more = message.get("more_body", False)
        if self.mode == "json":
            if not more:
                await self._send_json()
            return
        await self._send_stream(more)

    async def _send_json(self) -> None:
        assert self.start is not None
        try:
            reply = json.loads(self.buffer)
            reply[FIELD] = self.field
            body = json.dumps(reply).encode()
        except ValueError:
            body = self.buffer
        headers = [(k, v) for k, v in self.start.get("headers", []) if k != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_stream(self, more: bool) -> None:
        if self.mode == "stream" and b"\n\n" in self.buffer:
            first, _, rest = self.buffer.partition(b"\n\n")
            self.buffer = first + b"\n\n" + self._chunk(first) + rest
            self.mode = "streaming"  # the citations chunk is in: pass the rest through
        if self.mode == "streaming" or not more:
            body, self.buffer = self.buffer, b""
            await self.send({"type": "http.response.body", "body": body, "more_body": more})

    def _chunk(self, first_event: bytes) -> bytes:
        try:
            first = json.loads(first_event.decode("utf-8").removeprefix("data:").strip())
        except ValueError:
            first = {}
        head = {key: first.get(key) for key in ("id", "created", "model")} if isinstance(first, dict) else {}
        chunk: dict[str, Any] = {**head, "object": "chat.completion.chunk", "choices": [], FIELD: self.field}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"
