"""What the conversation store hands out and how it fails: the ``Conversation`` and ``Message``
records read from its rows, and ``StoreError`` with a sentence for the user. No Qt, no SQL writes."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any


class StoreError(Exception):
    """The database could not be opened, read or written; the message is meant for the user."""


class StoreCorruptError(StoreError):
    """The file is not a SQLite database or is damaged; `move_aside` it and start a new one."""


@dataclass(frozen=True, slots=True)
class Conversation:
    id: str  # uuid4 hex; also the engine's KV-cache session id
    title: str
    system_prompt: str
    settings: Mapping[str, Any]  # per-tab sampling overrides
    position: int  # tab order, 0 first
    created_at: float  # seconds since the epoch
    updated_at: float


@dataclass(frozen=True, slots=True)
class Message:
    id: int  # never reused, so a stale id cannot hit a newer message
    conversation_id: str
    role: str
    content: str
    status: str
    stats: Mapping[str, Any]  # n_tokens, tokens_per_s, ttft_ms, reused_tokens, finish_reason, ...
    created_at: float
    model: str = ""  # who said it: the model of a reply ("" for the user's, and replies stored before)
    engine: str = ""  # "local", or the server's name


def reason(exc: sqlite3.Error) -> str:
    """The user-facing reason for a SQLite error, from its error code."""
    name = getattr(exc, "sqlite_errorname", "")
    if name == "SQLITE_FULL":
        return "the disk is full"
    if name.startswith("SQLITE_READONLY"):
        return "the database file or its folder is read-only"
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return "the database is locked by another program (is SmallMind already running?)"
    if name.startswith("SQLITE_CANTOPEN"):
        return "the file cannot be opened (check that its folder exists and is writable)"
    if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
        return "it is not a SQLite database or it is damaged"
    if name.startswith("SQLITE_IOERR"):
        return f"a disk input/output error ({exc})"
    return str(exc)


def store_error(action: str, path: Path, exc: sqlite3.Error) -> StoreError:
    name = getattr(exc, "sqlite_errorname", "")
    cls = StoreCorruptError if name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")) else StoreError
    return cls(f"cannot {action}: {reason(exc)} ({path})")


def to_json(value: Mapping[str, Any] | None, name: str) -> str:
    try:
        return json.dumps(dict(value or {}), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be a JSON object of plain values, got {value!r}: {exc}") from exc


def conversation_from(row: sqlite3.Row) -> Conversation:
    values = dict(row)  # the column names are the field names, but for the JSON column
    settings = MappingProxyType(json.loads(values.pop("settings_json")))
    return Conversation(**values, settings=settings)


def message_from(row: sqlite3.Row) -> Message:
    values = dict(row)
    values.pop("parent_id", None)  # the version tree is read through thread() and version_info()
    values.pop("active", None)
    stats = MappingProxyType(json.loads(values.pop("stats_json")))
    return Message(**values, stats=stats)


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
