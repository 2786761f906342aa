"""The in-app API server: the loaded engine served over the OpenAI-compatible API on 127.0.0.1.

Requests from other programs are batched with the tabs' (their submits wake the worker's step
loop). No Qt: the worker calls these on its thread and turns the outcome into its signals.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_PORT = 8080  # as `smallmind serve`'s: the Local server dialog and the settings start from it


class ApiServer:
    """At most one server, on the engine it was started with (a new model stops it)."""

    def __init__(self) -> None:
        self._server: Any = None  # smallmind_server.background.BackgroundServer while serving

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self, engine: Any, model_path: str, port: int, api_key: str) -> str:
        """Serve ``engine`` on ``port``; the base URL. Raises OSError, ValueError or RuntimeError."""
        from smallmind_server.background import BackgroundServer

        self.stop()
        server = BackgroundServer(engine, Path(model_path or "model").stem)
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
        return {"url": server.url, "in_flight": server.requests_in_flight, "served": server.requests_served}
