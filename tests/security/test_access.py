"""Who may talk to the server: ``is_loopback`` over names and address literals, the Host rule of a
keyless server, API keys and keys files (each key its own owner, never shown in an error)."""

from __future__ import annotations

from pathlib import Path

import pytest

from smallmind_server.access import (
    KEY_OWNER_PREFIX,
    ApiKeys,
    host_allowed,
    host_of,
    is_loopback,
    read_keys_file,
)
from smallmind_server.serve import ServeOptions

LOOPBACK = [
    "localhost", "LocalHost", "localhost.", "127.0.0.1", "127.0.0.2", "127.255.255.254", "127.1.2.3",
    "::1", "[::1]", "0:0:0:0:0:0:0:1", "::ffff:127.0.0.1", "[::ffff:127.9.9.9]", " 127.0.0.1 ",
]  # fmt: skip
NOT_LOOPBACK = [
    "0.0.0.0", "::", "[::]", "0:0:0:0:0:0:0:0", "192.168.1.10", "10.0.0.1", "8.8.8.8", "128.0.0.1",
    "126.255.255.255", "::2", "fe80::1", "::ffff:8.8.8.8", "2001:db8::1", "example.com", "evil.example",
    "localhost.evil.example", "localhost.localdomain", "sub.localhost", "localhost..", "127.0.0.1.nip.io",
    "my-laptop", "", "   ", "127.1", "0x7f.0.0.1", "2130706433", "localhost:8080", "[::1]:80", "*",
]  # fmt: skip


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_names_and_addresses(host: str) -> None:
    assert is_loopback(host)


@pytest.mark.parametrize("host", NOT_LOOPBACK)
def test_wildcards_public_addresses_and_other_names_are_not_loopback(host: str) -> None:
    """``127.1`` and ``2130706433`` do reach 127.0.0.1 through inet_aton, but they are not what a user
    means by a loopback address: refusing them is the safe side (a key is asked for)."""
    assert not is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com", "localhost.localdomain"])
def test_serve_refuses_a_non_loopback_host_without_a_key(host: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="without an API key"):
        ServeOptions(tmp_path / "m.gguf", host=host)
    ServeOptions(tmp_path / "m.gguf", host=host, api_keys=("k",))  # with a key: allowed


@pytest.mark.parametrize(
    ("header", "host"),
    [("localhost", "localhost"), ("localhost:8080", "localhost"), ("[::1]:8080", "::1"), ("[::1]", "::1"),
     ("127.0.0.1:1", "127.0.0.1"), ("evil.example:80", "evil.example"), ("a:b", None), ("[::1]x", None),
     ("[::1", None), (":80", None), ("::1", None)],
)  # fmt: skip
def test_host_of_a_host_header(header: str, host: str | None) -> None:
    assert host_of(header) == host


@pytest.mark.parametrize(
    ("header", "bound", "allowed"),
    [("localhost:8080", "127.0.0.1", True), ("127.0.0.1:8080", "127.0.0.1", True),
     ("[::1]:8080", "::1", True), ("LOCALHOST.:1", "127.0.0.1", True), ("127.3.4.5", "127.0.0.1", True),
     ("evil.example:8080", "127.0.0.1", False), ("evil.example", None, False), (None, "127.0.0.1", False),
     ("", "127.0.0.1", False), ("my-host:80", "my-host", True), ("0.0.0.0:8080", "127.0.0.1", False),
     ("localhost:80@evil.example", "127.0.0.1", False)],
)  # fmt: skip
def test_host_rule(header: str | None, bound: str | None, allowed: bool) -> None:
    assert host_allowed(header, bound) is allowed


def test_each_key_is_its_own_owner_and_no_label_holds_a_key() -> None:
    keys = ApiKeys(["alpha-key", "beta-key", "alpha-key"])
    assert len(keys) == 2 and keys
    a, b = keys.owner_of("alpha-key"), keys.owner_of("beta-key")
    assert a is not None and b is not None and a != b
    assert a.startswith(KEY_OWNER_PREFIX) and "alpha" not in a and "beta" not in b
    assert keys.owner_of("alpha-keyx") is None and keys.owner_of("") is None
    assert ApiKeys(["alpha-key"]).owner_of("alpha-key") != a  # a label means nothing after a restart
    assert not ApiKeys()


@pytest.mark.parametrize("bad", ["", "  ", "has space", "tab\there", "ключ", "nul\x00"])
def test_a_key_no_client_could_send_is_refused_without_showing_it(bad: str) -> None:
    with pytest.raises(ValueError, match="API key") as caught:
        ApiKeys(["good", bad])
    assert bad.strip() == "" or bad not in str(caught.value)


def test_keys_file_one_a_line_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\n\n  first-key  \n#second-key\nthird-key\n", encoding="utf-8")
    assert read_keys_file(path) == ["first-key", "third-key"]


@pytest.mark.parametrize(
    ("text", "message"),
    [("# nothing\n\n", "holds no key"), ("ok\nsecret with space\n", "line 2"), (None, "cannot read")],
)
def test_bad_keys_file_names_the_line_never_the_key(tmp_path: Path, text: str | None, message: str) -> None:
    path = tmp_path / "keys"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        read_keys_file(path)
    assert "secret" not in str(caught.value)
