"""``GET /metrics``: the engine's KV-cache stats and batching metrics in Prometheus' text format.

Names are the runtime spec's (``hit_rate``, ``reused_tokens``, ``average_batch_size`` ...) under the
prefixes ``smallmind_kv_cache_`` and ``smallmind_batching_``; the server adds the API requests by
endpoint and finish reason and the requests in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from engine import BatchedInferenceEngine

_KV_COUNTERS = ("hits", "misses", "evictions", "reused_tokens", "prompt_tokens", "shared_prefix_tokens")
_KV_GAUGES = ("current_sessions", "current_bytes", "used_bytes", "peak_bytes", "pooled_bytes",
              "max_bytes_total", "pinned_sessions", "hit_rate", "token_reuse_ratio")  # fmt: skip
_BATCH_COUNTERS = ("steps", "submitted", "completed", "cancelled", "timed_out", "failed", "rejected",
                   "prompt_tokens", "generated_tokens", "preemptions")  # fmt: skip
_BATCH_GAUGES = ("average_batch_size", "max_batch_size_seen", "average_batch_wait_ms", "average_queue_depth",
                 "queue_depth", "running", "in_flight", "tokens_per_second", "prefill_tokens_per_second",
                 "decode_tokens_per_second", "ttft_p50_ms", "ttft_p95_ms", "inter_token_p50_ms",
                 "inter_token_p95_ms", "inter_token_max_ms", "waiting_for_memory")  # fmt: skip


def _family(name: str, kind: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {float(value):.6g}" for labels, value in samples]
    return lines


def _labels(**values: str) -> str:
    inner = ",".join(f'{key}="{value}"' for key, value in values.items())
    return "{" + inner + "}"


def render(
    engine: BatchedInferenceEngine | None,
    finished: Mapping[tuple[str, str], int],
    in_flight: int,
) -> str:
    """The whole /metrics page."""
    lines = _family("smallmind_up", "gauge", [("", 1.0 if engine is not None else 0.0)])
    lines += _family("smallmind_server_requests_in_flight", "gauge", [("", in_flight)])
    lines += _family(
        "smallmind_server_requests_finished",
        "counter",
        [(_labels(endpoint=e, finish_reason=r), n) for (e, r), n in sorted(finished.items())],
    )
    if engine is None:
        return "\n".join(lines) + "\n"
    stats = engine.store.get_stats()
    snapshot = engine.metrics.snapshot()
    for prefix, source, counters, gauges in (
        ("smallmind_kv_cache_", stats, _KV_COUNTERS, _KV_GAUGES),
        ("smallmind_batching_", snapshot, _BATCH_COUNTERS, _BATCH_GAUGES),
    ):
        for name in counters:
            lines += _family(prefix + name, "counter", [("", getattr(source, name))])
        for name in gauges:
            lines += _family(prefix + name, "gauge", [("", getattr(source, name))])
    return "\n".join(lines) + "\n"
