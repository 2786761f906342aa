"""The wire side of ``RemoteEngine``: the endpoint's URL, request bodies, SSE chunks, failures in words.

OpenAI-compatible servers (vLLM, llama.cpp's ``llama-server``, Ollama, ``smallmind serve``) answer at
``<base>/v1``: ``GET /models`` and ``POST /chat/completions`` (``/completions`` for plain text), with
``stream: true`` as server-sent events (``data: {json}`` lines, then ``data: [DONE]``). Every failure
is described here in one sentence that names the cause (refused, unknown host, TLS, the status and
the server's own message) in plain words, never the HTTP library's; ``RemoteEngine`` prefixes it with
the endpoint. A server is not trusted to be small: bodies and lines are read with caps
(``read_capped``, ``capped_lines``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from .constraints import Constraint
from .sampling import InferenceOptions

MAX_ERROR_CHARS = 300  # of a server's error message quoted in ours
MAX_ERROR_BODY_BYTES = 64 << 10  # of a refusal's body read (the rest is not waited for)
MAX_LINE_BYTES = 1 << 20  # one SSE line: a chunk of a reply is a few hundred bytes
MAX_MODELS_BYTES = 4 << 20  # a /models answer (thousands of models fit)
SERVER_ENDED = ("cancelled", "abort", "aborted")  # finish reasons of a reply the server gave up on


class TooLarge(Exception):
    """A server sent more than a cap allows (the message says what and how much)."""


async def read_capped(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """The body's first ``max_bytes`` bytes, and whether there was more (not read further)."""
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > max_bytes:
            return bytes(body[:max_bytes]), True
    return bytes(body), False


def read_capped_sync(response: httpx.Response, max_bytes: int) -> tuple[bytes, bool]:
    """``read_capped`` for a blocking client's response."""
    body = bytearray()
    for chunk in response.iter_bytes():
        body += chunk
        if len(body) > max_bytes:
            return bytes(body[:max_bytes]), True
    return bytes(body), False


async def capped_lines(response: httpx.Response, max_line_bytes: int = MAX_LINE_BYTES) -> AsyncIterator[str]:
    """The body's lines (``\n`` or ``\r\n``), decoded; TooLarge for a line that does not end within
    ``max_line_bytes`` (a server streaming one endless line would otherwise fill the memory)."""
    pending = bytearray()
    async for chunk in response.aiter_bytes():
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", start)) >= 0:
            yield pending[start:end].rstrip(b"\r").decode("utf-8", "replace")
            start = end + 1
        del pending[:start]
        if len(pending) > max_line_bytes:
            raise TooLarge(f"the server sent a line of more than {max_line_bytes:,} bytes without ending it")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")


def api_url(base_url: str) -> str:
    """``http://host:port`` or ``…/v1`` -> the API root (``…/v1``); ValueError for what is not a URL."""
    text = str(base_url).strip().rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"base URL {base_url!r} is not an http:// or https:// address with a host "
            "(for example http://127.0.0.1:8080/v1)"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"base URL {base_url!r} must not have a query or fragment")
    return text if parts.path not in ("", "/") else text + "/v1"


def request_body(
    prompt_or_messages: str | Sequence[Mapping[str, str]], options: InferenceOptions, model: str | None
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) of a streaming request: chat for messages, completions for plain text.

    Every sampling option that OpenAI-compatible servers take is sent (``top_k``, ``min_p`` and
    ``repetition_penalty`` are extensions vLLM, llama.cpp and SmallMind read and others ignore; the
    penalty goes under llama.cpp's name ``repeat_penalty`` too), so a SmallMind server samples exactly
    as the local engine would and llama.cpp's does not fall back to its own defaults."""
    body: dict[str, Any] = {
        "max_tokens": options.max_new_tokens,
        "temperature": options.temperature,
        "top_p": options.top_p,
        "top_k": options.top_k,
        "min_p": options.min_p,
        "repetition_penalty": options.repetition_penalty,
        "repeat_penalty": options.repetition_penalty,  # llama.cpp's name (its server ignores the other)
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    if options.seed is not None:
        body["seed"] = options.seed
    if options.stop:
        body["stop"] = list(options.stop)
    if not options.stop_on_eos:  # vLLM's and llama.cpp's name; sent only when asked for
        body["ignore_eos"] = True
    if options.constraint is not None:  # structured output: OpenAI's response_format
        body["response_format"] = _response_format(options.constraint)
    if isinstance(prompt_or_messages, str):
        return "/completions", {**body, "prompt": prompt_or_messages}
    return "/chat/completions", {**body, "messages": check_messages(prompt_or_messages)}


def _response_format(constraint: Constraint) -> dict[str, Any]:
    if constraint.kind == "json_object":
        return {"type": "json_object"}
    if constraint.kind == "json_schema":
        schema = json.loads(constraint.value)
        return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}
    raise ValueError(f"a remote engine takes a JSON schema or object, not a {constraint.kind} constraint")


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """The messages as JSON-ready dicts; ValueError naming the first bad one."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"message {i} needs a string 'role' and a string 'content', got {message!r}")
        out.append({"role": role, "content": content})
    return out


@dataclass
class StreamState:
    """What a reply's stream has said so far."""

    pieces: list[str] = field(default_factory=list)
    n_chunks: int = 0  # chunks that carried text (a token each on most servers)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    done: bool = False  # "[DONE]" arrived
    started: bool = False  # the server accepted the request and its stream began


def parse_sse_line(line: str, state: StreamState) -> str:
    """Apply one SSE line to ``state``; returns the text it carried. RuntimeError for an error chunk."""
    if not line.startswith("data:"):
        return ""  # blank separators, ": comments", "event:" lines
    data = line[5:].strip()
    if data == "[DONE]":
        state.done = True
        return ""
    try:
        chunk = json.loads(data)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"the stream sent a line that is not JSON: {data[:80]!r}") from exc
    if not isinstance(chunk, dict):
        raise RuntimeError(f"the stream sent a chunk that is not an object: {data[:80]!r}")
    if chunk.get("error"):
        raise RuntimeError(f"the server reported an error mid-reply: {error_text(chunk)}")
    if isinstance(chunk.get("usage"), dict):
        state.usage = chunk["usage"]
    text = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        piece = delta.get("content") if isinstance(delta, dict) else None
        piece = piece if isinstance(piece, str) else choice.get("text")
        if isinstance(piece, str) and piece:
            text += piece
        if choice.get("finish_reason"):
            state.finish_reason = str(choice["finish_reason"])
    if text:
        state.pieces.append(text)
        state.n_chunks += 1
    return text


def error_text(payload: Any) -> str:
    """The message of OpenAI's error object (``{"error": {"message": ...}}``), or the text itself."""
    if isinstance(payload, dict):
        error = payload.get("error", payload)
        if isinstance(error, dict):
            return str(error.get("message") or error.get("detail") or json.dumps(error))[:MAX_ERROR_CHARS]
        if isinstance(error, str):
            return error[:MAX_ERROR_CHARS]
    return str(payload)[:MAX_ERROR_CHARS]


def response_error(status: int, reason: str, body: bytes, model: str | None, has_key: bool) -> str:
    """A refused request (status >= 400) in words, with the server's own message."""
    try:
        detail = error_text(json.loads(body))
    except (ValueError, UnicodeDecodeError):
        detail = body.decode("utf-8", "replace").strip()[:MAX_ERROR_CHARS]
    said = f": {detail}" if detail else ""
    head = f"{status} {reason}".strip()
    if status in (401, 403):
        cause = "the server refused the API key" if has_key else "the server wants an API key"
        return f"{cause} ({head}){said}"
    if status == 404:
        if model and "model" in detail.lower():
            return f"the server has no model {model!r} ({head}){said}"
        return f"nothing answers at this address ({head}); is the base URL right (it usually ends in /v1)?"
    if status in (429, 503):
        return f"the server is busy ({head}){said}"
    return f"the server answered {head}{said}"


def transport_error(exc: BaseException, timeout_s: float, connect_timeout_s: float, n_chars: int = -1) -> str:
    """A connection that failed or broke, in words (refused, unknown host, TLS, timeouts, cut), without
    the HTTP library's own messages. ``n_chars``: the reply's characters so far (-1: no reply began)."""
    chain = _causes(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        return f"no connection within {connect_timeout_s:g} s (is the host up and the port open?)"
    if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout | httpx.PoolTimeout):
        return f"the server did not answer within {timeout_s:g} s"
    if any(isinstance(c, ssl.SSLError) for c in chain) or "SSL" in str(exc):
        if any(isinstance(c, ssl.SSLCertVerificationError) for c in chain):
            return "the TLS handshake failed: the server's certificate is not trusted"
        return "the TLS handshake failed (is it really an https:// server?)"
    if any(isinstance(c, socket.gaierror) for c in chain):
        return "the host name cannot be resolved (is it spelled right?)"
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "refused" in str(exc).lower():
        return "the connection was refused (is the server running, on this port?)"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        if n_chars > 0:
            return f"the connection was cut in the middle of the reply, after {n_chars:,} characters"
        if n_chars == 0:
            return "the connection was cut before the reply's first words"
        return "the server closed the connection without answering"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect{_os_words(chain)}"
    return f"the connection failed{_os_words(chain)}"


def _os_words(chain: list[BaseException]) -> str:
    """The operating system's words for the innermost OS error (": network is unreachable"), or ""."""
    for exc in reversed(chain):
        if isinstance(exc, OSError) and exc.errno is not None and exc.errno in errno.errorcode:
            return f": {os.strerror(exc.errno).lower()}"
    return ""


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 10:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def retry_after_s(value: str | None) -> float | None:
    """A Retry-After header in seconds (the delay form; an HTTP date counts as 1 s); None if absent."""
    if value is None or not value.strip():
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return 1.0
