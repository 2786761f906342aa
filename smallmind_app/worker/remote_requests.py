"""Remote engines for the worker: the endpoints of Settings → Engines, which tab answers with which
one, their replies and their figures. No Qt: the worker calls these on its thread.

A remote engine's events arrive on its own thread; the worker hops them to its thread (a queued
signal) before they join the local engine's events, so a tab cannot tell which engine answered.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from engine import EngineError, GenerationEvent, GenerationResult, InferenceOptions
from engine.remote import RemoteEngine, RemoteRequestHandle

from ..engines.endpoints import LOCAL_ENGINE
from ..wording import REMOTE_ENGINE_GONE, Problem

log = logging.getLogger(__name__)

ENDPOINT_TEST_TIMEOUT_S = 10.0  # Settings → Engines → Test connection

EndpointSpec = tuple[str, str, str, str]  # base URL, model, API key, name


class RemoteRequests:
    """Endpoint id -> its ``RemoteEngine``; conversation id -> the endpoint that answers it."""

    def __init__(self) -> None:
        self._remotes: dict[str, RemoteEngine] = {}  # endpoint id -> its engine (see set_endpoints)
        self._specs: dict[str, EndpointSpec] = {}  # what each remote was made from
        self._endpoint_of: dict[str, str] = {}  # conversation id -> endpoint id ("local" when absent)
        self._requests: dict[str, str] = {}  # conversation id -> endpoint id of its running reply
        self._last: dict[str, dict[str, Any]] = {}  # endpoint id -> its last reply's figures

    def __bool__(self) -> bool:
        return bool(self._remotes)

    def set_endpoints(self, endpoints: list) -> None:
        """Dicts of id, name, base_url, model, api_key. An endpoint that changed or went is stopped
        (its replies in flight end with an error)."""
        wanted = {str(e["id"]): (str(e["base_url"]), str(e.get("model") or ""), str(e.get("api_key") or ""),
                                 str(e.get("name") or "")) for e in endpoints}  # fmt: skip
        for endpoint_id, remote in list(self._remotes.items()):
            if wanted.get(endpoint_id) != self._specs.get(endpoint_id):
                remote.stop()
                del self._remotes[endpoint_id]
                self._specs.pop(endpoint_id, None)
        for endpoint_id, spec in wanted.items():
            if endpoint_id in self._remotes:
                continue
            base_url, model, api_key, name = spec
            try:
                self._remotes[endpoint_id] = RemoteEngine(base_url, model or None, api_key or None, name=name)
            except ValueError as exc:
                log.warning("endpoint %s is not usable: %s", name, exc)
                continue
            self._specs[endpoint_id] = spec

    def route(self, conversation_id: str, engine_id: str) -> None:
        """The conversation's next replies go to ``engine_id`` ("local" or an endpoint id)."""
        if engine_id == LOCAL_ENGINE:
            self._endpoint_of.pop(conversation_id, None)
        else:
            self._endpoint_of[conversation_id] = engine_id

    def answers(self, conversation_id: str) -> bool:
        """Whether a remote engine answers this conversation (else the local one)."""
        return conversation_id in self._endpoint_of

    def submit(
        self,
        conversation_id: str,
        messages: list,
        sampling: dict,
        on_event: Callable[[GenerationEvent], None],
    ) -> tuple[RemoteRequestHandle, int] | Problem:
        """Send the reply to the conversation's server; its handle and max new tokens, or why not."""
        endpoint_id = self._endpoint_of[conversation_id]
        remote = self._remotes.get(endpoint_id)
        if remote is None:
            return Problem(REMOTE_ENGINE_GONE)
        try:
            options = InferenceOptions.from_dict(sampling)
            handle = remote.submit(messages, options, session_id=conversation_id, on_event=on_event)
        except (EngineError, ValueError) as exc:
            log.info("request of %s refused: %s", conversation_id, exc)
            return Problem(f"Not sent: {exc}")
        self._requests[conversation_id] = endpoint_id
        return handle, options.max_new_tokens

    def is_current(self, handle: Any, event: GenerationEvent) -> bool:
        """Whether a remote event belongs to the conversation's running request (not one given up)."""
        return isinstance(handle, RemoteRequestHandle) and handle.request_id == event.request_id

    def record(self, conversation_id: str, result: GenerationResult) -> None:
        """A remote reply ended: its figures are its endpoint's last (the dock shows them)."""
        if endpoint_id := self._requests.get(conversation_id):
            self._last[endpoint_id] = {
                "last_ttft_ms": result.ttft_ms, "last_tokens_per_s": result.decode_tokens_per_s,
                "last_tokens": result.generated_tokens, "last_finish_reason": result.finish_reason,
            }  # fmt: skip

    def author(self, conversation_id: str) -> dict[str, str]:
        """Who gives the conversation's running reply: {"model": the server's model, "engine": its name}."""
        endpoint_id = self._requests.get(conversation_id)
        remote = self._remotes.get(endpoint_id or "")
        if remote is None:
            return {}
        return {"model": remote.model or "the server's default model", "engine": remote.name}

    def finished(self, conversation_id: str) -> bool:
        """The conversation's reply ended; True when a remote engine gave it."""
        return self._requests.pop(conversation_id, None) is not None

    def forget(self, conversation_id: str) -> None:
        """A closed tab: its route and its running request are forgotten."""
        self._endpoint_of.pop(conversation_id, None)
        self._requests.pop(conversation_id, None)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Each remote engine's figures for the stats dock: its own tokens/s and TTFT."""
        out: dict[str, dict[str, Any]] = {}
        for endpoint_id, remote in self._remotes.items():
            m = remote.metrics.snapshot()
            out[endpoint_id] = {
                "name": remote.name, "model": remote.model or "", "url": remote.api_url,
                "tokens_per_second": m.tokens_per_second, "ttft_p50_ms": m.ttft_p50_ms,
                "in_flight": m.in_flight, "completed": m.completed, "failed": m.failed + m.timed_out,
                **self._last.get(endpoint_id, {}),
            }  # fmt: skip
        return out

    def stop(self) -> None:
        for remote in self._remotes.values():
            remote.stop()
        self._remotes.clear()


def probe_endpoint(base_url: str, api_key: str, report: Callable[[str, list, str], None]) -> None:
    """List a server's models on a short-lived thread (never blocking the caller's):
    ``report(base_url, model ids, why not ("" = it works))``."""

    def work() -> None:
        try:
            remote = RemoteEngine(base_url, api_key=api_key or None, timeout_s=ENDPOINT_TEST_TIMEOUT_S)
            models = remote.list_models()
        except (EngineError, ValueError) as exc:
            report(base_url, [], str(exc))
            return
        except Exception as exc:  # report anything: the dialog waits for an answer
            log.exception("testing %s failed", base_url)
            report(base_url, [], f"{type(exc).__name__}: {exc}")
            return
        report(base_url, models, "")

    threading.Thread(target=work, name="smallmind-endpoint-test", daemon=True).start()
