"""Sessions belong to someone: the app's tabs, each API key and the keyless local client are separate
owners. Prefix sharing, session continuation, ``X-Session-Id`` and the disk tier stay within one
owner, so ``cached_tokens`` tells a client nothing about what another owner sent (the prefix
oracle of issue 23: a tab holds "the pin is 4711", an API client guesses and reads cached_tokens),
while a conversation, or a system prompt shared by two conversations, still reuses its owner's K/V.

The store is checked alone first, then through a real server on 127.0.0.1 around a real engine (the
tiny model), with the tab's request submitted to the same engine, as the app's in-app server has it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from engine import (
    APP_OWNER,
    BatchedInferenceEngine,
    InferenceOptions,
    LruKvCacheStore,
    Model,
    SessionId,
    Tokenizer,
)
from engine.kv_cache import ModelShape
from tests.engine.conftest import tiny  # noqa: F401  (the tiny model, loaded once per session)
from tests.engine.test_kv_disk import disk_store, random_ids, turn
from tests.server.conftest import LiveServer, live_server, tiny_engine  # noqa: F401

SMALL = ModelShape(1, 1, 2)
KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"
SECRET = "Remember this for me: the pin is {}."
SYSTEM = "You are a careful assistant for the sales team. Answer in one short sentence."
TIMEOUT_S = 60.0


def fill(store: LruKvCacheStore, session: SessionId, ids: list[int]) -> None:
    """A request's prompt cached in ``session`` (as the engine leaves it after the prefill)."""
    entry, _ = store.prepare(session, SMALL, ids)
    entry.ensure_capacity(len(ids))
    entry.append(ids[entry.n_tokens :])


# ---------------------------------------------------------------------------------------------------
# The store


def test_prefixes_are_shared_within_an_owner_and_never_across() -> None:
    store = LruKvCacheStore()
    secret = list(range(1, 101))
    fill(store, SessionId("tab-1"), secret)
    guess = [*secret[:60], 999]
    _, n_other_owner = store.prepare(SessionId("api-1", "api-local"), SMALL, guess)
    _, n_same_owner = store.prepare(SessionId("tab-2"), SMALL, guess)
    assert (n_other_owner, n_same_owner) == (0, 60)
    assert store.get_stats().shared_prefix_tokens == 60


def test_the_same_name_under_two_owners_is_two_sessions() -> None:
    store = LruKvCacheStore()
    mine, theirs = SessionId("api-user:shared", "api-key-a"), SessionId("api-user:shared", "api-key-b")
    assert mine != theirs and mine.key != theirs.key
    fill(store, mine, list(range(1, 51)))
    entry, n_reused = store.prepare(theirs, SMALL, [*range(1, 51), 7])
    assert n_reused == 0 and len(store) == 2 and store.try_get(mine) is not entry


def test_owner_names_cannot_forge_another_owners_key() -> None:
    assert SessionId("tab").key == "tab"  # the app's files keep their names from before owners
    assert SessionId("x", "api-local").key != SessionId("api-local\x1fx").key
    with pytest.raises(ValueError, match="owner"):
        SessionId("x", "api\x1flocal")
    with pytest.raises(ValueError, match="owner"):
        SessionId("x", "")


def test_the_disk_tier_never_crosses_owners(tiny: tuple[Model, Tokenizer], tmp_path: Path) -> None:  # noqa: F811
    """A session evicted to disk comes back for its owner only, also across a restart."""
    model, _ = tiny
    prompt = random_ids(80, 11)
    mine, theirs = SessionId("api-user:s", "api-key-a"), SessionId("api-user:s", "api-key-b")
    store = disk_store(model, tmp_path)
    turn(model, store, mine, prompt)
    assert store.remove(mine, to_disk=True) and store.close()
    store = disk_store(model, tmp_path)
    _, n_theirs, _ = turn(model, store, theirs, [*prompt, 5])
    _, n_mine, _ = turn(model, store, mine, [*prompt, 5])
    assert (n_theirs, n_mine) == (0, 80)
    assert store.get_stats().disk_hits == 1
    store.close()


# ---------------------------------------------------------------------------------------------------
# Through the server


@pytest.fixture
def keyed_server(tiny_engine: BatchedInferenceEngine) -> Iterator[LiveServer]:  # noqa: F811
    """Keys A and B on the module's engine: new owners for each test (a label is an HMAC under the
    server's own start-up secret), so no test sees another's sessions."""
    with live_server(tiny_engine, "tiny", api_key=[KEY_A, KEY_B]) as server:
        yield server


@pytest.fixture(scope="module")
def keyless_server(tiny_engine: BatchedInferenceEngine) -> Iterator[LiveServer]:  # noqa: F811
    with live_server(tiny_engine, "tiny") as server:
        yield server


def chat(server: LiveServer, messages: list[dict[str, str]], key: str | None = None, **extra: Any) -> int:
    """POST a chat completion; its cached_tokens."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers |= extra.pop("headers", {})
    body = {"messages": messages, "max_tokens": 3, "temperature": 0} | extra
    reply = httpx.post(server.v1 + "/chat/completions", json=body, headers=headers, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    return int(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def test_prefix_oracle_gives_the_same_cached_tokens_for_a_right_and_a_wrong_guess(
    tiny_engine: BatchedInferenceEngine,  # noqa: F811
    keyless_server: LiveServer,
) -> None:
    """A tab holds the pin; the keyless local client guesses. A warm-up guess first, so that each
    guess after it finds the same own prefix ("...the pin is "): right and wrong then read the same."""
    tab = tiny_engine.submit([user(SECRET.format(4711))], InferenceOptions(max_new_tokens=2),
                             SessionId("tab-with-the-pin"))  # fmt: skip
    assert tab.result(TIMEOUT_S).finish_reason in ("stop", "length")
    warm_up = chat(keyless_server, [user(SECRET.format("0000"))])
    right = chat(keyless_server, [user(SECRET.format(4711))])
    wrong = chat(keyless_server, [user(SECRET.format(9999))])
    assert warm_up == 0  # nothing of its own yet, and the tab's tokens are not its to reuse
    assert right == wrong > 0  # the shared "...the pin is " from its own warm-up, no more
    n_prompt = len(tiny_engine.tokenizer.encode_messages([user(SECRET.format(4711))]))
    assert right < n_prompt - 6  # the digits and what follows were computed, not copied from the tab


def test_within_one_owner_a_conversation_and_a_shared_system_prompt_are_reused(
    keyed_server: LiveServer,
) -> None:
    first = [{"role": "system", "content": SYSTEM}, user("Where is the weather report?")]
    assert chat(keyed_server, first, KEY_A) == 0
    follow_up = [*first, {"role": "assistant", "content": "It is on the wall."}, user("Thank you.")]
    encode = keyed_server.engine.tokenizer.encode_messages
    assert chat(keyed_server, follow_up, KEY_A) >= len(encode(first)) - 1
    other = [{"role": "system", "content": SYSTEM}, user("What is a large language model?")]
    n_system = len(encode([other[0]], add_generation_prompt=False))
    assert n_system <= chat(keyed_server, other, KEY_A) < len(encode(other))
    assert chat(keyed_server, other, KEY_B) == 0  # the same system prompt, another owner


def test_another_key_reuses_nothing_of_a_conversation_it_repeats(keyed_server: LiveServer) -> None:
    first = [user("Please write a short poem about the sea and the ships.")]
    follow_up = [*first, {"role": "assistant", "content": "The sea is wide."}, user("Another one, please.")]
    chat(keyed_server, first, KEY_A)
    assert chat(keyed_server, follow_up, KEY_B) == 0  # key B sends A's conversation: all computed
    assert chat(keyed_server, follow_up, KEY_A) > 0  # A's own next turn: reused


def test_x_session_id_of_another_owner_cannot_attach(keyed_server: LiveServer) -> None:
    """The same X-Session-Id from two keys names two sessions: B's request neither continues A's
    session nor disturbs it (A's next turn still reuses its own K/V)."""
    first = [user("I would like to plan a trip to the mountains in the summer.")]
    follow_up = [*first, {"role": "assistant", "content": "That sounds great!"}, user("What should I pack?")]
    pinned = {"headers": {"X-Session-Id": "team-chat"}}
    assert chat(keyed_server, first, KEY_A, **pinned) == 0
    assert chat(keyed_server, follow_up, KEY_B, **pinned) == 0
    assert (
        chat(keyed_server, follow_up, KEY_A, **pinned)
        >= len(keyed_server.engine.tokenizer.encode_messages(first)) - 1
    )
    stores = {
        s.session_id
        for s in keyed_server.engine.store.sessions()
        if s.session_id.value == "api-user:team-chat"
    }
    assert len({s.owner for s in stores}) == 2 and APP_OWNER not in {s.owner for s in stores}
