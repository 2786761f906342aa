"""SmallMind's engine: Llama, Gemma 3 and Qwen models in NumPy (+ numba kernels), KV-cache store, batcher.

No Qt here: everything is usable headless (scripts, tests, the terminal chat).
"""

from .batching import BatchedInferenceEngine, BatchingOptions, RequestHandle
from .errors import (
    CacheBudgetError,
    ContextOverflowError,
    EngineError,
    EngineStoppedError,
    ModelDownloadError,
    ModelFileError,
    ModelNotFoundError,
    QueueFullError,
    UnknownModelError,
    UnsupportedModelError,
)
from .generation import GenerationEvent, GenerationResult
from .gguf import GgufFile, ModelConfig
from .kv_cache import KvCacheEntry, ModelShape
from .kv_store import APP_OWNER, KvCacheOptions, KvCacheStats, LruKvCacheStore, SessionId, SessionInfo
from .metrics import InMemoryRuntimeMetrics, MetricsSnapshot
from .model import Model
from .sampling import InferenceOptions
from .tokenizer import Tokenizer

__all__ = [
    "APP_OWNER",
    "BatchedInferenceEngine",
    "BatchingOptions",
    "CacheBudgetError",
    "ContextOverflowError",
    "EngineError",
    "EngineStoppedError",
    "GenerationEvent",
    "GenerationResult",
    "GgufFile",
    "InMemoryRuntimeMetrics",
    "InferenceOptions",
    "KvCacheEntry",
    "KvCacheOptions",
    "KvCacheStats",
    "LruKvCacheStore",
    "MetricsSnapshot",
    "Model",
    "ModelConfig",
    "ModelDownloadError",
    "ModelFileError",
    "ModelNotFoundError",
    "ModelShape",
    "QueueFullError",
    "RequestHandle",
    "SessionId",
    "SessionInfo",
    "Tokenizer",
    "UnknownModelError",
    "UnsupportedModelError",
]
