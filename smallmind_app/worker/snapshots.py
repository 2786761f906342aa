"""The worker's snapshots as plain values (dicts of numbers and strings) for its signals.

Duck-typed on purpose: this module reads engine objects (a ``GenerationResult``, a
``BatchedInferenceEngine``) without importing the engine, which only ``worker.py`` does.
"""

from __future__ import annotations

import dataclasses
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
