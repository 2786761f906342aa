"""The KV-cache store against references: cached turns give the uncached forward's logits, and every
counter and byte count equals a hand-worked scenario; a hypothesis state machine checks the budget
and LRU invariants over random sequences of operations.

Byte arithmetic used below: ``bytes_per_token = 2 (K and V) * n_layers * n_kv_heads * head_dim *
itemsize``. The tiny model (2 layers, 2 KV heads, head dim 16, float32) holds 2*2*2*16*4 = 512 bytes a
token; its context is 256 tokens. Entries grow in 64-token steps (or 1/16 of their capacity, if more).
Store-only tests use ``ModelShape(1, 1, 2)``: 2*1*1*2*4 = 16 bytes a token, a 256-token buffer 4,096.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from engine import (
    CacheBudgetError,
    ContextOverflowError,
    KvCacheEntry,
    KvCacheOptions,
    LruKvCacheStore,
    Model,
    ModelShape,
    SessionId,
    Tokenizer,
)
from tests.engine.conftest import rel_diff

TOL = 1e-4  # cached vs uncached logits, relative to the largest logit
TOL_F16 = 1e-2  # the same with a float16 cache (K/V rounded to 11 significant bits)
SMALL = ModelShape(1, 1, 2)  # 16 bytes a token
BPT = SMALL.bytes_per_token
BUF = 256 * BPT  # 4,096: one 256-token buffer of SMALL
TINY_BPT = 512  # the tiny model's bytes per token (see the module docstring)

SYSTEM = "You are a helpful AI assistant named SmolLM. Give a short and helpful answer."
TURNS = [
    ("What is a large language model?", "A program that reads text and predicts the next word."),
    ("Why is the sky blue?", "Because the air scatters blue light from the sun more than red light."),
    ("Write a short poem about the sea.", None),
]


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def sid(name: str) -> SessionId:
    return SessionId(name)


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    """The reference common-prefix length: a plain loop, sharing no code with KvCacheEntry."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def conversation(tok: Tokenizer, turns: Sequence[tuple[str, str | None]]) -> tuple[list[list[int]], ...]:
    """Each turn's prompt ids, and the reply ids that follow each prompt in the next one.

    The reply ids are what greedy generation of that reply leaves in the cache (the closing
    <|im_end|> is sampled but never fed back), so turn k+1 can reuse ``len(prompt_k) + len(reply_k)``.
    """
    messages = [{"role": "system", "content": SYSTEM}]
    prompts = []
    for user, reply in turns:
        messages.append({"role": "user", "content": user})
        prompts.append(tok.encode_messages(messages))
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    im_end = tok.encode("<|im_end|>")[0]
    replies = []
    for prev, nxt in pairwise(prompts):
        assert nxt[: len(prev)] == prev  # premise: the chat template only appends
        replies.append(nxt[len(prev) : nxt.index(im_end, len(prev))])
    return prompts, replies


def chat_turn(
    model: Model, store: LruKvCacheStore, session: SessionId, prompt: Sequence[int]
) -> tuple[np.ndarray, int, KvCacheEntry]:
    """What the engine does for one request: prepare, then prefill only the tokens not reused."""
    shape = model.kv_shape(store.options.dtype)
    entry, n_reused = store.prepare(session, shape, prompt, model.config.context_length)
    return model.forward(prompt[n_reused:], entry), n_reused, entry  # (T, V)


def decode(model: Model, entry: KvCacheEntry, ids: Sequence[int]) -> None:
    """Teacher-forced greedy decode: the reply's tokens enter the cache one forward at a time."""
    for token in ids:
        model.forward([token], entry)


def assert_matches_uncached(model: Model, prompt: Sequence[int], logits: np.ndarray, n_reused: int) -> None:
    reference = model.forward(prompt)[n_reused:]  # a fresh cache: the whole prompt recomputed
    assert logits.shape == reference.shape
    assert rel_diff(logits, reference) <= TOL


def order(store: LruKvCacheStore) -> list[str]:
    return [info.session_id.value for info in store.sessions()]


def grow(store: LruKvCacheStore, name: str, n_tokens: int) -> KvCacheEntry:
    """Reserve room for ``n_tokens`` in a (new or existing) SMALL session, like a prefill would."""
    entry = store.try_get(sid(name)) or store.get_or_create(sid(name), SMALL)
    entry.ensure_capacity(n_tokens)
    return entry


def snapshot(store: LruKvCacheStore) -> tuple[Any, ...]:
    return store.get_stats(), store.sessions()


# ---------------------------------------------------------------------------------------------
# Multi-turn reuse, divergence, prefix sharing: tiny model and SmolLM2
# ---------------------------------------------------------------------------------------------
def check_three_turns(model: Model, tok: Tokenizer) -> tuple[LruKvCacheStore, KvCacheEntry, list[int]]:
    """A 3-turn chat through prepare + forward equals the uncached forward of every prompt.

    Turn 1 reuses 0 (a miss); turn k+1 reuses prompt_k + reply_k, the whole previous turn, since the
    template only appends. On the tiny model: prompts of 50, 82 and 122 tokens, replies of 15 and 20,
    so reused 0, 50 + 15 = 65 and 82 + 20 = 102: hits 2, misses 1, token_reuse_ratio 167/254.
    """
    prompts, replies = conversation(tok, TURNS)
    expected = [0] + [len(p) + len(r) for p, r in zip(prompts, replies, strict=False)]
    store, tab = LruKvCacheStore(), sid("tab-1")
    for k, prompt in enumerate(prompts):
        logits, n_reused, entry = chat_turn(model, store, tab, prompt)
        assert n_reused == expected[k]
        assert_matches_uncached(model, prompt, logits, n_reused)
        if k < len(replies):
            decode(model, entry, replies[k])
    stats = store.get_stats()
    assert (stats.hits, stats.misses, stats.hit_rate) == (2, 1, 2 / 3)
    assert stats.reused_tokens == sum(expected)
    assert stats.prompt_tokens == sum(len(p) for p in prompts)
    assert stats.token_reuse_ratio == sum(expected) / sum(len(p) for p in prompts)
    assert stats.shared_prefix_tokens == 0
    return store, entry, prompts[-1]


def check_divergence(model: Model, tok: Tokenizer) -> None:
    """An edited first message: the entry is trimmed to the common prefix and stays correct.

    On the tiny model the 31-token system turn and "<|im_start|>user\nWhat is a" are kept: 38 tokens.
    """
    store, entry, last_prompt = check_three_turns(model, tok)
    edited = [("What is a small language model?", TURNS[0][1]), *TURNS[1:]]
    prompt = conversation(tok, edited)[0][-1]
    expected = first_difference(last_prompt, prompt)  # the cache holds exactly last_prompt
    n_system = len(tok.encode_messages([{"role": "system", "content": SYSTEM}], add_generation_prompt=False))
    assert n_system < expected < len(conversation(tok, TURNS[:1])[0][0])  # inside the first user message
    before = store.get_stats()
    logits, n_reused, entry = chat_turn(model, store, sid("tab-1"), prompt)
    assert n_reused == expected
    assert_matches_uncached(model, prompt, logits, n_reused)
    assert entry.token_ids.tolist() == prompt
    after = store.get_stats()
    assert (after.hits, after.reused_tokens) == (before.hits + 1, before.reused_tokens + expected)


def check_prefix_sharing(model: Model, tok: Tokenizer) -> None:
    """Two tabs with the same system prompt: the second copies the shared rows and stays correct."""
    store = LruKvCacheStore()
    system = {"role": "system", "content": SYSTEM}
    prompt_a = tok.encode_messages([system, {"role": "user", "content": "Why is the sky blue?"}])
    prompt_b = tok.encode_messages([system, {"role": "user", "content": "Hello! How are you today?"}])
    n_system = len(tok.encode_messages([system], add_generation_prompt=False))
    shared = first_difference(prompt_a, prompt_b)  # the system turn plus "<|im_start|>user\n"
    assert shared > n_system
    _, reused_a, entry_a = chat_turn(model, store, sid("tab-a"), prompt_a)
    logits_b, reused_b, entry_b = chat_turn(model, store, sid("tab-b"), prompt_b)
    assert (reused_a, reused_b) == (0, shared)
    assert_matches_uncached(model, prompt_b, logits_b, reused_b)
    assert not np.shares_memory(entry_a.keys(0), entry_b.keys(0))  # a copy, not an alias
    stats = store.get_stats()
    assert (stats.hits, stats.misses) == (1, 1)
    assert stats.shared_prefix_tokens == stats.reused_tokens == shared
    # tab A's rows were not touched by tab B's prefill: its next turn is still exact
    follow_up = [*prompt_a, *tok.encode("Because of the air."), *tok.encode("<|im_end|>")]
    logits, n_reused, _ = chat_turn(model, store, sid("tab-a"), follow_up)
    assert n_reused == len(prompt_a)
    assert_matches_uncached(model, follow_up, logits, n_reused)


def test_three_turns_equal_uncached_forward(tiny: tuple[Model, Tokenizer]) -> None:
    check_three_turns(*tiny)


def test_edited_earlier_message_trims_to_common_prefix(tiny: tuple[Model, Tokenizer]) -> None:
    check_divergence(*tiny)


def test_second_tab_copies_shared_system_prompt(tiny: tuple[Model, Tokenizer]) -> None:
    check_prefix_sharing(*tiny)


@pytest.mark.smollm2
def test_three_turns_equal_uncached_forward_smollm2(smollm2: tuple[Model, Tokenizer]) -> None:
    check_divergence(*smollm2)  # runs the three turns first


@pytest.mark.smollm2
def test_second_tab_copies_shared_system_prompt_smollm2(smollm2: tuple[Model, Tokenizer]) -> None:
    check_prefix_sharing(*smollm2)


# ---------------------------------------------------------------------------------------------
# Stats arithmetic: a hand-worked scenario with explicit token ids on the tiny model
# ---------------------------------------------------------------------------------------------
def test_stats_hand_worked(tiny: tuple[Model, Tokenizer]) -> None:
    model, _ = tiny
    store, s1, s2 = LruKvCacheStore(), sid("s1"), sid("s2")
    turn1 = list(range(100, 130))  # 30 tokens
    generated = list(range(200, 208))  # 8 decoded tokens
    turn2 = turn1 + generated + list(range(300, 312))  # 50 tokens, the first 38 cached

    def step(session: SessionId, prompt: list[int], expected_reused: int) -> KvCacheEntry:
        logits, n_reused, entry = chat_turn(model, store, session, prompt)
        assert n_reused == expected_reused
        assert_matches_uncached(model, prompt, logits, n_reused)
        return entry

    decode(model, step(s1, turn1, 0), generated)  # miss: reused 0 of 30; s1 holds 38
    step(s1, turn2, 38)  # hit: reused 38 of 50; s1 holds 50
    tab2 = turn1[:20] + list(range(400, 410))  # 30 tokens, the first 20 also in s1
    step(s2, tab2, 20)  # hit: 20 copied from s1 (shared_prefix_tokens 20)
    edited = turn2[:25] + list(range(500, 510))  # 35 tokens: s1's own 25 beat s2's 20, no copy
    step(s1, edited, 25)
    step(s2, tab2, 29)  # the same prompt again: the last token is recomputed for its logits
    stats = store.get_stats()
    # prompts 30+50+30+35+30 = 175, reused 0+38+20+25+29 = 112; lookups 5, one miss
    assert (stats.prompt_tokens, stats.reused_tokens, stats.shared_prefix_tokens) == (175, 112, 20)
    assert (stats.hits, stats.misses, stats.hit_rate, stats.token_reuse_ratio) == (4, 1, 0.8, 112 / 175)
    # two 64-token buffers of 512 bytes a token (capacities grow in 64-token steps); s1 holds 35, s2 30
    assert (stats.current_sessions, stats.current_bytes, stats.peak_bytes) == (2, 65_536, 65_536)
    assert stats.used_bytes == (35 + 30) * TINY_BPT == 33_280
    assert (stats.evictions, stats.pinned_sessions, stats.pooled_bytes) == (0, 0, 0)
    assert stats.max_bytes_total == KvCacheOptions().max_bytes_total


def test_longer_shared_prefix_replaces_own_shorter_one() -> None:
    store = LruKvCacheStore()
    for name, ids in (("s1", list(range(100))), ("s2", [*range(10), 999])):
        entry, _ = store.prepare(sid(name), SMALL, ids)
        entry.ensure_capacity(len(ids))
        entry.append(ids)
    entry, n_reused = store.prepare(sid("s2"), SMALL, [*range(60), 7])
    # s2's own prefix is 10 tokens, s1 holds the first 60: all 60 rows are copied from s1
    assert n_reused == 60 and entry.token_ids.tolist() == list(range(60))
    # lookups: s1 a miss; s2's first prompt copied s1's [0..9] (10); then the 60 above
    stats = store.get_stats()
    assert (stats.shared_prefix_tokens, stats.reused_tokens, stats.prompt_tokens) == (70, 70, 100 + 11 + 61)
    assert (stats.hits, stats.misses) == (2, 1)


def test_stats_start_at_zero() -> None:
    stats = LruKvCacheStore().get_stats()
    assert (stats.hit_rate, stats.token_reuse_ratio) == (0.0, 0.0)
    assert (stats.current_bytes, stats.peak_bytes, stats.hits, stats.misses) == (0, 0, 0, 0)


def test_pinned_sessions_and_peak_bytes() -> None:
    store = LruKvCacheStore()
    store.prepare(sid("a"), SMALL, [1, 2, 3], pin=True)
    store.prepare(sid("b"), SMALL, [1, 2, 4], pin=True)
    grow(store, "a", 512)  # a: 512 tokens = 8,192 bytes
    grow(store, "b", 256)  # b: 256 tokens = 4,096 bytes
    assert store.get_stats().pinned_sessions == 2
    store.unpin(sid("b"))
    store.remove(sid("a"))  # pinned: it goes when its request ends
    stats = store.get_stats()
    assert (stats.pinned_sessions, stats.current_sessions, stats.current_bytes) == (1, 2, 8_192 + BUF)
    store.unpin(sid("a"))
    stats = store.get_stats()
    assert (order(store), stats.current_bytes, stats.peak_bytes) == (["b"], BUF, 8_192 + BUF)
    assert stats.pooled_bytes == 8_192  # a's buffer waits for reuse


# ---------------------------------------------------------------------------------------------
# Limits: context overflow, LRU by count and by bytes, pinning, CacheBudgetError
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "context_length", "limit"),
    [
        (KvCacheOptions(max_tokens_per_session=40), 256, 40),
        (KvCacheOptions(max_bytes_per_session=50 * TINY_BPT), 256, 50),  # 25,600 bytes / 512
        (KvCacheOptions(), 60, 60),  # the model's context
    ],
    ids=["max_tokens_per_session", "max_bytes_per_session", "context_length"],
)
def test_prompt_over_effective_limit_raises(options: KvCacheOptions, context_length: int, limit: int) -> None:
    store, shape = LruKvCacheStore(options), ModelShape(2, 2, 16)
    assert shape.bytes_per_token == TINY_BPT
    assert options.effective_max_tokens(shape, context_length) == limit
    with pytest.raises(ContextOverflowError) as info:
        store.prepare(sid("a"), shape, list(range(limit + 1)), context_length)
    assert (info.value.n_tokens, info.value.limit) == (limit + 1, limit)
    assert f"{limit + 1}" in str(info.value) and f"{limit}" in str(info.value)
    assert len(store) == 0 and store.get_stats().prompt_tokens == 0  # nothing happened
    entry, _ = store.prepare(sid("a"), shape, list(range(limit)), context_length)  # exactly fits
    assert entry.max_tokens == limit


def test_lru_by_session_count() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_sessions=2))
    store.get_or_create(sid("a"), SMALL)
    store.get_or_create(sid("b"), SMALL)
    store.touch(sid("a"))  # b is now the least recently used
    store.get_or_create(sid("c"), SMALL)
    assert order(store) == ["a", "c"]
    store.prepare(sid("a"), SMALL, [1, 2])  # a lookup touches too
    store.get_or_create(sid("d"), SMALL)
    assert order(store) == ["a", "d"]
    assert store.get_stats().evictions == 2
    assert store.try_get(sid("b")) is None and sid("c") not in store


def test_lru_by_bytes() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=3 * BUF, max_bytes_per_session=2 * BUF))
    for name in "abc":
        grow(store, name, 256)  # 256 tokens each: 3 * 4,096 = 12,288 = the whole budget
    store.touch(sid("a"))  # order b, c, a
    grow(store, "d", 256)  # +4,096: b goes
    assert (order(store), store.get_stats().evictions) == (["c", "a", "d"], 1)
    grow(store, "a", 512)  # a: 256 -> 512 tokens, +4,096: c goes (a itself is kept; growth is no touch)
    stats = store.get_stats()
    assert (order(store), stats.evictions) == (["a", "d"], 2)
    assert (stats.current_bytes, stats.peak_bytes) == (2 * BUF + BUF, 3 * BUF)
    assert stats.pooled_bytes == 0  # a's old 4,096 buffer does not fit the pool (room 0)


def test_pinned_sessions_are_never_evicted() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=3 * BUF, max_bytes_per_session=3 * BUF))
    for name in "abc":
        grow(store, name, 256)
    store.pin(sid("a"))  # a is the LRU but pinned: b goes instead
    grow(store, "d", 256)
    assert order(store) == ["a", "c", "d"]


def test_budget_error_when_all_else_is_pinned_disturbs_nothing() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=3 * BUF, max_bytes_per_session=3 * BUF))
    for name in "abc":
        grow(store, name, 256)
        store.pin(sid(name))
    store.get_or_create(sid("d"), SMALL)  # no bytes yet: fine
    before = snapshot(store)
    with pytest.raises(CacheBudgetError) as info:
        grow(store, "d", 256)
    message = str(info.value)
    assert "4,096" in message and "max_bytes_total=12,288" in message and "3 other session(s)" in message
    assert snapshot(store) == before


def test_failed_growth_evicts_nothing_when_eviction_cannot_help() -> None:
    """Bug fixed: the store evicted unpinned sessions one by one and only then found it could not make
    room, so a request that failed anyway had destroyed other tabs' caches."""
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=3 * BUF, max_bytes_per_session=3 * BUF))
    for name in "abc":
        grow(store, name, 256)  # 4,096 each, the budget is full
    store.pin(sid("b"))
    store.pin(sid("c"))
    before = snapshot(store)
    with pytest.raises(CacheBudgetError, match="needs 8,192 more bytes"):
        grow(store, "c", 768)  # c: 768 tokens = 12,288, +8,192; evicting a frees only 4,096
    assert snapshot(store) == before
    assert store.get_stats().evictions == 0


def test_shared_prefix_copy_without_room_keeps_own_tokens() -> None:
    """With no room to copy a longer shared prefix, prepare falls back to the session's own prefix.

    Bug fixed: copy_prefix_from emptied the entry before asking for room, so after a failed copy the
    entry held 0 tokens while prepare reported its own prefix as reused: the caller would have
    prefilled the rest of the prompt at the wrong positions, on top of an empty cache.
    """
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=3 * BUF, max_bytes_per_session=3 * BUF))
    a, _ = store.prepare(sid("a"), SMALL, list(range(300)), pin=True)  # a miss
    a.ensure_capacity(512)  # 512 tokens = 8,192
    a.append(range(300))
    b, _ = store.prepare(sid("b"), SMALL, [0, 1, 2, 3, 500])  # copies [0..3] from a
    b.ensure_capacity(256)  # 256 tokens = 4,096: the budget is full
    b.append([500])
    # copying a's first 290 tokens needs b to grow to 290 tokens at least (+544): nothing may be evicted
    entry, n_reused = store.prepare(sid("b"), SMALL, [*range(290), 7])
    assert entry is b and n_reused == 4
    assert b.n_tokens == 4 and b.token_ids.tolist() == [0, 1, 2, 3]  # its own prefix, intact
    stats = store.get_stats()
    assert (stats.shared_prefix_tokens, stats.reused_tokens, stats.hits, stats.misses) == (4, 8, 2, 1)
    assert stats.current_bytes == 3 * BUF and stats.evictions == 0 and a.n_tokens == 300


def test_new_session_over_max_sessions_with_all_pinned() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_sessions=2))
    for name in "ab":
        store.get_or_create(sid(name), SMALL)
        store.pin(sid(name))
    before = snapshot(store)
    with pytest.raises(CacheBudgetError, match="max_sessions=2"):
        store.prepare(sid("c"), SMALL, [1, 2, 3])
    assert snapshot(store) == before


def test_session_smaller_than_one_token_disturbs_nothing() -> None:
    """Bug fixed: a new session that could not hold one token evicted the LRU session before failing."""
    store = LruKvCacheStore(KvCacheOptions(max_sessions=1, max_bytes_per_session=8))  # 8 < 16 bytes
    store.get_or_create(sid("a"), ModelShape(1, 1, 1))  # 8 bytes a token: fits
    with pytest.raises(CacheBudgetError, match="smaller than one token"):
        store.get_or_create(sid("b"), SMALL)
    assert order(store) == ["a"] and store.get_stats().evictions == 0


# ---------------------------------------------------------------------------------------------
# Capacity ladder, buffer reuse, persistence
# ---------------------------------------------------------------------------------------------
def test_capacity_steps_and_byte_accounting() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_tokens_per_session=600))
    entry = store.get_or_create(sid("a"), SMALL)
    assert (entry.capacity, store.get_stats().current_bytes) == (0, 0)
    # 64-token steps (or 1/16 of the capacity, if more), at least what is needed, capped at max_tokens
    for needed, capacity in [(1, 64), (64, 64), (65, 128), (300, 320), (590, 600)]:
        entry.ensure_capacity(needed)
        assert entry.capacity == capacity
        assert entry.reserved_bytes == store.get_stats().current_bytes == capacity * BPT
    stats = store.get_stats()
    assert (stats.peak_bytes, stats.pooled_bytes) == (600 * BPT, (64 + 128 + 320) * BPT)  # old buffers pooled
    with pytest.raises(ContextOverflowError):
        entry.ensure_capacity(601)
    big = LruKvCacheStore().get_or_create(sid("b"), SMALL)  # max_tokens_per_session=4096
    big.ensure_capacity(1500)
    assert (big.capacity, big.max_tokens) == (1536, 4096)
    big.ensure_capacity(1537)  # a step of 1536 / 16 = 96 tokens, rounded up to 64: 128
    assert big.capacity == 1664


@pytest.mark.parametrize("max_tokens", [600, 4096])
def test_reserved_stays_close_to_used_across_a_growing_conversation(max_tokens: int) -> None:
    """Reserved bytes stay within 10% plus one 64-token step of used bytes at every token, while the
    copies made by growth stay bounded (geometric): at most ~17 copied tokens per token held."""
    store = LruKvCacheStore(KvCacheOptions(max_tokens_per_session=max_tokens))
    entry = store.get_or_create(sid("a"), SMALL)
    copied, n_growths = 0, 0
    for n in range(1, max_tokens + 1):  # a conversation growing one token at a time
        before = entry.capacity
        entry.ensure_capacity(n)
        if entry.capacity != before:
            copied += entry.n_tokens
            n_growths += 1
        entry.append([n % 100])
        stats = store.get_stats()
        assert stats.current_bytes <= 1.1 * stats.used_bytes + 64 * BPT, (n, entry.capacity)
    assert copied <= 17 * max_tokens
    assert n_growths <= 2 + max_tokens // 64


def test_released_buffers_are_reused_and_decode_allocates_once_a_step(
    tiny: tuple[Model, Tokenizer], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, _ = tiny
    store = LruKvCacheStore()
    handed_out: list[np.ndarray] = []
    allocate = store.allocate

    def spy(
        entry: KvCacheEntry, shape: ModelShape, capacity: int, min_capacity: int | None = None
    ) -> np.ndarray:
        handed_out.append(allocate(entry, shape, capacity, min_capacity))
        return handed_out[-1]

    monkeypatch.setattr(store, "allocate", spy)
    prompt = list(range(10, 40))
    _, _, entry = chat_turn(model, store, sid("tab-1"), prompt)
    assert len(handed_out) == 1 and entry.capacity == 64  # one 64-token buffer for the 30-token prefill
    decode(model, entry, range(100, 300))  # 200 tokens, 230 in all: one allocation per 64-token step
    assert [b.shape[3] for b in handed_out] == [64, 128, 192, 256]
    store.remove(sid("tab-1"))
    pooled = (64 + 128 + 192 + 256) * TINY_BPT  # the growth leftovers and the last buffer wait for reuse
    assert store.get_stats().pooled_bytes == pooled
    for k in range(3):  # open a tab, chat, close it: the same 64-token buffer every time
        _, n_reused, entry = chat_turn(model, store, sid(f"tab-{k + 2}"), prompt)
        decode(model, entry, range(100, 120))
        assert n_reused == 0 and store.get_stats().pooled_bytes == pooled - 64 * TINY_BPT
        store.remove(sid(f"tab-{k + 2}"))
    assert len(handed_out) == 7 and all(buffer is handed_out[0] for buffer in handed_out[4:])


def test_growth_takes_what_fits_when_a_whole_step_does_not() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=200 * BPT, max_bytes_per_session=200 * BPT))
    grow(store, "b", 128)
    store.pin(sid("b"))  # b holds 128 tokens and may not be evicted
    entry = grow(store, "a", 64)
    entry.ensure_capacity(65)  # a step would be 128 tokens: over the budget, so what fits: 72
    assert entry.capacity == 72 and store.get_stats().current_bytes == 200 * BPT
    with pytest.raises(CacheBudgetError, match="needs 16 more bytes"):
        entry.ensure_capacity(73)  # 1 token more: 201 > 200


def test_no_persistence_releases_at_end_of_request() -> None:
    store = LruKvCacheStore(KvCacheOptions(persist_across_requests=False))
    prompt = list(range(20))
    entry, _ = store.prepare(sid("a"), SMALL, prompt, pin=True)
    entry.ensure_capacity(len(prompt))
    entry.append(prompt)
    first = entry.keys(0)
    store.unpin(sid("a"))  # the request ended
    stats = store.get_stats()
    assert (len(store), stats.current_bytes, stats.pooled_bytes) == (0, 0, 64 * BPT)  # one 64-token step
    entry, n_reused = store.prepare(sid("a"), SMALL, prompt, pin=True)
    entry.ensure_capacity(len(prompt))
    assert n_reused == 0 and np.shares_memory(first, entry.keys(0))  # a miss, on the pooled buffer
    assert (store.get_stats().hits, store.get_stats().misses) == (0, 2)


# ---------------------------------------------------------------------------------------------
# Live option changes
# ---------------------------------------------------------------------------------------------
def test_shrinking_max_sessions_evicts_lru_at_once() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_sessions=3))
    for name in "abc":
        grow(store, name, 256)
    store.touch(sid("a"))  # order b, c, a
    store.update_options(KvCacheOptions(max_sessions=1))
    assert (order(store), store.get_stats().evictions, store.get_stats().current_bytes) == (["a"], 2, BUF)


def test_shrinking_max_bytes_total_evicts_lru_at_once() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=4 * BUF, max_bytes_per_session=BUF))
    for name in "abc":
        grow(store, name, 256)
    store.update_options(KvCacheOptions(max_bytes_total=2 * BUF, max_bytes_per_session=BUF))
    stats = store.get_stats()
    assert (order(store), stats.current_bytes, stats.evictions) == (["b", "c"], 2 * BUF, 1)


def test_shrinking_token_limit_drops_bigger_sessions_and_sets_limits() -> None:
    store = LruKvCacheStore(KvCacheOptions(max_tokens_per_session=1024))
    grow(store, "a", 512)  # 512 tokens
    grow(store, "b", 256)  # 256 tokens
    store.update_options(KvCacheOptions(max_tokens_per_session=256))
    assert order(store) == ["b"] and store.get_stats().evictions == 1
    assert store.try_get(sid("b")).max_tokens == 256  # type: ignore[union-attr]
    store.update_options(KvCacheOptions(max_tokens_per_session=2048))
    assert store.try_get(sid("b")).max_tokens == 2048  # type: ignore[union-attr]


def test_pinned_session_over_a_shrunk_limit_goes_at_unpin() -> None:
    """Bug fixed: a session pinned while max_tokens/bytes_per_session shrank kept its oversized buffer
    (and the right to fill it) forever, although update_options promises pinned sessions go at unpin."""
    store = LruKvCacheStore(KvCacheOptions(max_tokens_per_session=1024))
    grow(store, "a", 512)  # 512 tokens = 8,192 bytes
    grow(store, "b", 256)
    store.pin(sid("a"))
    store.update_options(KvCacheOptions(max_tokens_per_session=300))
    assert order(store) == ["a", "b"]  # a's request still runs
    store.unpin(sid("a"))
    stats = store.get_stats()
    assert (order(store), stats.current_bytes, stats.evictions) == (["b"], BUF, 1)


@pytest.mark.parametrize(
    "change", [{"dtype": "float16"}, {"enabled": False}, {"persist_across_requests": False}]
)
def test_option_changes_that_clear_the_store(change: dict[str, object]) -> None:
    store = LruKvCacheStore()
    for name in "ab":
        grow(store, name, 256)
    store.pin(sid("b"))
    store.update_options(KvCacheOptions(**change))  # type: ignore[arg-type]
    assert order(store) == ["b"]  # the pinned one goes when its request ends
    store.unpin(sid("b"))
    assert len(store) == 0 and store.get_stats().current_bytes == 0


# ---------------------------------------------------------------------------------------------
# float16 cache
# ---------------------------------------------------------------------------------------------
def test_float16_cache_halves_bytes_and_stays_close(tiny: tuple[Model, Tokenizer]) -> None:
    model, tok = tiny
    store = LruKvCacheStore(KvCacheOptions(dtype="float16"))
    prompts, replies = conversation(tok, TURNS[:2])
    logits, n_reused, entry = chat_turn(model, store, sid("tab"), prompts[0])
    decode(model, entry, replies[0])
    logits, n_reused, entry = chat_turn(model, store, sid("tab"), prompts[1])
    assert n_reused == len(prompts[0]) + len(replies[0])
    assert entry.keys(0).dtype == np.float16
    assert store.get_stats().current_bytes == entry.capacity * TINY_BPT // 2  # half the float32 size
    reference = model.forward(prompts[1])[n_reused:]
    assert rel_diff(logits, reference) <= TOL_F16


# ---------------------------------------------------------------------------------------------
# Thread safety: a GUI-like reader while the engine-like thread mutates
# ---------------------------------------------------------------------------------------------
def check_snapshot(store: LruKvCacheStore, bpt: int) -> None:
    stats = store.get_stats()
    assert 0 <= stats.used_bytes <= stats.current_bytes <= stats.peak_bytes
    assert stats.current_bytes + stats.pooled_bytes <= stats.max_bytes_total
    assert 0.0 <= stats.hit_rate <= 1.0 and 0.0 <= stats.token_reuse_ratio <= 1.0
    assert stats.pinned_sessions <= stats.current_sessions
    for info in store.sessions():
        assert info.used_bytes <= info.reserved_bytes and info.reserved_bytes % bpt == 0


def test_reader_thread_sees_consistent_snapshots(tiny: tuple[Model, Tokenizer]) -> None:
    model, _ = tiny
    budget = 2 * 64 * TINY_BPT  # two sessions' 64-token buffers (prompts of 21-49 tokens): the third evicts
    store = LruKvCacheStore(KvCacheOptions(max_bytes_total=budget, max_bytes_per_session=budget))
    stop, errors, reads = threading.Event(), [], Counter[str]()

    def reader() -> None:
        while not stop.is_set():
            try:
                check_snapshot(store, TINY_BPT)
                reads["ok"] += 1
            except Exception as exc:  # reported by the main thread
                errors.append(exc)
                return

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        rng = np.random.default_rng(0)
        for step in range(30):
            session = sid(f"tab-{step % 3}")
            prompt = [*range(10, 30), *rng.integers(40, 500, size=int(rng.integers(1, 30))).tolist()]
            entry, n_reused = store.prepare(session, model.kv_shape(), prompt, 256, pin=True)
            model.forward(prompt[n_reused:], entry)
            store.unpin(session)
            if step % 10 == 9:
                store.remove(session)
                store.update_options(KvCacheOptions(max_bytes_total=budget, max_bytes_per_session=budget))
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert reads["ok"] > 0
    check_snapshot(store, TINY_BPT)
    assert store.get_stats().evictions > 0 and store.get_stats().hits > 0


# ---------------------------------------------------------------------------------------------
# Property test: random operation sequences keep the byte budget and the LRU order
# ---------------------------------------------------------------------------------------------
NAMES = ("a", "b", "c")
BASE = list(range(1, 700))  # prompts start with a prefix of BASE, so sessions share prefixes


def token_limit(options: KvCacheOptions) -> int:
    return min(options.max_tokens_per_session, options.max_bytes_per_session // BPT)


@st.composite
def store_options(draw: st.DrawFn) -> KvCacheOptions:
    total = draw(st.integers(1, 6)) * BUF
    return KvCacheOptions(
        max_sessions=draw(st.integers(1, 4)),
        max_bytes_total=total,
        max_bytes_per_session=min(total, draw(st.sampled_from([BUF // 2, BUF, 2 * BUF, 4 * BUF]))),
        max_tokens_per_session=draw(st.sampled_from([100, 256, 300, 600, 1024])),
    )


prompts = st.builds(
    lambda k, tail: BASE[:k] + tail,
    st.sampled_from([0, 5, 100, 300]),
    st.lists(st.integers(700, 703), min_size=1, max_size=40),
)


class StoreMachine(RuleBasedStateMachine):
    """Keeps the expected LRU order, pins and counters; checks every eviction took the LRU first."""

    def __init__(self) -> None:
        super().__init__()
        options = KvCacheOptions(max_sessions=3, max_bytes_total=4 * BUF, max_bytes_per_session=2 * BUF)
        self.store = LruKvCacheStore(options)
        self.order: list[str] = []  # least recently used first
        self.pins: Counter[str] = Counter()
        self.doomed: set[str] = set()
        self.lookups: list[tuple[int, int]] = []  # (prompt tokens, reused tokens) per prepare

    def _pinned(self, name: str) -> bool:
        return self.pins[name] > 0

    def _adopt(
        self,
        touched: str | None = None,
        keep: str | None = None,
        removed: Sequence[str] = (),
        spared: Any = (),
    ) -> None:
        """Check the store's order after a rule against the expected one, then adopt it.

        ``removed`` must be gone; anything else gone was evicted and must be the least recently
        used unpinned sessions (other than ``keep``, the session that needed room, and ``spared``,
        possible sources of a shared-prefix copy, which are pinned during the copy).
        """
        expected = [s for s in self.order if s != touched] + ([touched] if touched else [])
        actual = order(self.store)
        assert actual == [s for s in expected if s in actual]
        assert not set(removed) & set(actual)
        evicted = [s for s in expected if s not in actual and s not in removed]
        candidates = [
            s for s in expected if not self._pinned(s) and s not in (keep, *removed) and s not in spared
        ]
        assert evicted == candidates[: len(evicted)], (evicted, candidates)
        for name in set(expected) - set(actual):
            self.pins.pop(name, None)
            self.doomed.discard(name)
        self.order = actual

    def _cached_ids(self, name: str) -> list[int]:
        entry = self.store.try_get(sid(name))
        return [] if entry is None else entry.token_ids.tolist()

    def _prefill(self, name: str, entry: KvCacheEntry, new_ids: Sequence[int]) -> None:
        before = snapshot(self.store)
        try:
            entry.ensure_capacity(entry.n_tokens + len(new_ids))
        except CacheBudgetError:
            assert snapshot(self.store) == before  # the failed request disturbed nothing
            return
        entry.append(new_ids)
        self._adopt(keep=name)

    @rule(name=st.sampled_from(NAMES), prompt=prompts, pin=st.booleans())
    def prepare(self, name: str, prompt: list[int], pin: bool) -> None:
        own_ids = self._cached_ids(name)
        shared_before = self.store.get_stats().shared_prefix_tokens
        try:
            entry, n_reused = self.store.prepare(sid(name), SMALL, prompt, pin=pin)
        except ContextOverflowError as exc:
            assert len(prompt) > token_limit(self.store.options) == exc.limit
            return self._adopt()
        except CacheBudgetError:
            return self._adopt(touched=name if name in order(self.store) else None, keep=name)
        assert len(prompt) <= token_limit(self.store.options)
        cap = len(prompt) - 1  # the last prompt token is always computed
        others = [s for s in order(self.store) if s != name]
        shared = {s: min(first_difference(self._cached_ids(s), prompt), cap) for s in others}
        own_n = min(first_difference(own_ids, prompt), cap)
        copied = self.store.get_stats().shared_prefix_tokens - shared_before
        # the longest prefix anywhere, or the own one when the budget had no room for the copy
        assert n_reused == (max([own_n, *shared.values()]) if copied else own_n)
        assert copied in (0, n_reused)
        assert entry.token_ids.tolist() == prompt[:n_reused]  # what the caller builds on
        self.pins[name] += pin
        self.doomed.discard(name)
        self.lookups.append((len(prompt), n_reused))
        self._adopt(touched=name, keep=name, spared={s for s, n in shared.items() if n >= n_reused})
        self._prefill(name, entry, prompt[n_reused:])

    @rule(name=st.sampled_from(NAMES), n_tokens=st.integers(1, 600))
    def grow(self, name: str, n_tokens: int) -> None:
        entry = self.store.try_get(sid(name))
        if entry is None:
            return
        if entry.n_tokens + n_tokens > entry.max_tokens:
            with pytest.raises(ContextOverflowError):
                entry.ensure_capacity(entry.n_tokens + n_tokens)
            return
        self._prefill(name, entry, [800] * n_tokens)

    @rule(name=st.sampled_from(NAMES))
    def create(self, name: str) -> None:
        try:
            self.store.get_or_create(sid(name), SMALL)
        except CacheBudgetError:
            assert name not in order(self.store) and len(self.order) >= self.store.options.max_sessions
            return self._adopt()
        self.doomed.discard(name)
        self._adopt(touched=name)

    @rule(name=st.sampled_from(NAMES))
    def touch(self, name: str) -> None:
        self.store.touch(sid(name))
        self._adopt(touched=name if name in self.order else None)

    @rule(name=st.sampled_from(NAMES))
    def remove(self, name: str) -> None:
        assert self.store.remove(sid(name)) == (name in self.order)
        if self._pinned(name):
            self.doomed.add(name)
            return self._adopt()
        self._adopt(removed=[name] if name in self.order else [])

    @rule(name=st.sampled_from(NAMES))
    def pin(self, name: str) -> None:
        if name in self.order:
            self.store.pin(sid(name))
            self.pins[name] += 1

    @rule(name=st.sampled_from(NAMES))
    def unpin(self, name: str) -> None:
        if not self._pinned(name):
            return
        info = next(i for i in self.store.sessions() if i.session_id.value == name)
        self.store.unpin(sid(name))
        self.pins[name] -= 1
        over = info.reserved_bytes // BPT > token_limit(self.store.options)
        gone = not self._pinned(name) and (name in self.doomed or over)
        self._adopt(removed=[name] if gone else [])

    @rule(options=store_options())
    def update_options(self, options: KvCacheOptions) -> None:
        limit = token_limit(options)
        over = [
            i.session_id.value
            for i in self.store.sessions()
            if not i.pinned and i.reserved_bytes // BPT > limit
        ]
        self.store.update_options(options)
        self._adopt(removed=over)

    @rule()
    def clear(self) -> None:
        unpinned = [s for s in self.order if not self._pinned(s)]
        self.store.clear()
        self.doomed |= set(self.order) - set(unpinned)
        self._adopt(removed=unpinned)

    @invariant()
    def bytes_add_up_within_budget(self) -> None:
        stats, infos = snapshot(self.store)
        assert sum(i.reserved_bytes for i in infos) == stats.current_bytes
        assert sum(i.used_bytes for i in infos) == stats.used_bytes
        assert stats.peak_bytes >= stats.current_bytes
        unpinned_bytes = sum(i.reserved_bytes for i in infos if not i.pinned)
        within = stats.current_bytes + stats.pooled_bytes <= stats.max_bytes_total
        assert within or (stats.pooled_bytes == 0 and unpinned_bytes == 0)  # only pinned ones over
        for i in infos:
            assert i.used_bytes <= i.reserved_bytes and i.n_tokens <= i.max_tokens

    @invariant()
    def sessions_and_counters_match_the_model(self) -> None:
        stats, infos = snapshot(self.store)
        assert [i.session_id.value for i in infos] == self.order
        assert len(infos) <= self.store.options.max_sessions or all(i.pinned for i in infos)
        assert {i.session_id.value for i in infos if i.pinned} == {s for s in self.order if self._pinned(s)}
        assert stats.pinned_sessions == sum(1 for s in self.order if self._pinned(s))
        assert stats.hits == sum(1 for _, n in self.lookups if n > 0)
        assert stats.misses == sum(1 for _, n in self.lookups if n == 0)
        assert stats.prompt_tokens == sum(p for p, _ in self.lookups)
        assert stats.reused_tokens == sum(n for _, n in self.lookups)


StoreMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestStoreMachine = StoreMachine.TestCase


def test_a_shorter_prompt_after_older_turns_were_dropped_gives_room_back() -> None:
    """Bug fixed (found by the soak's reserved/used check): a conversation trimmed to fit its limit
    reused a short prefix of a long entry and kept the whole long buffer reserved."""
    store = LruKvCacheStore()
    entry, _ = store.prepare(sid("a"), SMALL, list(range(600)))
    entry.ensure_capacity(600)  # 640 tokens
    entry.append(range(600))
    assert store.get_stats().current_bytes == 640 * BPT
    prompt = [*range(30), *range(1000, 1070)]  # 100 tokens, the first 30 cached
    entry, n_reused = store.prepare(sid("a"), SMALL, prompt)
    assert n_reused == 30 and entry.token_ids.tolist() == list(range(30))
    assert entry.capacity == 128 and store.get_stats().current_bytes == 128 * BPT
    entry, _ = store.prepare(sid("a"), SMALL, prompt[:90])  # a little shorter: no copy for that
    assert entry.capacity == 128
