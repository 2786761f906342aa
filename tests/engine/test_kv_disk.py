"""The KV store's disk tier against references: a session written to disk and read back by a new store
(a restart) gives the uncached forward's logits and the same greedy continuation, for float32,
float16 and q8_0 K/V; an evicted session of the batched engine comes back from disk; the tier keeps its own
LRU by bytes, its index survives a restart, and a session still being written is served from memory.

Fault cases (corrupt, truncated, another model, full disk, read-only, SIGKILL) are in
test_kv_disk_faults.py. Byte arithmetic: the tiny model holds 512 bytes of float32 K/V a token; a
file holds 4 more a token (the id), plus a preamble of a few hundred bytes.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine import GgufFile, InferenceOptions, KvCacheOptions, LruKvCacheStore, Model, SessionId, Tokenizer
from engine.kv_cache import KvCacheEntry
from engine.kv_disk import INDEX_NAME, DiskKvTier, model_identity
from tests.engine.conftest import greedy_continuation, rel_diff
from tests.engine.test_kv_store import TOL, TOL_F16, TURNS, conversation, decode
from tests.fixtures.engine_helpers import make_engine, run_all, user
from tests.fixtures.tiny_model import write_tiny_model

A, B, C = SessionId("tab-a"), SessionId("tab-b"), SessionId("tab-c")
TOL_Q8 = 3e-2  # q8_0 K/V against the float32 forward (the kernel's Q8_BAR, through a tiny model)


def disk_store(model: Model, directory: Path, dtype: str = "float32", **options: Any) -> LruKvCacheStore:
    """A store with the disk tier in ``directory``, for this model (what a start of the app makes)."""
    store = LruKvCacheStore(KvCacheOptions(disk_dir=str(directory), dtype=dtype, **options))
    store.set_model_identity(model.identity)
    return store


def turn(
    model: Model, store: LruKvCacheStore, session: SessionId, prompt: list[int]
) -> tuple[np.ndarray, int, KvCacheEntry]:
    """One request as the engine makes it: prepare, then prefill the tokens not reused; (T, V) logits."""
    entry, n_reused = store.prepare(session, model.kv_shape(store.options.dtype), prompt, 256)
    return model.forward(prompt[n_reused:], entry), n_reused, entry


def greedy_from(model: Model, entry: KvCacheEntry, logits: np.ndarray, n_new: int) -> list[int]:
    out: list[int] = []
    for _ in range(n_new):
        out.append(int(np.argmax(logits)))
        logits = model.forward([out[-1]], entry)[-1]
    return out


def random_ids(n: int, seed: int, vocab: int = 500) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).integers(1, vocab, n)]


def save_session(model: Model, directory: Path, session: SessionId, prompt: list[int], dtype: str) -> None:
    """A session's K/V cached in one store, its tab closed (to disk), the store closed: the app quits."""
    store = disk_store(model, directory, dtype)
    turn(model, store, session, prompt)
    assert store.remove(session, to_disk=True)
    assert store.close()


# ---------------------------------------------------------------------------------------------
# Round trip: logits and greedy continuations
# ---------------------------------------------------------------------------------------------
def test_round_trip_float32_equals_uncached_forward(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    model, _ = tiny
    first, second = random_ids(150, 1), random_ids(150, 1) + random_ids(40, 2)
    save_session(model, tmp_path, A, first, "float32")
    assert len(list(tmp_path.glob("*.kv"))) == 1

    store = disk_store(model, tmp_path)  # a restart: a new store on the same folder
    logits, n_reused, entry = turn(model, store, A, second)
    assert n_reused == len(first)  # every cached token came back from disk
    reference = model.forward(second)[n_reused:]  # a fresh cache: the whole prompt recomputed
    assert rel_diff(logits, reference) <= TOL
    assert greedy_from(model, entry, logits[-1], 20) == greedy_continuation(model, second, 20)
    stats = store.get_stats()
    assert (stats.disk_hits, stats.disk_reused_tokens, stats.reused_tokens) == (1, 150, 150)
    assert stats.disk_sessions == 1 and stats.disk_load_ms > 0


def test_round_trip_float16_is_bit_identical_to_the_memory_cache(
    tiny: tuple[Model, Tokenizer], tmp_path: Path
) -> None:
    """float16 K/V differ from the uncached float32 forward by their rounding (TOL_F16, as in memory);
    the disk adds nothing to it: the logits equal those of the same turns kept in memory, bit for bit."""
    model, _ = tiny
    first, second = random_ids(120, 3), random_ids(120, 3) + random_ids(30, 4)
    save_session(model, tmp_path, A, first, "float16")
    store = disk_store(model, tmp_path, "float16")
    logits, n_reused, entry = turn(model, store, A, second)
    assert n_reused == len(first)

    memory = LruKvCacheStore(KvCacheOptions(dtype="float16"))  # the same two turns, never on disk
    turn(model, memory, A, first)
    in_memory, n_memory, memory_entry = turn(model, memory, A, second)
    assert n_memory == n_reused
    assert np.array_equal(logits, in_memory)
    assert rel_diff(logits, model.forward(second)[n_reused:]) <= TOL_F16
    assert greedy_from(model, entry, logits[-1], 20) == greedy_from(model, memory_entry, in_memory[-1], 20)


def test_round_trip_q8_0_is_bit_identical_to_the_memory_cache(tmp_path: Path) -> None:
    """q8_0 rows (int8 values and their float16 scales) go to disk and come back byte for byte: the
    logits equal those of the same turns kept in memory; against the uncached float32 forward they
    differ by the quantization (TOL_Q8)."""
    from tests.fixtures.tiny_model import write_tiny_gguf

    model = Model.from_gguf(write_tiny_gguf(tmp_path / "hd32.gguf", hidden_size=128, n_heads=4, seed=3))
    shape = model.kv_shape("q8_0")  # 2 layers x K, V x 2 heads x (32 int8 + 2 scale bytes)
    assert (shape.row_width, shape.bytes_per_token) == (34, 2 * 2 * 2 * 34)
    first, second = random_ids(120, 5), random_ids(120, 5) + random_ids(30, 6)
    save_session(model, tmp_path / "kv", A, first, "q8_0")
    store = disk_store(model, tmp_path / "kv", "q8_0")
    logits, n_reused, entry = turn(model, store, A, second)
    assert n_reused == len(first) and entry.keys(0).dtype == np.int8

    memory = LruKvCacheStore(KvCacheOptions(dtype="q8_0"))
    turn(model, memory, A, first)
    in_memory, _, _ = turn(model, memory, A, second)
    assert np.array_equal(logits, in_memory)
    assert rel_diff(logits, model.forward(second)[n_reused:]) <= TOL_Q8


def check_chat_round_trip(model: Model, tok: Tokenizer, directory: Path) -> None:
    """Turn 1 and its reply cached, the app restarted, turn 2 reuses all of them from disk."""
    prompts, replies = conversation(tok, TURNS)
    store = disk_store(model, directory)
    _, n_reused, entry = turn(model, store, A, prompts[0])
    decode(model, entry, replies[0])  # the reply's tokens enter the cache as generation leaves them
    store.remove(A, to_disk=True)
    assert n_reused == 0 and store.close()

    restarted = disk_store(model, directory)
    logits, n_reused, entry = turn(model, restarted, A, prompts[1])
    assert n_reused == len(prompts[0]) + len(replies[0])
    assert rel_diff(logits, model.forward(prompts[1])[n_reused:]) <= TOL
    assert greedy_from(model, entry, logits[-1], 12) == greedy_continuation(model, prompts[1], 12)


def test_chat_round_trip_tiny(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    check_chat_round_trip(*tiny, tmp_path)


@pytest.mark.smollm2
def test_chat_round_trip_smollm2(smollm2: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    check_chat_round_trip(*smollm2, tmp_path)


# ---------------------------------------------------------------------------------------------
# The batched engine: an evicted session comes back from disk
# ---------------------------------------------------------------------------------------------
def test_engine_resumes_an_evicted_session_from_disk(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    """Room for one conversation only: B's reply evicts A to disk; A's follow-up loads it back and its
    reply is the one an engine without a disk tier (recomputing A) gives."""
    budget = {"max_bytes_total": 160 * 512, "max_bytes_per_session": 160 * 512}
    greedy = InferenceOptions(max_new_tokens=12, temperature=0.0, stop_on_eos=False)
    replies = {}
    for disk in (True, False):
        options = KvCacheOptions(disk_dir=str(tmp_path) if disk else None, **budget)
        engine = make_engine(tiny, cache=options)
        messages_a = [user("The sea is wide and the sky is blue, " * 3)]
        (a1,) = run_all(engine, [engine.submit(messages_a, greedy, session_id=A)])
        run_all(engine, [engine.submit([user("Something else entirely " * 4)], greedy, session_id=B)])
        assert A not in engine.store  # evicted: there was room for one session
        follow_up = [*messages_a, {"role": "assistant", "content": a1.text}, user("And then?")]
        (a2,) = run_all(engine, [engine.submit(follow_up, greedy, session_id=A)])
        replies[disk] = (a2.token_ids, a2.reused_tokens, engine.store.get_stats())
        engine.stop()
        engine.store.close()
    (with_disk, reused, stats), (without, not_reused, _) = replies[True], replies[False]
    assert with_disk == without
    assert reused > not_reused  # without the disk only the system prompt shared with B is reused
    assert stats.disk_hits == 1 and stats.disk_reused_tokens == reused and stats.evictions >= 2


# ---------------------------------------------------------------------------------------------
# The tier's own LRU, its index, pending writes, forget and clear
# ---------------------------------------------------------------------------------------------
def file_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.kv"))


def test_disk_lru_by_bytes_and_the_index_survive_a_restart(
    tiny: tuple[Model, Tokenizer], tmp_path: Path
) -> None:
    model, _ = tiny
    one = 100 * (512 + 4)  # a 100-token session's payload; a file adds a small preamble
    store = disk_store(model, tmp_path, max_disk_bytes=int(2.5 * one))
    for session, seed in ((A, 1), (B, 2)):
        turn(model, store, session, random_ids(101, seed))  # 100 tokens cached + the last one computed
        store.remove(session, to_disk=True)
    assert store.flush_disk()
    turn(model, store, A, [*random_ids(101, 1), 7])  # A read back: now B is the least recently used
    store.remove(A, to_disk=True)
    turn(model, store, C, random_ids(101, 3))
    store.remove(C, to_disk=True)
    assert store.close()
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert [row["session_id"] for row in index["sessions"]] == ["tab-a", "tab-c"]  # B deleted
    assert file_bytes(tmp_path) == sum(row["n_bytes"] for row in index["sessions"]) <= int(2.5 * one)

    restarted = disk_store(model, tmp_path, max_disk_bytes=int(1.5 * one))  # a smaller budget at start
    stats = restarted.get_stats()
    assert (stats.disk_sessions, stats.disk_bytes) == (1, file_bytes(tmp_path))
    _, n_reused, _ = turn(model, restarted, C, [*random_ids(101, 3), 9])
    assert n_reused == 101  # C, the most recently used, stayed; A went
    restarted.close()


def test_a_session_still_being_written_is_served_from_memory(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow disk (fsync held): the eviction does not wait for it, and the session, asked for again
    before its file exists, comes from the handed-over buffer, with the same logits."""
    model, _ = tiny
    disk_free = threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        assert disk_free.wait(60)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    store = disk_store(model, tmp_path)
    prompt = random_ids(90, 5)
    turn(model, store, A, prompt)
    store.remove(A, to_disk=True)  # returns with the write stuck at fsync
    assert not list(tmp_path.glob("*.kv"))
    logits, n_reused, _ = turn(model, store, A, [*prompt, 3])
    assert n_reused == 90 and store.get_stats().disk_hits == 1
    assert rel_diff(logits, model.forward([*prompt, 3])[90:]) <= TOL
    disk_free.set()
    assert store.close() and len(list(tmp_path.glob("*.kv"))) == 1


def test_forget_and_clear_delete_files(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    model, _ = tiny
    store = disk_store(model, tmp_path)
    for session, seed in ((A, 1), (B, 2), (C, 3)):
        turn(model, store, session, random_ids(50, seed))
        store.remove(session, to_disk=True)
    assert store.flush_disk() and len(list(tmp_path.glob("*.kv"))) == 3
    store.forget(A)  # a deleted conversation
    assert store.flush_disk() and store.get_stats().disk_sessions == 2
    store.clear_disk()
    assert store.flush_disk() and not list(tmp_path.glob("*.kv"))
    assert store.get_stats().disk_sessions == 0
    _, n_reused, _ = turn(model, store, B, random_ids(50, 2))
    assert n_reused == 0
    store.close()


def test_disk_options_live(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    """Turning the tier off leaves its files; on again, they are found; a smaller budget trims them."""
    model, _ = tiny
    store = disk_store(model, tmp_path)
    turn(model, store, A, random_ids(60, 1))
    store.remove(A, to_disk=True)
    assert store.flush_disk()
    on = store.options
    store.update_options(KvCacheOptions(**(on.to_dict() | {"disk_enabled": False})))
    assert not store.get_stats().disk_enabled and len(list(tmp_path.glob("*.kv"))) == 1
    assert turn(model, store, A, random_ids(60, 1))[1] == 0  # off: recomputed
    store.remove(A)
    store.update_options(on)
    assert store.get_stats().disk_sessions == 1
    assert turn(model, store, A, random_ids(60, 1))[1] == 59
    store.update_options(KvCacheOptions(**(on.to_dict() | {"max_disk_bytes": 1000})))
    assert store.flush_disk() and store.get_stats().disk_sessions == 0 and not list(tmp_path.glob("*.kv"))
    store.close()


def test_options_validate_the_disk_fields() -> None:
    with pytest.raises(ValueError, match="max_disk_bytes must be a whole number ≥ 1, got 0"):
        KvCacheOptions(max_disk_bytes=0)
    with pytest.raises(ValueError, match="disk_dir must be a folder path or None"):
        KvCacheOptions(disk_dir="  ")
    assert not KvCacheOptions().disk_tier_on and KvCacheOptions(disk_dir="/x").disk_tier_on


def test_model_identity_tells_files_apart(tiny_model_path: Path, tmp_path: Path) -> None:
    """Same config and tokenizer, other weights: the header digest alone would match, the sampled
    tensor bytes do not. The same file always gives the same identity."""
    other = write_tiny_model(tmp_path / "other.gguf", seed=1).path
    offset = GgufFile(tiny_model_path).data_offset
    assert GgufFile(other).data_offset == offset  # the same header layout
    assert model_identity(tiny_model_path, offset) == model_identity(tiny_model_path, offset)
    assert model_identity(tiny_model_path, offset) != model_identity(other, offset)
    assert Model.from_gguf(other).identity == model_identity(other, offset)


def test_tier_in_an_unusable_folder_is_off_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    tier = DiskKvTier(blocker / "kv", 1 << 20)
    assert not tier.usable and not tier.can_take(10)
    assert "KV disk tier off" in caplog.text and "a parent of the folder is a file" in caplog.text


def test_evictions_past_the_writers_backlog_are_dropped_not_waited_for(
    tiny: tuple[Model, Tokenizer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk too slow for the evictions (fsync held, room for one pending session): the second
    eviction drops its session (recomputed later) instead of making the step wait."""
    model, _ = tiny
    monkeypatch.setattr("engine.kv_disk.MAX_PENDING_BYTES", 80 * (512 + 4))
    disk_free = threading.Event()
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (disk_free.wait(60), real_fsync(fd))[1])
    store = disk_store(model, tmp_path)
    for session, seed in ((A, 1), (B, 2)):
        turn(model, store, session, random_ids(60, seed))
        store.remove(session, to_disk=True)
    assert turn(model, store, B, random_ids(60, 2))[1] == 0  # dropped: recomputed
    assert turn(model, store, A, random_ids(60, 1))[1] == 59  # still pending: served from memory
    disk_free.set()
    assert store.flush_disk() and store.get_stats().disk_sessions == 1
    store.close()


def test_a_session_in_memory_does_not_read_its_older_file(
    tiny: tuple[Model, Tokenizer], tmp_path: Path
) -> None:
    """The file holds less than memory: the index's token ids tell, so the file is not read (a byte
    flipped in it goes unnoticed until it is needed, then it is caught: test_kv_disk_faults.py)."""
    model, _ = tiny
    prompt = random_ids(80, 6)
    store = disk_store(model, tmp_path)
    turn(model, store, A, prompt)
    store.remove(A, to_disk=True)
    assert turn(model, store, A, [*prompt, 4])[1] == 80 and store.flush_disk()
    (path,) = tmp_path.glob("*.kv")
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01
    path.write_bytes(bytes(data))
    assert turn(model, store, A, [*prompt, 4, 9, 9])[1] == 81  # from memory
    assert path.exists() and store.get_stats().disk_hits == 1
    store.remove(A)
    store.close()


def test_prefetch_asks_only_for_sessions_on_disk(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:
    """An opened tab's file is read ahead (the OS's page cache; posix_fadvise WILLNEED), one already
    in memory or never saved is not; the load afterwards is the usual checked one."""
    model, _ = tiny
    save_session(model, tmp_path, A, random_ids(70, 8), "float32")
    store = disk_store(model, tmp_path)
    assert store.prefetch(A) is hasattr(os, "posix_fadvise")
    assert not store.prefetch(B)
    assert turn(model, store, A, [*random_ids(70, 8), 1])[1] == 70
    assert not store.prefetch(A)  # in memory now
    store.close()
