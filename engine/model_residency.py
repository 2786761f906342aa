"""Which local models are in memory: the pool's half that loads and unloads (``model_pool.py`` is
the half that serves requests and takes turns).

Each model the pool knows has a ``ModelSlot``: its file, its engine while loaded, its requests.
``Residency`` keeps the loaded models' weights within ``ModelPoolOptions.max_loaded_bytes``: a load
(on the loader thread) first unloads idle models, least recently used first; a model with a request
running, queued or waiting for its load, or leased, is never unloaded, so a load that needs its room
waits for it to become idle. A model bigger than the whole budget loads when no other is loaded. A
model idle for ``idle_ttl_s`` is unloaded (``expire_idle``, called by the pool's steps). Unloading
keeps the model's KV sessions (the shared store evicts them as usual).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batching import BatchedInferenceEngine
from .errors import EngineError, EngineStoppedError, UnknownModelError
from .gguf import GgufFile
from .metrics import InMemoryRuntimeMetrics
from .model import Model
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)

GiB = 1 << 30
ROOM_POLL_S = 0.25  # a load waiting for a busy model to become idle looks again this often
Loader = Callable[[Path], tuple[Model, Tokenizer]]
EngineMaker = Callable[["ModelSlot", Model, Tokenizer], BatchedInferenceEngine]


def default_max_loaded_bytes() -> int:
    """Half the machine's memory (at least 1 GiB): room for models beside the KV cache and the rest."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume 8 GiB
        total = 8 * GiB
    return max(GiB, total // 2)


@dataclass(frozen=True, slots=True)
class ModelPoolOptions:
    """How many models stay loaded: a memory budget for their weights and an idle time-to-live."""

    max_loaded_bytes: int = field(default_factory=default_max_loaded_bytes)
    idle_ttl_s: float = 3600.0  # unloaded after this long without a request; 0 = kept until room is needed

    def __post_init__(self) -> None:
        value = self.max_loaded_bytes
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"ModelPoolOptions.max_loaded_bytes must be a whole number ≥ 1, got {value!r}")
        ttl = self.idle_ttl_s
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl <= 30 * 86_400:
            raise ValueError(
                f"ModelPoolOptions.idle_ttl_s must be in [0, 2592000] s (0 = no limit), got {ttl!r}"
            )


def load_files(path: Path) -> tuple[Model, Tokenizer]:
    """A model and its tokenizer from one GGUF file (the pool's default loader)."""
    f = GgufFile(path)
    return Model.from_gguf(f), Tokenizer.from_gguf(f)


class ModelSlot:
    """A model the pool knows: its file, its engine while loaded, its requests and its share."""

    def __init__(self, model_id: str, path: Path) -> None:
        self.model_id = model_id
        self.path = path
        self.engine: BatchedInferenceEngine | None = None
        self.identity: str | None = None  # Model.identity, known after a load
        self.loading = False
        self.error: str | None = None  # why the last load failed
        self.nbytes = 0  # weights in memory now
        self.known_bytes: int | None = None  # what the last load took: the next one's estimate
        self.load_s: float | None = None
        self.n_requests = 0  # submitted through the pool, not finished (waiting for the load too)
        self.pending: list[Any] = []  # the pool's requests waiting for the load
        self.leases = 0  # callers holding its engine to submit to it (lease()): it stays loaded
        self.last_used = time.monotonic()
        self.used_s = 0.0  # compute time of its steps: who steps next (model_pool.py)
        self.was_ready = False
        self.prompt_tokens = self.reused_tokens = self.n_finished = 0
        self.metrics = InMemoryRuntimeMetrics()  # its engines' (one per load): counted across loads

    @property
    def estimate_bytes(self) -> int:
        if self.known_bytes is not None:
            return self.known_bytes
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    @property
    def busy(self) -> bool:
        """A request running, queued or waiting for the load, or a lease held."""
        engine = self.engine
        return (
            self.n_requests > 0
            or self.leases > 0
            or bool(self.pending)
            or (engine is not None and engine.has_work)
        )


class Residency:
    """The slots and the loader thread; see the module docstring. ``lock`` guards every slot's
    state (never held while a load or a step runs); ``changed`` is notified when a load ends, a
    request ends or a model goes."""

    def __init__(
        self,
        options: ModelPoolOptions,
        make_engine: EngineMaker,
        loader: Loader,
        on_loaded: Callable[[ModelSlot, list[Any]], None],
        on_load_failed: Callable[[ModelSlot, list[Any], str], None],
    ) -> None:
        self.options = options
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.slots: dict[str, ModelSlot] = {}
        self.stopped = False
        self._make_engine = make_engine
        self._loader = loader
        self._on_loaded = on_loaded  # (slot, its pending requests): hand them to the new engine
        self._on_load_failed = on_load_failed
        self._queue: list[ModelSlot] = []
        self._thread: threading.Thread | None = None

    # -- the catalog ---------------------------------------------------------------------------
    def add(self, path: Path, model_id: str | None = None) -> str:
        with self.lock:
            for slot in self.slots.values():
                if same_file(slot.path, path):
                    return slot.model_id
            if model_id is not None and (not model_id.strip() or model_id in self.slots):
                raise ValueError(f"model id {model_id!r} is empty or taken (file {path})")
            name = model_id or unique_model_id(path, self.slots)
            self.slots[name] = ModelSlot(name, path)
            return name

    def slot(self, model_id: str) -> ModelSlot:
        with self.lock:
            slot = self.slots.get(model_id)
            if slot is None:
                raise UnknownModelError(model_id, list(self.slots))
            return slot

    def loaded(self) -> list[ModelSlot]:
        with self.lock:
            return [s for s in self.slots.values() if s.engine is not None]

    @property
    def loaded_bytes(self) -> int:
        return sum(s.nbytes for s in self.loaded())

    # -- loading -------------------------------------------------------------------------------
    def request_load(self, slot: ModelSlot) -> None:
        """(Lock held.) Queue the slot's load on the loader thread, unless loaded or loading."""
        if slot.engine is not None or slot.loading or self.stopped:
            return
        slot.loading, slot.error = True, None
        self._queue.append(slot)
        self.changed.notify_all()
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(
                target=self._loader_main, name="smallmind-model-loader", daemon=True
            )
            self._thread.start()

    def lease(self, model_id: str, timeout_s: float | None) -> BatchedInferenceEngine:
        """See ``ModelPool.lease``."""
        slot = self.slot(model_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self.lock:
            slot.leases += 1
            try:
                self.request_load(slot)
                while slot.engine is None:
                    if self.stopped:
                        raise EngineStoppedError("the model pool is stopped")
                    if not slot.loading:  # the load failed
                        raise EngineError(slot.error or f"the model {model_id!r} did not load")
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"the model {model_id!r} did not load within {timeout_s} s")
                    self.changed.wait(left)
            except BaseException:
                slot.leases -= 1
                raise
            slot.last_used = time.monotonic()
            return slot.engine

    def release(self, model_id: str) -> None:
        slot = self.slot(model_id)
        with self.lock:
            slot.leases = max(0, slot.leases - 1)
            slot.last_used = time.monotonic()
            self.changed.notify_all()

    def _loader_main(self) -> None:
        while True:
            with self.lock:
                while not self._queue and not self.stopped:
                    self.changed.wait()
                if self.stopped:
                    return
                slot = self._queue[0]
            failed: list[Any] | None = None
            try:
                self._make_room(slot, slot.estimate_bytes)
                self._load(slot)
            except Exception as exc:  # the slot's requests fail with the reason; the pool goes on
                log.warning(
                    "loading %s failed: %s", slot.path, exc, exc_info=not isinstance(exc, EngineError)
                )
                with self.lock:
                    slot.error = f"loading the model {slot.model_id!r} failed: {exc}"
                    failed, slot.pending = slot.pending, []
            finally:
                with self.lock:
                    self._queue.remove(slot)
                    slot.loading = False
                    self.changed.notify_all()
            if failed is not None:  # told once the slot says "failed"
                self._on_load_failed(slot, failed, slot.error or "")

    def _load(self, slot: ModelSlot) -> None:
        started = time.perf_counter()
        # beside the other models' steps: the kernels' warm-up a load runs is safe from any thread (no
        # kernel uses numba's threading layer; the pool's words are taken under its lock)
        model, tokenizer = self._loader(slot.path)
        engine = self._make_engine(slot, model, tokenizer)
        nbytes = int(model.weights.nbytes)
        with self.lock:
            slot.engine, slot.identity, slot.nbytes, slot.known_bytes = engine, model.identity, nbytes, nbytes
            slot.load_s = time.perf_counter() - started
            slot.last_used = time.monotonic()
            pending, slot.pending = slot.pending, []  # handed over under the lock: none is missed
        log.info("model %s loaded in %.2f s (%.0f MiB); %.0f of %.0f MiB of models loaded", slot.model_id,
                 slot.load_s, nbytes / 2**20, self.loaded_bytes / 2**20,
                 self.options.max_loaded_bytes / 2**20)  # fmt: skip
        self._on_loaded(slot, pending)
        self.fit_budget(keep=slot)

    # -- the budget ----------------------------------------------------------------------------
    def _make_room(self, slot: ModelSlot, n_bytes: int) -> None:
        """Unload idle models, least recently used first, until ``n_bytes`` more fit the budget; wait
        while the only ones left are busy. A model bigger than the budget waits to be alone."""
        while not self.stopped:
            with self.lock:
                others = [s for s in self.slots.values() if s.engine is not None and s is not slot]
                if not others or sum(s.nbytes for s in others) + n_bytes <= self.options.max_loaded_bytes:
                    return
                idle = sorted((s for s in others if not s.busy), key=lambda s: s.last_used)
                if not idle:
                    log.info("loading %s waits for a loaded model to finish its requests", slot.model_id)
                    self.changed.wait(ROOM_POLL_S)
                    continue
            self.unload(idle[0], "to make room for " + slot.model_id)

    def fit_budget(self, keep: ModelSlot | None = None) -> None:
        """After a load (whose size was estimated) or a smaller budget: unload idle models, least
        recently used first, while the loaded ones are over the budget."""
        while True:
            with self.lock:
                loaded = [s for s in self.slots.values() if s.engine is not None]
                if sum(s.nbytes for s in loaded) <= self.options.max_loaded_bytes:
                    return
                idle = sorted((s for s in loaded if s is not keep and not s.busy), key=lambda s: s.last_used)
                if not idle:
                    return
            self.unload(idle[0], "over the memory limit for loaded models")

    def expire_idle(self) -> None:
        """Unload the models idle for longer than their time-to-live."""
        ttl = self.options.idle_ttl_s
        if ttl <= 0:
            return
        now = time.monotonic()
        with self.lock:
            expired = [s for s in self.slots.values()
                       if s.engine is not None and not s.busy and now - s.last_used >= ttl]  # fmt: skip
        for slot in expired:
            self.unload(slot, f"idle for {ttl:g} s")

    def next_expiry_s(self) -> float | None:
        """Seconds until an idle model's time-to-live ends (None: no idle model, or no TTL)."""
        ttl, now = self.options.idle_ttl_s, time.monotonic()
        if ttl <= 0:
            return None
        with self.lock:
            ends = [
                s.last_used + ttl - now for s in self.slots.values() if s.engine is not None and not s.busy
            ]
        return max(0.0, min(ends)) if ends else None

    def unload(self, slot: ModelSlot, why: str) -> bool:
        """Unload an idle model (its KV sessions stay in the store); False if it is busy."""
        with self.lock:
            engine = slot.engine
            if engine is None or slot.busy:
                return False
            slot.engine, slot.nbytes = None, 0
            self.changed.notify_all()
        engine.stop(timeout=0)  # waits for a step of it that is still ending; nothing is running
        log.info("model %s unloaded (%s)", slot.model_id, why)
        return True

    def stop(self, timeout: float) -> list[tuple[ModelSlot, Any]]:
        """Stop the loader; unload every model. Returns the requests that waited for a load."""
        with self.lock:
            self.stopped = True
            pending = [(s, p) for s in self.slots.values() for p in s.pending]
            for s in self.slots.values():
                s.pending = []
            self.changed.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self.lock:
            engines = [s.engine for s in self.slots.values() if s.engine is not None]
            for s in self.slots.values():
                s.engine, s.nbytes = None, 0
        for engine in engines:
            engine.stop(timeout)
        return pending


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def unique_model_id(path: Path, taken: Iterable[str]) -> str:
    """A model's id: its file name without .gguf, with -2, -3... when another file has that name."""
    taken = set(taken)
    base = path.name.removesuffix(".gguf")
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def installed_models(paths: Iterable[str | os.PathLike[str]] = ()) -> dict[str, Path]:
    """Model id -> file for ``paths`` and every GGUF file in the models directory (``smallmind serve``
    and the app serve them all); the same file twice is listed once."""
    from .download import installed_models as in_models_dir

    found: dict[str, Path] = {}
    for path in [Path(p).expanduser() for p in paths] + [m.path for m in in_models_dir()]:
        if not any(same_file(path, known) for known in found.values()):
            found[unique_model_id(path, found)] = path
    return found
