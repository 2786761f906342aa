"""The engine's exception types: one base class, one subclass per thing that can go wrong.

Every message names the problem and the numbers involved, so the app can show it as-is.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ModelFileError(EngineError, ValueError):
    """A model file that cannot be used: not a GGUF, truncated, missing tensors, bad shapes."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedModelError(ModelFileError):
    """A valid GGUF file of an architecture, tokenizer or tensor type this engine cannot run."""


class ModelNotFoundError(EngineError, FileNotFoundError):
    """No model file where one was expected (not downloaded yet, or a wrong path)."""


class UnknownModelError(EngineError, LookupError):
    """A request named a model the pool does not know; the message names the ones it does."""

    def __init__(self, model_id: str, available: list[str]) -> None:
        self.model_id = model_id
        self.available = available
        known = ", ".join(repr(name) for name in available) if available else "none"
        super().__init__(f"the model {model_id!r} is not installed; installed models: {known}")

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return str(self.args[0])


class ModelDownloadError(EngineError):
    """Fetching the default model failed (pip failed, wrong checksum, cancelled)."""


class ContextOverflowError(EngineError, ValueError):
    """A prompt that does not fit the token limit of its session or the model's context."""

    def __init__(self, n_tokens: int, limit: int, what: str = "prompt") -> None:
        self.n_tokens = n_tokens
        self.limit = limit
        super().__init__(f"{what} has {n_tokens} tokens, more than the limit of {limit} tokens")


class CacheBudgetError(EngineError, MemoryError):
    """The KV cache cannot make room: every session that could be evicted is pinned."""


class QueueFullError(EngineError):
    """The request queue is full; the caller may try again later."""


class EngineStoppedError(EngineError):
    """The engine was stopped while the request waited or ran."""


class RemoteEngineError(EngineError):
    """An OpenAI-compatible endpoint could not be used; the message names the endpoint and the cause."""


class DocumentIndexError(EngineError):
    """The document index file cannot be used (corrupt, made by a newer version, no FTS5)."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"the document index {self.path}: {reason}")


class LibraryNotFoundError(EngineError, KeyError):
    """No document library of that name; the message lists the names there are."""

    def __init__(self, name: str, known: list[str]) -> None:
        self.name = name
        self.known = known
        there = ", ".join(repr(k) for k in known) if known else "none yet"
        super().__init__(f"no document library named {name!r} (libraries: {there})")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])
