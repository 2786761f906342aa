"""Who may talk to the server, and who owns what they leave in the KV cache.

- **API keys.** ``ApiKeys`` holds the keys a server accepts (``Authorization: Bearer KEY``). Each key
  is its own owner; without keys, every request comes from one owner, the keyless local client. An
  owner's label is an HMAC of its key under a secret made at start-up, so the key itself never
  reaches a session id, a disk file or a log line (and a label means nothing after a restart).
- **Owners.** A request's owner goes into its ``SessionId``: the KV store shares prefixes, loads
  disk files and reports cached tokens only within one owner, and the app's own tabs are another
  owner (``engine.APP_OWNER``).
- **Host.** A keyless server answers only requests addressed to a loopback name or address (or the
  address it is bound to): a web page whose DNS name was re-pointed at 127.0.0.1 (DNS rebinding)
  sends its own name as ``Host`` and is refused with 403. With a key, the key is the guard and any
  ``Host`` is served.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path

LOCAL_OWNER = "api-local"  # the keyless local client
KEY_OWNER_PREFIX = "api-key-"


def check_listen_address(host: str, has_key: bool) -> None:
    """The one rule for where a server may listen: off loopback only with an API key (ValueError)."""
    if not has_key and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host} without an API key: anyone on the network could use "
            "the model. Pass --api-key KEY (clients send 'Authorization: Bearer KEY'), or bind 127.0.0.1"
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) can only mean this
    machine: ``localhost`` (also ``localhost.``), 127.0.0.0/8, ``::1``, IPv4-mapped loopback. The
    wildcard addresses (``0.0.0.0``, ``::``) and every other name are not."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host.lower().rstrip(".") == "localhost" and host.count(".") <= 1:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def host_of(header: str) -> str | None:
    """The host part of a ``Host`` header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``), or None
    when it is not of that form."""
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return header[1:end]
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    return name or None


def host_allowed(header: str | None, bound_host: str | None) -> bool:
    """Whether a keyless server answers a request with this ``Host``: loopback, or the bound address."""
    host = host_of(header) if header else None
    if host is None:
        return False
    if is_loopback(host):
        return True
    return bound_host is not None and host.lower() == bound_host.strip("[]").lower()


def check_key(key: str) -> str:
    """A key as given (stripped); ValueError (never showing the key) if no client could send it."""
    key = key.strip()
    if not key:
        raise ValueError("an API key is empty")
    if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
        raise ValueError("an API key may hold only printable ASCII characters without spaces")
    return key


def read_keys_file(path: str | Path) -> list[str]:
    """The keys of a keys file: one a line; blank lines and lines starting with ``#`` are skipped.
    ValueError names the file and the line, never a key."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API keys file {path}: {exc}") from exc
    keys = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            keys.append(check_key(line))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: {exc}") from exc
    if not keys:
        raise ValueError(f"the API keys file {path} holds no key")
    return keys


class ApiKeys:
    """The keys a server accepts, each its own owner; empty: no key needed, one local owner."""

    def __init__(self, keys: Iterable[str] = ()) -> None:
        self._secret = secrets.token_bytes(32)
        self._keys: list[tuple[bytes, str]] = []
        for key in dict.fromkeys(check_key(k) for k in keys):  # in order, once each
            label = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:16]
            self._keys.append((key.encode(), KEY_OWNER_PREFIX + label))

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def owner_of(self, token: str) -> str | None:
        """The owner of a bearer token, or None if it is no key of ours (every key is compared, in
        constant time, so the answer's timing tells nothing about which key came close)."""
        given = token.encode("utf-8", "surrogateescape")
        found = None
        for key, owner in self._keys:
            if hmac.compare_digest(given, key):
                found = owner
        return found

    @property
    def owners(self) -> Sequence[str]:
        return [owner for _, owner in self._keys]
