"""A remote server is not trusted to behave: hand-written misbehaving servers on 127.0.0.1 (the
helpers of tests/fixtures/http_faults.py). An error body or an SSE line that never ends is read only
up to a cap; a server ignoring max_tokens is cut at max_new_tokens and sees the client leave; a reply
the server gives up on, or a connection cut, says so in plain words (no HTTP library jargon).

Every server loop is bounded (a number of bytes or chunks) and stops when the client leaves.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from engine import InferenceOptions
from engine.errors import RemoteEngineError
from engine.remote import RemoteEngine
from engine.remote_http import MAX_LINE_BYTES, MAX_MODELS_BYTES
from tests.fixtures.http_faults import STREAM_HEAD, delta, fault_server, sse_chunk

MESSAGES = [{"role": "user", "content": "Hello"}]
GREEDY = InferenceOptions(temperature=0.0, max_new_tokens=20)
RESULT_TIMEOUT_S = 30.0
SENT_BOUND = 32 << 20  # what a client that stops reading lets a server push (socket buffers), at most
ENDLESS = 128 << 20  # what the endless servers below send at most, when nobody stops them
JARGON = ("peer closed", "incomplete chunked read", "httpx", "Errno", "RemoteProtocolError", "ReadError")


class Pusher:
    """An answer that writes ``head`` then ``piece`` over and over (up to ``limit`` bytes, or until the
    client closes the connection); ``sent`` counts the bytes written."""

    def __init__(self, head: bytes, piece: bytes, limit: int = ENDLESS) -> None:
        self.head, self.piece, self.limit = head, piece, limit
        self.sent = 0
        self.stopped = threading.Event()

    def __call__(self, conn: socket.socket, n: int) -> None:
        try:
            conn.sendall(self.head)
            while self.sent < self.limit:
                conn.sendall(self.piece)
                self.sent += len(self.piece)
        except OSError:
            pass  # the client closed the connection: what we want
        finally:
            self.stopped.set()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def test_an_error_body_that_never_ends_is_read_up_to_a_cap() -> None:
    head = b"HTTP/1.1 500 Internal Server Error\r\nTransfer-Encoding: chunked\r\n\r\n"
    endless = Pusher(head, chunk(b"x" * 65536))
    with fault_server(endless) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(RESULT_TIMEOUT_S)
        engine.stop()
        assert endless.stopped.wait(10)
    assert result.finish_reason == "error" and "500 Internal Server Error" in (result.error or "")
    assert endless.sent < SENT_BOUND, f"the client read {endless.sent:,} bytes of an error body"


def test_an_sse_line_that_never_ends_is_refused() -> None:
    endless = Pusher(STREAM_HEAD + chunk(b"data: "), chunk(b"x" * 65536))
    with fault_server(endless) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(RESULT_TIMEOUT_S)
        engine.stop()
        assert endless.stopped.wait(10)
    assert result.finish_reason == "error"
    assert f"a line of more than {MAX_LINE_BYTES:,} bytes without ending it" in (result.error or "")
    assert endless.sent < SENT_BOUND, f"the client read {endless.sent:,} bytes of one line"


def test_a_model_list_that_never_ends_is_refused() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    endless = Pusher(head + chunk(b'{"data": ['), chunk(b'{"id": "m"},' * 5000))
    with fault_server(endless) as server:
        with pytest.raises(RemoteEngineError, match=f"more than {MAX_MODELS_BYTES:,} bytes"):
            RemoteEngine(server.base_url).list_models(timeout_s=RESULT_TIMEOUT_S)
        assert endless.stopped.wait(10)
    assert endless.sent < SENT_BOUND


def test_a_server_ignoring_max_tokens_is_cut_at_max_new_tokens_and_sees_the_client_leave() -> None:
    sent: list[int] = []
    left = threading.Event()

    def chatty(conn: socket.socket, n: int) -> None:
        try:
            conn.sendall(STREAM_HEAD)
            for i in range(5000):  # 5,000 words for max_tokens=20, slowly: about 10 s if nobody leaves
                conn.sendall(sse_chunk(delta(f"w{i} ")))
                sent.append(i)
                time.sleep(0.002)
        except OSError:
            left.set()

    with fault_server(chatty) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(RESULT_TIMEOUT_S)
        engine.stop()
        assert left.wait(10), "the server never saw the client leave"
    assert result.finish_reason == "length" and result.error is None
    assert result.text == "".join(f"w{i} " for i in range(20)) and result.generated_tokens == 20
    assert len(sent) < 1000


def test_a_reply_the_server_gives_up_on_says_so() -> None:
    """What a SmallMind server sends when SIGTERM cancels a reply: finish_reason "cancelled"."""

    def shut_down(conn: socket.socket, n: int) -> None:
        body = sse_chunk(delta("Once upon")) + sse_chunk(delta(" a time")) + sse_chunk(delta("", "cancelled"))
        conn.sendall(STREAM_HEAD + body + sse_chunk("[DONE]") + b"0\r\n\r\n")

    with fault_server(shut_down) as server:
        engine = RemoteEngine(server.base_url, name="box")
        result = engine.submit(MESSAGES, GREEDY).result(RESULT_TIMEOUT_S)
        engine.stop()
    assert result.finish_reason == "error" and result.text == "Once upon a time"
    assert "box" in (result.error or "") and "the server ended the reply before it finished" in (
        result.error or ""
    )


@pytest.mark.parametrize("when", ["mid-reply", "before the reply", "before answering"])
def test_a_cut_connection_is_said_without_library_jargon(when: str) -> None:
    def cut(conn: socket.socket, n: int) -> None:
        if when == "mid-reply":
            conn.sendall(STREAM_HEAD + sse_chunk(delta("Hello")) + sse_chunk(delta(" wor")))
        elif when == "before the reply":
            conn.sendall(STREAM_HEAD)
        conn.shutdown(socket.SHUT_RDWR)

    with fault_server(cut) as server:
        engine = RemoteEngine(server.base_url)
        result = engine.submit(MESSAGES, GREEDY).result(RESULT_TIMEOUT_S)
        engine.stop()
    message = result.error or ""
    assert result.finish_reason == "error" and not any(word in message for word in JARGON), message
    expected = {
        "mid-reply": "the connection was cut in the middle of the reply, after 9 characters",
        "before the reply": "the connection was cut before the reply's first words",
        "before answering": "the server closed the connection without answering",
    }[when]
    assert message.endswith(expected), message
