"""Every installed model by its ``model`` id, loaded on demand (as LM Studio and Ollama do).

``ServedModels`` sits between the routes and a ``ModelPool``: a request's ``model`` field picks the
model (absent: the default one); an id the pool does not know is a 404 naming the installed ones.
The model is leased from the pool for the length of the route (``resolve`` is a FastAPI dependency
with ``yield``): loaded first if needed (the request waits for the load, it never fails for it), and
kept loaded until the request is submitted, whose work then keeps it. Each model has its own
``ServerState`` (its engine, its name in responses, a session router whose sessions hold that
model's K/V), sharing the root state's requests in flight and counters.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from engine import BatchedInferenceEngine, EngineError
from engine.model_pool import ModelPool

from .protocol import ApiError, ModelCard, ModelList
from .serving import ServerState
from .sessions import SessionRouter

log = logging.getLogger(__name__)


class ServedModels:
    """The pool's models as per-model server states (thread-safe)."""

    def __init__(self, pool: ModelPool, root: ServerState, default_model: str) -> None:
        self.pool = pool
        self.root = root
        self.default_model = default_model
        self._states: dict[str, ServerState] = {}
        self._lock = threading.Lock()

    def ids(self) -> list[str]:
        return self.pool.model_ids()

    def model_list(self) -> dict[str, Any]:
        """``/v1/models``: every installed model; the loaded ones with their session token limit."""
        cards = []
        for model_id in self.ids():
            engine = self.pool.loaded_engine(model_id)
            limit = engine.session_token_limit() if engine is not None else None
            cards.append(ModelCard(id=model_id, max_model_len=limit))
        return ModelList(data=cards).model_dump()

    def check(self, model: str | None) -> str:
        """The id a request's ``model`` names (None: the default); 404 naming the installed ones."""
        model_id = self.default_model if model is None else model
        ids = self.ids()
        if model_id not in ids:
            installed = ", ".join(repr(i) for i in ids) or "none"
            raise ApiError(404, f"the model {model!r} does not exist; installed models: {installed}",
                           param="model", code="model_not_found")  # fmt: skip
        return model_id

    async def resolve(self, request: Request) -> AsyncIterator[ServerState]:
        """FastAPI dependency: the state of the model the request's body names, leased meanwhile.
        A body that is not a JSON object gets the root state, unleased: the route refuses it (400)
        before using it, and no model is loaded for it."""
        body = await _json_object(request)
        if body is None:
            yield self.root
            return
        model = body.get("model")
        model_id = self.check(model if isinstance(model, str) else None)
        engine = await self._lease(model_id)
        try:
            yield self._state_for(model_id, engine)
        finally:
            self.pool.release(model_id)

    async def _lease(self, model_id: str) -> BatchedInferenceEngine:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self.pool.lease, model_id)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:  # the client left while the model loaded: give the lease back
            future.add_done_callback(lambda f: self._release_if_leased(f, model_id))
            raise
        except EngineError as exc:
            raise ApiError(500, str(exc), "server_error", param="model", code="model_load_failed") from exc

    def _release_if_leased(self, future: asyncio.Future[BatchedInferenceEngine], model_id: str) -> None:
        if not future.cancelled() and future.exception() is None:
            self.pool.release(model_id)

    def _state_for(self, model_id: str, engine: BatchedInferenceEngine) -> ServerState:
        """The model's state over its engine now (a model unloaded and loaded again has a new one)."""
        identity = getattr(engine.model, "identity", None)
        with self._lock:
            state = self._states.get(model_id)
            if state is None or state.router is None or state.router.model != identity:
                router = SessionRouter(engine.store, model=identity)
                state = dataclasses.replace(self.root, engine=engine, model_name=model_id, router=router)
                self._states[model_id] = state
            state.engine = engine
            if model_id == self.default_model:  # /health and /metrics read the root's: the default's engine
                self.root.engine = engine
            return state


async def _json_object(request: Request) -> dict[str, Any] | None:
    """The body as a JSON object, or None when it is not one (the route then says why: 400)."""
    if "json" not in request.headers.get("content-type", "").lower():
        return None  # refused by the route (the body must be JSON): never parsed here
    try:
        body = await request.json()  # parsed once: the route reads the same parsed body
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return body if isinstance(body, dict) else None
