"""The worker's snapshots as plain values (dicts of numbers and strings) for its signals.

Duck-typed on purpose: this module reads engine objects (a ``GenerationResult``, a
``BatchedInferenceEngine``) without importing the engine.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


def result_dict(result: Any) -> dict[str, Any]:
    data = result.to_dict()
    data["token_ids"] = list(result.token_ids)
    data["generated_tokens"] = result.generated_tokens
    return data


def stats_dict(engine: Any) -> dict[str, Any]:
    kv = engine.store.get_stats()
    metrics = engine.metrics.snapshot()
    sessions = [
        {
            "session_id": info.session_id.value,
            "n_tokens": info.n_tokens,
            "max_tokens": info.max_tokens,
            "reserved_bytes": info.reserved_bytes,
            "used_bytes": info.used_bytes,
            "pinned": info.pinned,
            "last_used": info.last_used,
        }
        for info in engine.store.sessions()
    ]
    kv_values = dataclasses.asdict(kv) | {"hit_rate": kv.hit_rate, "token_reuse_ratio": kv.token_reuse_ratio}
    options = engine.cache_options
    return {
        "kv": kv_values,
        "metrics": dataclasses.asdict(metrics),
        "sessions": sessions,  # least recently used (next to be evicted) first
        "limits": {
            "enabled": options.enabled,
            "max_bytes_total": options.max_bytes_total,
            "max_sessions": options.max_sessions,
            "session_token_limit": engine.session_token_limit(),
        },
    }


def model_info(engine: Any, path: str, kv_dtype: str) -> dict[str, Any]:
    """The loaded model for the window: its name and file, its shape, the tab's token limit."""
    c = engine.model.config
    return {
        "name": c.name,
        "path": path,
        "file_name": Path(path).name,
        "architecture": c.architecture,
        "n_layers": c.n_layers,
        "n_heads": c.n_heads,
        "n_kv_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_size": c.hidden_size,
        "vocab_size": c.vocab_size,
        "context_length": c.context_length,
        "bytes_per_token": engine.model.kv_shape(kv_dtype).bytes_per_token,
        "session_token_limit": engine.session_token_limit(),
        # no chat template in the file: a base model, which continues text (the window says so)
        "base_model": not engine.tokenizer.has_own_template,
    }
