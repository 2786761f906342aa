"""``smallmind serve``: the API server without a window.

It serves every installed model (the models directory's GGUF files and ``--model``) by its ``model``
id, loading on demand under a memory budget (``engine.model_pool``); a request without ``model`` gets
the default one (``--model``, else the installed default), loaded at start.
The server answers at once (``/health`` says 503 while that model loads); Ctrl+C or SIGTERM cancels
every request in flight (streams end with ``finish_reason: "cancelled"``), waits briefly for the
connections to close and stops the engine. Binding anything but a loopback address needs an API
key; several keys may be given, each its own owner of sessions (``access.py``). Keys are never
logged or printed.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Generator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import uvicorn

from engine import BatchedInferenceEngine, BatchingOptions, GgufFile, Model, Tokenizer
from engine.model_pool import ModelPool, ModelPoolOptions, installed_models
from engine.paths import DEFAULT_PORT

from .access import ApiKeys, check_listen_address, is_loopback
from .app import create_app
from .serving import ServerState

__all__ = ["ServeOptions", "is_loopback", "load_engine", "model_name_for", "run"]

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 5


@dataclass(frozen=True, slots=True)
class ServeOptions:
    model_path: Path
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = ()  # each its own owner; empty: keyless, loopback only
    cors_origins: tuple[str, ...] = ()
    pool: ModelPoolOptions | None = None  # how many models stay loaded (None: the defaults)
    batching: BatchingOptions | None = None  # the batcher's and kernels' options (None: the defaults)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65_535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        ApiKeys(self.api_keys)  # ValueError for a key no client could send (never showing it)
        check_listen_address(self.host, bool(self.api_keys))


def _keys_text(n_keys: int) -> str:
    if n_keys == 0:
        return "no API key: answers requests to localhost only"
    return "API key required" if n_keys == 1 else f"API key required; {n_keys} keys, each its own sessions"


def _activations_text(asked: str, engine: BatchedInferenceEngine) -> str:
    """'' for the default float32 activations, else what the loaded engine runs."""
    if asked == "float32":
        return ""
    if engine.activations == "int8":
        return "; activations: int8 (8-bit: faster batches, approximate results)"
    return "; activations: float32 (int8 asked for; this computer cannot run them: no AVX-512 VNNI or numba)"


def model_name_for(path: Path) -> str:
    """The name clients use in ``model``: the file name without ``.gguf`` (never a path)."""
    return path.name.removesuffix(".gguf")


def load_engine(model_path: Path) -> BatchedInferenceEngine:
    gguf_file = GgufFile(model_path)
    engine = BatchedInferenceEngine(
        Model.from_gguf(gguf_file), Tokenizer.from_gguf(gguf_file), BatchingOptions()
    )
    engine.start()
    return engine


class _Server(uvicorn.Server):
    """uvicorn's server, whose first Ctrl+C / SIGTERM cancels the requests in flight."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        n = self.state.in_flight.cancel_all()
        if not self.should_exit:
            log.warning("stopping (signal %d): %d request(s) in flight cancelled", sig, n)
        super().handle_exit(sig, frame)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Like uvicorn's, without re-raising the signal afterwards: we exit with our own status."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def run(options: ServeOptions, out: TextIO | None = None) -> int:
    """Serve until Ctrl+C / SIGTERM; the exit status."""
    out = out or sys.stdout
    models = installed_models([options.model_path])
    default = next(iter(models))  # --model's id (listed first)
    batching = options.batching or BatchingOptions()
    pool = ModelPool(models, options.pool, batching)
    app = create_app(None, default, options.api_keys, options.cors_origins, pool=pool)
    state: ServerState = app.state.server
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, access_log=False)  # fmt: skip
    server = _Server(config, state)
    failure: list[BaseException] = []

    def load() -> None:
        try:
            engine = pool.lease(default)
        except Exception as exc:  # reported below; the server stops
            failure.append(exc)
            server.should_exit = True
            return
        state.attach(engine)
        pool.release(default)
        out.write(f"model {default} loaded{_activations_text(batching.activations, engine)}; ready\n")
        out.flush()

    loader = threading.Thread(target=load, name="smallmind-load", daemon=True)
    host = f"[{options.host}]" if ":" in options.host else options.host
    others = (
        f"; also {', '.join(m for m in models if m != default)}, loaded on demand" if len(models) > 1 else ""
    )
    out.write(f"SmallMind API on http://{host}:{options.port}/v1 (model {default}{others}; "
              f"{_keys_text(len(options.api_keys))}); Ctrl+C stops\n")  # fmt: skip
    out.flush()
    pool.start()
    loader.start()
    try:
        server.run()
    finally:
        state.in_flight.cancel_all()
        loader.join(timeout=60)
        pool.stop()
    if failure:
        raise failure[0]
    if not server.started:
        out.write(f"could not listen on {options.host}:{options.port}\n")
        return 1
    out.write("stopped\n")
    return 0
