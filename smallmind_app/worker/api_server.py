"""The in-app API server: the local models served over the OpenAI-compatible API on 127.0.0.1.

Requests from other programs are batched with the tabs' (their submits wake the worker's step
loop). No Qt: the worker calls these on its thread and turns the outcome into its signals.
"""

from __future__ import annotations

import logging
from typing import Any

from engine.paths import (
    DEFAULT_PORT,  # as `smallmind serve`'s: the Local server dialog and the settings start from it
)

__all__ = ["DEFAULT_PORT", "ApiServer"]

log = logging.getLogger(__name__)


class ApiServer:
    """At most one server, on the app's model pool (every local model by its ``model`` id)."""

    def __init__(self) -> None:
        self._server: Any = None  # smallmind_server.background.BackgroundServer while serving

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, pool: Any, engine: Any, default_model: str, port: int, api_key: str) -> str:
        """Serve every model of ``pool`` on ``port`` (``engine``: the default model's, which a request
        without ``model`` gets); the base URL. Raises OSError, ValueError or RuntimeError."""
        from smallmind_server.background import BackgroundServer

        self.stop()
        server = BackgroundServer(engine, default_model or "model", pool=pool)
        url = server.start(port=port, api_key=api_key or None)
        self._server = server
        log.info("API server at %s", url)
        return url

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def stats(self) -> dict[str, Any] | None:
        """For the dock: its URL and requests (None when it is not running)."""
        if self._server is None:
            return None
        server = self._server
        return {"url": server.url, "in_flight": server.requests_in_flight, "served": server.requests_served,
                "kinds": server.requests_by_kind}  # fmt: skip
