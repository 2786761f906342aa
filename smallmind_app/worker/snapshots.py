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


_SUMMED = {"steps", "queue_depth", "running", "tokens_per_second", "prefill_tokens_per_second",
           "decode_tokens_per_second", "submitted", "completed", "cancelled", "timed_out", "failed",
           "rejected", "prompt_tokens", "generated_tokens", "prompt_tokens_per_second", "preemptions",
           "waiting_for_memory", "drafted_tokens", "accepted_tokens", "average_queue_depth"}  # fmt: skip


def merged_metrics(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Several engines' metrics as one (the dock's Batcher group): counts and rates summed, averages
    weighted by steps, percentiles and maxima the largest (the slowest model's)."""
    if len(snapshots) == 1:
        return dict(snapshots[0])
    out: dict[str, Any] = {}
    steps = sum(s["steps"] for s in snapshots)
    for name in snapshots[0]:
        values = [s[name] for s in snapshots]
        if name in _SUMMED:
            out[name] = sum(values)
        elif name in ("average_batch_size", "average_batch_wait_ms", "mean_accepted_length"):
            out[name] = (
                sum(v * s["steps"] for v, s in zip(values, snapshots, strict=True)) / steps if steps else 0.0
            )
        else:
            out[name] = max(values)
    return out


def pool_stats_dict(pool: Any, default_id: str) -> dict[str, Any]:
    """``stats_dict`` of a model pool: one KV store (its sessions each with their model), every
    model's batching metrics merged, and "models": each model's state, weights, KV and speed."""
    kv = pool.store.get_stats()
    names = {pool.identity_of(m): m for m in pool.model_ids() if pool.identity_of(m)}
    sessions = [
        {
            "session_id": info.session_id.value,
            "model": names.get(info.session_id.model, ""),
            "n_tokens": info.n_tokens,
            "max_tokens": info.max_tokens,
            "reserved_bytes": info.reserved_bytes,
            "used_bytes": info.used_bytes,
            "pinned": info.pinned,
            "last_used": info.last_used,
        }
        for info in pool.store.sessions()
    ]
    snapshots = {m: dataclasses.asdict(pool.metrics(m).snapshot()) for m in pool.model_ids()}
    kv_by_model = pool.kv_by_model()
    models = [
        {"model_id": m.model_id, "state": m.state, "weights_bytes": m.weights_bytes, "requests": m.n_requests,
         "default": m.model_id == default_id, "tokens_per_second": snapshots[m.model_id]["tokens_per_second"],
         **kv_by_model.get(m.model_id, {})}
        for m in pool.models()
    ]  # fmt: skip
    used = [snapshots[m["model_id"]] for m in models if m["state"] == "loaded" or m["requests"]]
    kv_values = dataclasses.asdict(kv) | {"hit_rate": kv.hit_rate, "token_reuse_ratio": kv.token_reuse_ratio}
    options = pool.store.options
    engine = pool.loaded_engine(default_id)
    limit = engine.session_token_limit() if engine is not None else 0
    return {
        "kv": kv_values,
        "metrics": merged_metrics(used or [snapshots[default_id]]),
        "sessions": sessions,  # least recently used (next to be evicted) first
        "models": models,
        "limits": {
            "enabled": options.enabled,
            "max_bytes_total": options.max_bytes_total,
            "max_sessions": options.max_sessions,
            "session_token_limit": limit,
            "max_loaded_bytes": pool.options.max_loaded_bytes,
            "loaded_bytes": pool.loaded_bytes,
        },
    }
