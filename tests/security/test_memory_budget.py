"""Lowering "Memory limit, all sessions" (and with it the per-session limit) below a session's size
evicts that session to the disk tier, as LRU eviction does: the conversation's next turn loads its
K/V from disk instead of recomputing them. Before, such a session was dropped (nothing written)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from engine import KvCacheOptions, LruKvCacheStore, Model, SessionId, Tokenizer
from tests.engine.conftest import rel_diff, tiny  # noqa: F401  (the tiny model, loaded once per session)
from tests.engine.test_kv_disk import disk_store, random_ids, turn
from tests.engine.test_kv_store import TOL

A = SessionId("tab-a")
PROMPT = random_ids(200, 21)  # 200 tokens of float32 K/V: 100 KiB at the tiny model's 512 B a token
SMALLER = 48 * 1024  # below the session's size (96 tokens): it no longer fits one session's limit


def lower(store: LruKvCacheStore) -> KvCacheOptions:
    options = dataclasses.replace(store.options, max_bytes_total=SMALLER, max_bytes_per_session=SMALLER)
    store.update_options(options)
    return options


def test_lowering_the_budget_writes_an_idle_session_to_disk(
    tiny: tuple[Model, Tokenizer],  # noqa: F811
    tmp_path: Path,
) -> None:
    model, _ = tiny
    store = disk_store(model, tmp_path)
    turn(model, store, A, PROMPT)
    assert store.get_stats().current_bytes > SMALLER
    lower(store)
    assert A not in store and store.flush_disk()
    stats = store.get_stats()
    assert (stats.disk_sessions, stats.disk_writes, stats.evictions) == (1, 1, 1)
    assert len(list(tmp_path.glob("*.kv"))) == 1
    store.close()
    restarted = disk_store(model, tmp_path, max_bytes_total=SMALLER, max_bytes_per_session=SMALLER)
    _check_prefix_comes_back(model, restarted)


def test_lowering_the_budget_while_a_request_runs_writes_its_session_at_the_end(
    tiny: tuple[Model, Tokenizer],  # noqa: F811
    tmp_path: Path,
) -> None:
    model, _ = tiny
    store = disk_store(model, tmp_path)
    store.prepare(A, model.kv_shape(), PROMPT, 256, pin=True)  # a request holds the session
    model.forward(PROMPT, store.try_get(A))
    lower(store)
    assert A in store  # in use: not evicted under the running request
    store.unpin(A)  # the request ends: the session goes, to disk
    assert A not in store and store.flush_disk()
    assert store.get_stats().disk_sessions == 1
    _check_prefix_comes_back(model, store)


def _check_prefix_comes_back(model: Model, store: LruKvCacheStore) -> None:
    limit = store.options.effective_max_tokens(model.kv_shape(), 256)
    prompt = [*PROMPT[: limit - 3], 9, 8, 7]  # fits the lowered limit; shares all but 3 tokens
    logits, n_reused, _ = turn(model, store, A, prompt)
    stats = store.get_stats()
    assert stats.disk_hits == 1 and n_reused == stats.disk_reused_tokens == limit - 3
    assert rel_diff(logits, model.forward(prompt)[n_reused:]) <= TOL
