"""The app factory: ``create_app(engine, model_name, ...)`` builds the FastAPI app around an engine.

The engine is running (driven by its own thread, or by the app's worker): the server only submits
requests and reads events, so API requests are batched with whatever else the engine serves. Pass
``engine=None`` to start answering (``/health`` says 503) before the model has loaded, then
``app.state.server.attach(engine)``. Pass a ``ModelPool`` to serve every model it knows by its ``model``
id, loading on demand (``models.py``); ``model_name`` is then the default model's id.

Before routing, ``_Guard`` checks the ``Host`` (a keyless server answers loopback names only), the
API key (which also names the request's owner, see ``access.py``) and the body size.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine import BatchedInferenceEngine
from engine.documents import default_index_path
from engine.model_pool import ModelPool
from engine.prompting import check_messages

from . import choices, embeddings, metrics, serving
from .access import LOCAL_OWNER, ApiKeys, host_allowed
from .documents import DocumentsMiddleware
from .embeddings import EmbeddingRequest
from .limits import DEFAULT_MAX_TOKENS_CAP, MAX_BODY_BYTES, MAX_HEADER_BYTES
from .models import ServedModels
from .protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)

DEFAULT_MAX_BODY_BYTES = MAX_BODY_BYTES
OPEN_PATHS = frozenset({"/health"})  # answered without an API key
OWNER_SCOPE_KEY = "smallmind.owner"  # where _Guard leaves the request's owner for the routes


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _header_size_error(scope: Scope) -> ApiError | None:
    size = sum(len(name) + len(value) for name, value in scope["headers"])
    if size <= MAX_HEADER_BYTES:
        return None
    message = f"the request's headers hold {size:,} bytes; at most {MAX_HEADER_BYTES:,} are allowed"
    return ApiError(431, message, code="request_header_fields_too_large")


class _Guard:
    """ASGI middleware run before routing: the headers' size (431), the Host (keyless: loopback only,
    403), the API key (401; it names the owner), then the body size (413)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, max_body_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = _header_size_error(scope) or self._host_error(scope) or self._auth_error(scope)
        if error is None:
            receive, error = await self._bounded_body(scope, receive)
        if error is not None:
            await _error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _host_error(self, scope: Scope) -> ApiError | None:
        """A keyless server is for this machine only: a request addressed to another name is a web
        page's (DNS rebinding), whatever address the name resolved to."""
        if self.keys:
            return None
        header = dict(scope["headers"]).get(b"host", b"").decode("latin-1") or None
        server = scope.get("server")
        if host_allowed(header, server[0] if server else None):
            return None
        what = (
            f"the Host header {header[:100]!r} is not a loopback name or address"
            if header
            else "no Host header"
        )
        return ApiError(403, f"{what}; this server "
                        "has no API key, so it answers only requests to localhost, 127.0.0.1 or [::1] "
                        "(a guard against DNS rebinding). Start it with an API key to serve other "
                        "host names", "permission_error", param="Host", code="host_not_allowed")  # fmt: skip

    def _auth_error(self, scope: Scope) -> ApiError | None:
        if not self.keys:
            scope[OWNER_SCOPE_KEY] = LOCAL_OWNER
            return None
        if scope["path"] in OPEN_PATHS or scope["method"] == "OPTIONS":
            return None
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        owner = self.keys.owner_of(token.strip()) if scheme.lower() == "bearer" else None
        if owner is not None:
            scope[OWNER_SCOPE_KEY] = owner
            return None
        what = "no API key was given" if not given else "the API key is wrong"
        return ApiError(401, f"{what}; send it as 'Authorization: Bearer <key>'", code="invalid_api_key")

    async def _bounded_body(self, scope: Scope, receive: Receive) -> tuple[Receive, ApiError | None]:
        """Read the body (at most max_body_bytes) and replay it; 413 when it is longer."""
        limit = self.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than {limit:,} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return receive, too_big
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return receive, too_big
            more = message.get("more_body", False)
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed() -> Message:
            return replay.pop() if replay else await receive()

        return replayed, None


def create_app(
    engine: BatchedInferenceEngine | None,
    model_name: str,
    api_key: str | Sequence[str] | None = None,
    cors_origins: Sequence[str] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    pool: ModelPool | None = None,
    documents_path: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The OpenAI-compatible app serving ``engine`` (None: still loading) under ``model_name``, or
    every model of ``pool`` (``model_name``: the one a request without ``model`` gets).

    ``api_key``: one key or several, each its own owner (None or empty: no key, loopback Hosts only).
    ``documents_path``: the document index whose libraries chat requests may name (documents.py);
    None: the app's own (``engine.documents.default_index_path()``).
    """
    keys = ApiKeys([api_key] if isinstance(api_key, str) and api_key else api_key or ())
    if max_body_bytes < 1 or max_tokens_cap < 1:
        raise ValueError(
            f"max_body_bytes and max_tokens_cap must be >= 1, got {max_body_bytes}, {max_tokens_cap}"
        )
    app = FastAPI(title="SmallMind", docs_url=None, redoc_url=None, openapi_url=None)
    state = serving.ServerState(None, model_name, max_tokens_cap)
    if engine is not None:
        state.attach(engine)
    app.state.server = state
    app.state.models = ServedModels(pool, state, model_name) if pool is not None else None
    _add_error_handlers(app)
    _add_routes(app, state, app.state.models)
    index_path = documents_path if documents_path is not None else default_index_path()
    app.add_middleware(DocumentsMiddleware, state=state, index_path=index_path,
                       models=app.state.models)  # inside the _Guard  # fmt: skip
    app.add_middleware(_Guard, keys=keys, max_body_bytes=max_body_bytes)
    if cors_origins:  # added last: runs first, so preflights get their headers before the key check
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Session-Id"])  # fmt: skip
    return app


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = exc.errors()
        first = problems[0] if problems else {}
        whole_body = tuple(first.get("loc", ())) == ("body",)
        if whole_body and first.get("type") == "value_error":  # a rule between fields (protocol.py)
            return _error_response(ApiError(400, str(first.get("msg", "")).removeprefix("Value error, ")))
        if first.get("type") == "json_invalid" or whole_body:
            content_type = request.headers.get("content-type", "")
            if "json" not in content_type.lower():
                wanted = "the request body must be JSON, sent with 'Content-Type: application/json'"
                message = f"{wanted} (got {content_type[:100]!r})"
                return _error_response(ApiError(400, message, param="Content-Type"))
            return _error_response(
                ApiError(400, f"the request body is not a JSON object: {first.get('msg')}")
            )
        message = "; ".join(_describe(problem) for problem in problems[:5])
        return _error_response(ApiError(400, message, param=_field_path(first) or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, str(exc.detail), kind))


def _field_path(problem: Any) -> str:
    """The field a validation problem is about (``messages.0.content``): the location without
    ``body`` and without pydantic's names of union members (``str``, ``list[TextPart]``...)."""
    return ".".join(str(part) for part in problem.get("loc", ()) if part != "body" and not _is_type_tag(part))


def _is_type_tag(part: object) -> bool:
    return isinstance(part, str) and (
        "[" in part or part in ("str", "int", "float", "bool", "constrained-str")
    )


def _describe(problem: Any) -> str:
    loc = _field_path(problem)
    if problem.get("type") == "extra_forbidden":
        return f"unknown field {loc!r}"
    return f"{loc}: {problem.get('msg')} (got {problem.get('input')!r})"[:300]


def _owner(request: Request) -> str:
    """The requester's owner, as ``_Guard`` found it from the key (or the keyless local client)."""
    owner = request.scope.get(OWNER_SCOPE_KEY)
    if not isinstance(owner, str):  # never: _Guard sets it for every path that submits
        raise ApiError(
            401, "the request has no owner; send 'Authorization: Bearer <key>'", code="invalid_api_key"
        )
    return owner


def _model_state(
    state: serving.ServerState, served: ServedModels | None
) -> Callable[[Request], AsyncIterator[serving.ServerState]]:
    """The routes' dependency giving the state of the model a request names (see ``models.py``)."""
    if served is not None:
        return served.resolve

    async def only(request: Request) -> AsyncIterator[serving.ServerState]:
        yield state

    return only


def _add_routes(app: FastAPI, root: serving.ServerState, served: ServedModels | None) -> None:
    state = root
    model_state = Depends(_model_state(root, served))

    @app.get("/health")
    async def health() -> JSONResponse:
        ready = state.engine is not None
        return JSONResponse({"status": "ok" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        if served is not None:
            return served.model_list()
        limit = state.engine.session_token_limit() if state.engine is not None else None
        return ModelList(data=[ModelCard(id=state.model_name, max_model_len=limit)]).model_dump()

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = metrics.render(state.engine, dict(state.finished), len(state.in_flight))
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest, state: serving.ServerState = model_state) -> dict[str, Any]:
        state.check_model(body.model)
        engine, _ = state.require_engine()
        if body.prompt is not None:
            ids = list(engine.tokenizer.encode(body.prompt))
        else:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages or []]
            try:
                checked = check_messages(messages)
            except ValueError as exc:
                raise ApiError(400, str(exc), param="messages") from exc
            ids = list(engine.tokenizer.encode_messages(checked, body.add_generation_prompt))
        limit = engine.session_token_limit()
        return TokenizeResponse(tokens=ids, count=len(ids), max_model_len=limit).model_dump()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(
        body: ChatCompletionRequest, request: Request, state: serving.ServerState = model_state
    ) -> JSONResponse | StreamingResponse:
        state.check_model(body.model)
        return await choices.chat(state, body, request, _owner(request))

    @app.post("/v1/completions", response_model=None)
    async def completions(
        body: CompletionRequest, request: Request, state: serving.ServerState = model_state
    ) -> JSONResponse | StreamingResponse:
        state.check_model(body.model)
        return await choices.completions(state, body, request, _owner(request))

    @app.post("/v1/embeddings")
    async def embeddings_route(
        body: EmbeddingRequest, request: Request, state: serving.ServerState = model_state
    ) -> dict[str, Any]:
        state.check_model(body.model)
        return await embeddings.embed(state, body, request)
