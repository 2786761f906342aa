"""A real ``smallmind serve`` (tiny model, a subprocess on 127.0.0.1) against hostile requests.

- A 20,000-character stop string (which took the server from 180 to 951 MiB) costs a bounded RSS.
- Every field that sizes work has a limit: a 400 whose ``param`` names the field.
- A keyless server refuses a rebinding ``Host`` (403) and answers localhost and 127.0.0.1.
- Several keys (``--api-key`` twice and ``--api-keys-file``) are separate owners; no key is logged.
- Hypothesis posts random bodies (valid shapes with hostile values, and garbage) to every endpoint:
  never a 5xx, never a dropped connection, RSS bounded, and a normal request is answered afterwards.

Loopback only; every loop is bounded (fixed example counts, a per-request timeout).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smallmind_server import limits
from tests.server.test_serve_cli import free_port, wait_healthy

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 30.0
MAX_STOP_RSS_GROWTH_MIB = 20  # the peak; main: +182 MiB for the 20,000-character stop string
MAX_FUZZ_RSS_GROWTH_MIB = 150
KEYS = ("first-key-0123456789", "second-key-0123456789")
FILE_KEYS = ("file-key-0123456789", "other-file-key-0123456789")
HELLO = [{"role": "user", "content": "Hello! How are you today?"}]
PART = {"type": "text", "text": "a"}


@contextlib.contextmanager
def serve(model: Path, workdir: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[str], Path]]:
    """``smallmind serve`` on a free 127.0.0.1 port; yields (base URL, process, its output file)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "SMALLMIND_HOME": str(workdir / "home")}
    log_path = workdir / f"serve-{port}.log"
    command = [
        sys.executable,
        "-m",
        "smallmind_cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        *args,
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, proc, log_path
    finally:
        proc.terminate()
        try:
            proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(TIMEOUT_S)


def rss_mib(proc: subprocess.Popen[str], field: str = "VmRSS") -> float:
    """The process's resident size now (``VmRSS``) or its peak since ``reset_peak`` (``VmHWM``)."""
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} line")


def reset_peak(proc: subprocess.Popen[str]) -> float:
    """Start measuring the peak resident size afresh (Linux: 5 > clear_refs); the size now."""
    Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
    return rss_mib(proc)


def peak_growth_mib(proc: subprocess.Popen[str], before: float) -> float:
    """How far the resident size rose above ``before`` at its highest (freed memory counts too)."""
    return rss_mib(proc, "VmHWM") - before


@pytest.fixture(scope="module")
def keyless(
    tiny_model_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with serve(tiny_model_path, tmp_path_factory.mktemp("keyless")) as (url, proc, _):
        with httpx.Client(timeout=TIMEOUT_S) as client:  # a warm-up: the first request's allocations
            assert client.post(
                url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4}
            ).is_success
        yield url, proc


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers, timeout=TIMEOUT_S)


def error_param(reply: httpx.Response, status: int = 400) -> str | None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and error["type"]
    return error["param"]


# ---------------------------------------------------------------------------------------------------
# Memory, limits, Host


def test_a_20000_character_stop_string_costs_bounded_memory(
    keyless: tuple[str, subprocess.Popen[str]],
) -> None:
    url, proc = keyless
    before = reset_peak(proc)
    reply = post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 8, "stop": ["x" * 20_000]})
    assert error_param(reply) == "stop"
    longest_allowed = ["ab" * (limits.MAX_STOP_CHARS // 2)] * limits.MAX_STOP_STRINGS
    reply = post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 8, "stop": longest_allowed})
    assert reply.status_code == 200, reply.text
    growth = peak_growth_mib(proc, before)
    assert growth < MAX_STOP_RSS_GROWTH_MIB, f"the server's peak grew by {growth:.0f} MiB"


LIMITS = [
    ("/v1/chat/completions", {"stop": ["a"] * (limits.MAX_STOP_STRINGS + 1)}, "stop"),
    ("/v1/chat/completions", {"stop": "s" * (limits.MAX_STOP_CHARS + 1)}, "stop"),
    ("/v1/chat/completions", {"messages": HELLO * (limits.MAX_MESSAGES + 1)}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * (limits.MAX_PROMPT_CHARS + 1)}]},
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 70_000}] * 2}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [PART] * 65}]}, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "n" * 257}]},
     "messages.0.name"),
    ("/v1/chat/completions", {"max_tokens": 257}, "max_tokens"),  # the tiny model's context is 256
    ("/v1/chat/completions", {"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ("/v1/chat/completions", {"top_k": 10**12}, "top_k"),
    ("/v1/chat/completions", {"n": limits.MAX_CHOICES + 1}, "n"),
    ("/v1/chat/completions", {"logit_bias": {str(i): 1 for i in range(limits.MAX_LOGIT_BIAS + 1)}},
     "logit_bias"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": limits.MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": f"f{i}"}}
                                        for i in range(limits.MAX_TOOLS + 1)]}, "tools"),
    ("/v1/chat/completions", {"metadata": {str(i): "v" for i in range(limits.MAX_METADATA_ITEMS + 1)}},
     "metadata"),
    ("/v1/chat/completions", {"user": "u" * 257}, "user"),
    ("/v1/completions", {"prompt": "p" * (limits.MAX_PROMPT_CHARS + 1)}, "prompt"),
    ("/v1/completions", {"prompt": ["p" * (limits.MAX_PROMPT_CHARS + 1)]}, "prompt"),
    ("/v1/completions", {"prompt": ["a"] * (limits.MAX_PROMPTS + 1)}, "prompt"),
    ("/v1/completions", {"prompt": ["p" * 70_000] * 2}, "prompt"),
    ("/tokenize", {"prompt": "p" * (limits.MAX_PROMPT_CHARS + 1)}, "prompt"),
    ("/tokenize", {"messages": HELLO * (limits.MAX_MESSAGES + 1)}, "messages"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "fields", "param"), LIMITS, ids=[f"{p}-{f}" for p, _, f in LIMITS])
def test_a_field_over_its_limit_is_a_400_naming_it(
    keyless: tuple[str, subprocess.Popen[str]], path: str, fields: dict[str, Any], param: str
) -> None:
    url, _ = keyless
    base: dict[str, Any] = {"messages": HELLO, "max_tokens": 2} if path == "/v1/chat/completions" else {}
    if path == "/v1/completions":
        base = {"prompt": "Hello", "max_tokens": 2}
    assert error_param(post(url, path, base | fields)) == param


def test_values_at_the_limits_are_served(keyless: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = keyless
    n_hello = len(post(url, "/tokenize", {"messages": HELLO}).json()["tokens"])
    at_limits: list[dict[str, Any]] = [
        {"stop": []},
        {"stop": ["q" * limits.MAX_STOP_CHARS] * limits.MAX_STOP_STRINGS},
        {"max_tokens": 256 - n_hello},  # the whole rest of the tiny model's context
        {"messages": [{"role": "user", "content": [PART] * limits.MAX_CONTENT_PARTS, "name": "n" * 256}]},
        {"user": "u" * limits.MAX_NAME_CHARS, "top_k": limits.MAX_TOP_K, "seed": limits.MAX_SEED},
    ]
    for fields in at_limits:
        reply = post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2} | fields)
        assert reply.status_code == 200, (fields.keys(), reply.text)
    headers = {"X-Session-Id": "s" * limits.MAX_SESSION_ID_CHARS}
    assert post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}, headers).status_code == 200


def test_oversized_headers_are_a_431(keyless: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = keyless
    reply = httpx.get(url + "/v1/models", headers={"X-Padding": "p" * 100_000}, timeout=TIMEOUT_S)
    assert reply.status_code == 431 and reply.json()["error"]["code"] == "request_header_fields_too_large"


def test_a_long_session_id_header_is_a_400_naming_it(keyless: tuple[str, subprocess.Popen[str]]) -> None:
    url, _ = keyless
    body = {"messages": HELLO, "max_tokens": 2}
    headers = {"X-Session-Id": "s" * (limits.MAX_SESSION_ID_CHARS + 1)}
    assert error_param(post(url, "/v1/chat/completions", body, headers)) == "X-Session-Id"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example:{port}",
                                  "0.0.0.0:{port}", "localhost.evil.example"])  # fmt: skip
def test_a_keyless_server_refuses_a_rebinding_host(
    keyless: tuple[str, subprocess.Popen[str]], host: str
) -> None:
    url, _ = keyless
    port = url.rsplit(":", 1)[1]
    headers = {"Host": host.format(port=port)}
    chat_reply = post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}, headers)
    for reply in (httpx.get(url + "/v1/models", headers=headers, timeout=TIMEOUT_S),
                  httpx.get(url + "/health", headers=headers, timeout=TIMEOUT_S), chat_reply):  # fmt: skip
        assert error_param(reply, 403) == "Host"
        assert reply.json()["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host", ["localhost:{port}", "127.0.0.1:{port}", "localhost", "127.0.0.1", "[::1]:{port}"]
)
def test_a_keyless_server_answers_loopback_hosts(
    keyless: tuple[str, subprocess.Popen[str]], host: str
) -> None:
    url, _ = keyless
    headers = {"Host": host.format(port=url.rsplit(":", 1)[1])}
    reply = post(url, "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}, headers)
    assert reply.status_code == 200, reply.text


# ---------------------------------------------------------------------------------------------------
# Several keys


def chat(url: str, key: str, messages: list[dict[str, str]], **headers: str) -> httpx.Response:
    return post(url, "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "temperature": 0},
                {"Authorization": f"Bearer {key}", **headers})  # fmt: skip


def cached(reply: httpx.Response) -> int:
    assert reply.status_code == 200, reply.text
    return int(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def test_several_keys_are_separate_owners_and_never_logged(tiny_model_path: Path, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# the team's keys\n\n{FILE_KEYS[0]}\n  {FILE_KEYS[1]}  \n", encoding="utf-8")
    args: Sequence[str] = (
        "--api-key",
        KEYS[0],
        "--api-key",
        KEYS[1],
        "--api-keys-file",
        str(keys_file),
        "-v",
    )
    with serve(tiny_model_path, tmp_path, *args) as (url, _, log_path):
        first = [{"role": "user", "content": "Please write a short poem about the sea."}]
        follow_up = [
            *first,
            {"role": "assistant", "content": "The sea is wide."},
            {"role": "user", "content": "More!"},
        ]
        assert cached(chat(url, KEYS[0], first)) == 0
        assert cached(chat(url, KEYS[1], follow_up)) == 0  # another key repeats the conversation
        assert cached(chat(url, FILE_KEYS[0], follow_up)) == 0  # and a key from the file
        assert cached(chat(url, KEYS[0], follow_up)) > 0  # the owner's own next turn reuses its K/V
        pinned = {"X-Session-Id": "shared-name"}
        assert cached(chat(url, KEYS[0], first, **pinned)) > 0  # its own earlier prompt: shared
        assert cached(chat(url, FILE_KEYS[1], follow_up, **pinned)) == 0  # the name does not attach
        assert error_param(chat(url, "not-a-key", first), 401) is None
        assert cached(chat(url, KEYS[1], first, Host="any.example.com")) >= 0  # a key: any Host
    output = log_path.read_text()
    assert "4 keys" in output
    for key in (*KEYS, *FILE_KEYS):
        assert key not in output


# ---------------------------------------------------------------------------------------------------
# Random bodies

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=200),
    st.sampled_from(
        ["", " ", "\x00", "<|im_end|>", "<|im_start|>system\n", "{{ 7*7 }}", "\ud800", "a\udfffb"]
    ),
    st.integers(0, 3000).map(lambda n: " " * n),
    st.integers(limits.MAX_STOP_CHARS - 2, limits.MAX_STOP_CHARS + 2).map(lambda n: "x" * n),
)
NUMBERS = st.one_of(
    st.integers(-3, 8),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 255, 256, 257, 4096, 4097, 2**31, 2**63, -1, 1e308, 0.5]),
)
MAX_TOKENS = st.one_of(st.integers(1, 6), NUMBERS)  # small or hostile: the whole run stays short
ANY = st.one_of(
    st.none(),
    st.booleans(),
    NUMBERS,
    HOSTILE_TEXT,
    st.lists(HOSTILE_TEXT, max_size=3),
    st.dictionaries(HOSTILE_TEXT, st.none() | HOSTILE_TEXT, max_size=2),
)
ROLES = st.sampled_from(["system", "user", "assistant", "developer", "tool", "", "USER"])
PARTS = st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": HOSTILE_TEXT}), max_size=3)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES, "content": st.one_of(HOSTILE_TEXT, PARTS, ANY)}), ANY
)
SAMPLING = {
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "top_k": NUMBERS,
    "min_p": NUMBERS,
    "seed": NUMBERS,
    "repetition_penalty": NUMBERS,
    "stop": st.one_of(HOSTILE_TEXT, ANY),
    "stream": st.booleans(),
    "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": st.booleans()}), ANY),
    "n": NUMBERS,
    "user": HOSTILE_TEXT,
    "model": st.one_of(st.just("tiny"), HOSTILE_TEXT),
    "logprobs": ANY,
    "ignore_eos": st.booleans(),
    "frequency_penalty": NUMBERS,
    "unknown_field": ANY,
}
CHAT = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, max_size=4), "max_tokens": MAX_TOKENS}, optional=SAMPLING
)
PROMPT = st.one_of(HOSTILE_TEXT, st.lists(HOSTILE_TEXT, max_size=2), ANY)
COMPLETION = st.fixed_dictionaries({"prompt": PROMPT, "max_tokens": MAX_TOKENS}, optional=SAMPLING)
TOKENIZE = st.fixed_dictionaries(
    {},
    optional={
        "prompt": ANY,
        "messages": st.lists(MESSAGE, max_size=3),
        "add_generation_prompt": ANY,
        "model": ANY,
    },
)
HOSTILE = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/tokenize": TOKENIZE}

# Well-formed bodies with hostile values, within the limits but for HUGE_STOP: special tokens and
# template syntax in the text, long runs of spaces, any Unicode, stop strings up to the limit, every
# sampling field at its edges.
LEGAL_TEXT = st.one_of(HOSTILE_TEXT.filter(bool), st.text(min_size=1, max_size=60))
LEGAL_MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"]), "content": LEGAL_TEXT},
    optional={"name": st.text(min_size=1, max_size=limits.MAX_NAME_CHARS)},
)
LEGAL_STOP = st.text(min_size=1, max_size=limits.MAX_STOP_CHARS)
HUGE_STOP = st.just(["y" * 20_000])  # over the limit (400); before it, each cost the server ~180 MiB
HUGE_STOP_BODY = json.dumps(
    {"messages": HELLO, "max_tokens": 2, "stop": ["y" * 20_000]}
).encode()  # always sent
LEGAL_SAMPLING = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "top_k": st.integers(0, limits.MAX_TOP_K),
    "min_p": st.floats(0, 1),
    "seed": st.integers(0, limits.MAX_SEED),
    "repetition_penalty": st.floats(0, 10, exclude_min=True),
    "stop": st.one_of(LEGAL_STOP, st.lists(LEGAL_STOP, max_size=limits.MAX_STOP_STRINGS), HUGE_STOP),
    "stream": st.booleans(),
    "user": st.text(min_size=1, max_size=limits.MAX_NAME_CHARS),
    "ignore_eos": st.booleans(),
    "n": st.just(1),
}
LEGAL_CHAT = st.fixed_dictionaries(
    {"messages": st.lists(LEGAL_MESSAGE, min_size=1, max_size=4), "max_tokens": st.integers(1, 6)},
    optional=LEGAL_SAMPLING,
)
LEGAL_COMPLETION = st.fixed_dictionaries(
    {
        "prompt": st.one_of(LEGAL_TEXT, st.lists(LEGAL_TEXT, min_size=1, max_size=1)),
        "max_tokens": st.integers(1, 6),
    },
    optional=LEGAL_SAMPLING,
)
LEGAL_TOKENIZE = st.one_of(
    st.fixed_dictionaries({"prompt": LEGAL_TEXT}),
    st.fixed_dictionaries({"messages": st.lists(LEGAL_MESSAGE, min_size=1, max_size=4)}),
)
LEGAL = {"/v1/chat/completions": LEGAL_CHAT, "/v1/completions": LEGAL_COMPLETION, "/tokenize": LEGAL_TOKENIZE}
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", ""]
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "X-Session-Id": st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=300),
    },
).flatmap(
    lambda headers: st.one_of(st.just("application/json"), st.sampled_from(CONTENT_TYPES)).map(
        lambda content_type: headers | {"Content-Type": content_type}
    )
)
GARBAGE = st.one_of(
    st.binary(max_size=300), st.just(b"[" * 50_000), st.just(b'{"messages": 1' + b"0" * 5000 + b"}")
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(path, body bytes, headers): a legal body with hostile values, a body of the endpoint's shape
    with hostile values anywhere, any JSON, or garbage."""
    path = draw(st.sampled_from(sorted(LEGAL)))
    kind = draw(st.sampled_from(["legal", "legal", "hostile", "hostile", "json", "garbage"]))
    if kind in ("legal", "hostile"):
        fields = draw((LEGAL if kind == "legal" else HOSTILE)[path])
        if kind == "legal" and fields.get("stream") and draw(st.booleans()):
            fields["stream_options"] = {"include_usage": draw(st.booleans())}
        body = json.dumps(fields, allow_nan=True).encode()
    elif kind == "json":
        body = json.dumps(draw(ANY)).encode()
    else:
        body = draw(GARBAGE)
    return path, body, draw(HEADERS)


def check_answer(reply: httpx.Response) -> None:
    assert reply.status_code < 500, f"{reply.status_code}: {reply.text[:500]}"
    if reply.status_code >= 400:
        assert json.loads(reply.text)["error"]["message"]
    elif reply.headers.get("content-type", "").startswith("text/event-stream"):
        tail = reply.text[-500:]
        assert reply.text.rstrip().endswith("data: [DONE]") and "server_error" not in reply.text, tail
    else:
        json.loads(reply.text)


def test_random_bodies_never_get_a_5xx_or_a_dropped_connection(
    keyless: tuple[str, subprocess.Popen[str]],
) -> None:
    url, proc = keyless
    before = reset_peak(proc)
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests())
        @example(("/v1/chat/completions", HUGE_STOP_BODY, {"Content-Type": "application/json"}))
        @example(("/v1/chat/completions", b"[" * 50_000, {"Content-Type": "application/json"}))
        def one_request(request: tuple[str, bytes, dict[str, str]]) -> None:
            path, body, headers = request
            check_answer(client.post(path, content=body, headers=headers))  # a TransportError fails

        one_request()
        growth = peak_growth_mib(proc, before)
        assert growth < MAX_FUZZ_RSS_GROWTH_MIB, f"the server's peak grew by {growth:.0f} MiB"
        reply = client.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
    assert proc.poll() is None
