"""The API server on a background thread, around an engine someone else drives: start, stop, address.

For a program that already runs an engine (the desktop app, a script): ``BackgroundServer(engine,
name).start(port=DEFAULT_PORT)`` binds 127.0.0.1 (or another host, with a key), serves on its own thread
and returns the base URL; ``stop()`` cancels the requests in flight and joins the thread. Given a
``ModelPool``, it serves every model of the pool by its ``model`` id (``model_name``: the default).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Sequence

import uvicorn

from engine import BatchedInferenceEngine
from engine.model_pool import ModelPool
from engine.paths import DEFAULT_PORT

from .access import check_listen_address
from .app import create_app
from .serving import ServerState

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


class BackgroundServer:
    """One API server at a time on a daemon thread (thread-safe start/stop from one owner)."""

    def __init__(
        self,
        engine: BatchedInferenceEngine | None,
        model_name: str,
        cors_origins: Sequence[str] = (),
        pool: ModelPool | None = None,
    ) -> None:
        self.engine = engine
        self.pool = pool
        self.model_name = model_name
        self.cors_origins = tuple(cors_origins)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._state: ServerState | None = None
        self.url: str | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", api_key: str | None = None) -> str:
        """Bind and serve; returns the base URL (``http://host:port``). Raises OSError, ValueError."""
        if self.running:
            raise RuntimeError(f"the server is already running at {self.url}")
        check_listen_address(host, bool(api_key))
        # create_app checks the key
        app = create_app(self.engine, self.model_name, api_key or None, self.cors_origins, pool=self.pool)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            raise
        self._state = app.state.server
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="smallmind-api", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise OSError(f"the API server did not start on {host}:{port}")
            time.sleep(0.01)
        self._server, self._thread, self._socket = server, thread, sock
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{sock.getsockname()[1]}"
        return self.url

    def stop(self) -> None:
        """Cancel the requests in flight, stop serving and join the thread."""
        if self._state is not None:
            self._state.in_flight.cancel_all()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = self._state = None
        self.url = None

    @property
    def requests_in_flight(self) -> int:
        return len(self._state.in_flight) if self._state is not None else 0

    @property
    def requests_by_kind(self) -> dict[str, int]:
        """API requests received since the server started, by kind: chat, json_object, json_schema,
        tools, completions, embeddings."""
        if self._state is None:
            return {}
        with self._state.lock:
            return dict(self._state.kinds)

    @property
    def requests_served(self) -> int:
        """API requests that ended (any finish reason) since the server started."""
        if self._state is None:
            return 0
        with self._state.lock:
            return sum(self._state.finished.values())
