"""One conversation as its tab shows it: the entries, the reply being generated, versions, the
message being edited, and saving. No Qt: the tab (``tab.py``) is its view, and tests drive it alone.

Every change is written to the ``ConversationStore`` at once. When a write fails (disk full,
read-only) the conversation stays in memory, a notice says so, and once writing works again the
whole conversation is stored as shown (``catch_up``), so nothing typed or generated meanwhile is lost.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..engines.endpoints import ENGINE_KEY
from ..history.store import Conversation, ConversationStore, Message, StoreError
from .structured_output import STRUCTURED, schema_of

log = logging.getLogger(__name__)

SAVE_PARTIAL_EVERY_S = 1.0  # the text of a streaming reply is saved about once a second
FINISH_STATUS = {"stop": "complete", "length": "complete", "cancelled": "partial", "timeout": "partial"}
CONTINUABLE = ("length", "cancelled", "timeout")  # a reply cut by its token limit, or stopped: Continue
LIMIT_KEYS = ("max_new_tokens", "stopped_by", "session_limit", "limit_setting")
DOCUMENT_KEYS = ("citations", "documents_tokens", "documents_budget")  # documents/feature.py


@dataclass(eq=False)
class Entry:
    """One bubble: a stored message, the reply being generated, or a notice (never sent to the model)."""

    role: str  # "user", "assistant" or "notice"
    content: str
    status: str = "complete"  # complete | partial | streaming | error (notices: info | error)
    stats: dict[str, Any] = field(default_factory=dict)
    message_id: int | None = None  # None: not in the database (a notice, or a failed save)
    progress: tuple[int, int] | None = None  # prompt tokens processed / total, while prefilling
    editing: bool = False  # the user is changing this message in the prompt box
    copied: bool = False  # its text just went to the clipboard ("Copied ✓" for a moment)
    versions: tuple[int, int] | None = None  # (this one, how many) when the message has other versions
    copied_block: int = -1  # the code block whose text just went to the clipboard
    model: str = ""  # who said it: the model of a reply ("" when unknown)
    engine: str = ""  # "local", or the server's name


def reply_stats(result: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers kept with a reply (the store's stats_json)."""
    return {
        "n_tokens": int(result.get("generated_tokens", len(result.get("token_ids", ())))),
        "tokens_per_s": float(result.get("decode_tokens_per_s") or 0.0),
        "ttft_ms": result.get("ttft_ms"),
        "reused_tokens": int(result.get("reused_tokens", 0)),
        "prompt_tokens": int(result.get("prompt_tokens", 0)),
        "finish_reason": str(result.get("finish_reason", "")),
        "total_ms": float(result.get("total_ms") or 0.0),
        "context_trimmed": bool(result.get("context_trimmed", False)),
        **tokens_per_step(result),
        **({"error": str(result["error"])} if result.get("error") else {}),
        **{key: result[key] for key in LIMIT_KEYS if result.get(key) is not None},
        **{key: result[key] for key in DOCUMENT_KEYS if result.get(key)},  # the passages it cited
    }


def tokens_per_step(result: Mapping[str, Any]) -> dict[str, float]:
    """{"tokens_per_step": ...} for a reply that verified drafted tokens (speculative decoding)."""
    if not result.get("draft_tokens") or not result.get("decode_steps"):
        return {}
    return {"tokens_per_step": 1.0 + result.get("accepted_draft_tokens", 0) / result["decode_steps"]}


def _entries(messages: list[Message]) -> list[Entry]:
    return [Entry(m.role, m.content, m.status, dict(m.stats), m.id, model=m.model, engine=m.engine)
            for m in messages]  # fmt: skip


def continued_stats(before: Mapping[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """A continued reply's figures: its tokens in all, this part's speed and cache reuse."""
    return {**stats, "n_tokens": int(before.get("n_tokens", 0)) + stats["n_tokens"],
            "continued": int(before.get("continued", 0)) + 1}  # fmt: skip


class ConversationModel:
    """The state of one tab's conversation and its writes to the store."""

    def __init__(self, conversation: Conversation, messages: list[Message], store: ConversationStore) -> None:
        self.conversation_id = conversation.id
        self.title = conversation.title
        self.settings = dict(conversation.settings)  # the conversation's own settings (sampling, engine…)
        self.system_prompt = conversation.system_prompt
        self._store = store
        self.entries = _entries(messages)
        self.reply: Entry | None = None  # the reply being generated
        self.edited: Entry | None = None  # the user message being edited
        self.unsaved = False  # a write failed: the database is behind what the tab shows
        self.n_streamed = 0  # tokens of the reply being generated, as the worker counted them
        self.continued: tuple[str, dict[str, Any], str] | None = (
            None  # a continued reply's text, stats, status before
        )
        self._last_partial_save = 0.0
        self.refresh_versions()

    # -- reading --------------------------------------------------------------------------------
    @property
    def is_generating(self) -> bool:
        return self.reply is not None

    @property
    def has_user_message(self) -> bool:
        return any(e.role == "user" for e in self.entries)

    def last_index(self, role: str) -> int | None:
        return next((i for i in range(len(self.entries) - 1, -1, -1) if self.entries[i].role == role), None)

    def chat_messages(self) -> list[dict[str, str]]:
        """What the model sees: the system prompt, then every kept user message and reply."""
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt.strip() else []
        for entry in self.entries:
            if entry is self.reply or entry.role not in ("user", "assistant"):
                continue
            if entry.role == "assistant" and not entry.content:
                continue
            messages.append({"role": entry.role, "content": entry.content})
        return messages

    # -- the conversation's own settings ----------------------------------------------------------
    @property
    def sampling_overrides(self) -> dict[str, Any]:
        """The sampling options this chat sets itself (the rest follow the app's settings)."""
        return dict(self.settings.get("sampling", {}))

    def set_sampling_overrides(self, overrides: Mapping[str, Any]) -> None:
        """Use these for the next replies and save them with the conversation."""
        settings = {key: value for key, value in self.settings.items() if key != "sampling"}
        self.settings = {**settings, "sampling": dict(overrides)} if overrides else settings
        self.save(self._store.set_conversation_settings, self.conversation_id, self.settings)

    @property
    def saved_engine(self) -> str | None:
        """The engine this conversation remembers (None: never chosen, a new chat)."""
        value = self.settings.get(ENGINE_KEY)
        return value if isinstance(value, str) else None

    def set_engine(self, engine_id: str) -> None:
        """Answer with ``engine_id`` from the next reply on; remembered with the conversation."""
        self.settings = {**self.settings, ENGINE_KEY: engine_id}
        self.save(self._store.set_conversation_settings, self.conversation_id, self.settings)

    def set_setting(self, key: str, value: Any) -> None:
        """One of the conversation's own settings (None removes it), saved with it."""
        settings = {k: v for k, v in self.settings.items() if k != key}
        self.settings = settings if value is None else {**settings, key: value}
        self.save(self._store.set_conversation_settings, self.conversation_id, self.settings)

    def save_system_prompt(self) -> None:
        self.save(self._store.set_system_prompt, self.conversation_id, self.system_prompt)

    # -- sending --------------------------------------------------------------------------------
    def add_user_message(self, text: str) -> bool:
        """The user's message (notices go); True when it is the conversation's first."""
        self.entries = [e for e in self.entries if e.role != "notice"]
        self.catch_up()
        message = self.save(self._store.add_message, self.conversation_id, "user", text)
        first = not self.has_user_message
        self.entries.append(Entry("user", text, message_id=message.id if message else None))
        return first

    def start_reply(self) -> list[dict[str, str]]:
        """An empty reply, streaming, after the last message; the chat messages to send for it."""
        messages = self.chat_messages()
        last_user = self.last_index("user")
        stored = None  # a question that could not be saved keeps its reply in memory too (no orphan reply)
        if last_user is None or self.entries[last_user].message_id is not None:
            stored = self.save(self._store.add_message, self.conversation_id, "assistant", "", "streaming")
        self.reply = Entry("assistant", "", "streaming", message_id=stored.id if stored else None)
        if schema_of(self.sampling_overrides) is not None:  # generated under the chat's JSON schema
            self.reply.stats = {STRUCTURED: True}
        self.entries.append(self.reply)
        self._last_partial_save = time.monotonic()
        self.n_streamed = 0
        self.refresh_versions()
        return messages

    @property
    def can_continue(self) -> bool:
        """The last message is a reply cut by its token limit, or stopped: it can go on."""
        last = self.entries[-1] if self.entries else None
        if self.reply is not None or last is None or last.role != "assistant" or not last.content:
            return False
        stopped = "cancelled" if last.status == "partial" else ""  # interrupted (the app closed)
        return str(last.stats.get("finish_reason", stopped)) in CONTINUABLE

    def start_continuation(self) -> list[dict[str, str]]:
        """The last reply goes on (``can_continue``): it streams again, in place; the chat messages to
        send, that reply last (the engine goes on from its end)."""
        reply = self.entries[-1]
        self.continued = (reply.content, dict(reply.stats), reply.status)
        messages = [*self.chat_messages()[:-1], {"role": "assistant", "content": reply.content}]
        self.reply, reply.status, reply.progress = reply, "streaming", None
        self._last_partial_save = time.monotonic()
        self.n_streamed = int(reply.stats.get("n_tokens", 0))
        return messages

    def regenerate(self) -> bool:
        """Keep the reply after the last user message as a version (‹ 2/2 ›); False when there is no
        user message. Then ``start_reply``."""
        last_user = self.last_index("user")
        if last_user is None:
            return False
        last = self.entries[last_user]
        self.catch_up()
        self.entries = [e for e in self.entries if e.role != "notice"]
        self.keep_as_version(self.entries.index(last) + 1)
        return True

    # -- editing a message ----------------------------------------------------------------------
    def begin_edit(self, index: int) -> Entry:
        for entry in self.entries:
            entry.editing = False
        self.edited = self.entries[index]
        self.edited.editing = True
        return self.edited

    def end_edit(self) -> Entry | None:
        """The edit is over (sent or cancelled); the message that was edited."""
        edited, self.edited = self.edited, None
        for entry in self.entries:
            entry.editing = False
        return edited

    def commit_edit(self, edited: Entry | None) -> None:
        """The edited message is sent: it and all after it stay in the store as the older version."""
        if edited in self.entries:
            self.catch_up()
            self.keep_as_version(self.entries.index(edited))

    # -- from the worker ------------------------------------------------------------------------
    def show_progress(self, done: int, total: int) -> bool:
        if self.reply is None:
            return False
        self.reply.progress = (done, total)
        return True

    def add_text(self, text: str, n_tokens: int | None = None) -> bool:
        """More text of the reply; ``n_tokens``: the tokens it has so far (kept if the app quits)."""
        reply = self.reply
        if reply is None:
            return False
        reply.content += text
        reply.progress = None
        if n_tokens is not None:  # a continued reply counts its tokens before too
            self.n_streamed = n_tokens + (int(self.continued[1].get("n_tokens", 0)) if self.continued else 0)
        now = time.monotonic()
        if reply.message_id is not None and now - self._last_partial_save >= SAVE_PARTIAL_EVERY_S:
            self._last_partial_save = now
            self.save(
                self._store.update_message,
                reply.message_id,
                content=reply.content,
                stats={"n_tokens": self.n_streamed},  # a crash keeps the count with the text
            )
        return True

    def finish(self, result: Mapping[str, Any]) -> dict[str, Any] | None:
        """The reply ended: its text, status and figures, saved; its stats (None: no reply running)."""
        reply = self.reply
        if reply is None:
            return None
        stats = reply_stats(result) | ({STRUCTURED: True} if reply.stats.get(STRUCTURED) else {})
        reply.content = str(result.get("text", reply.content))
        if self.continued is not None:  # the reply grows in place: its text before, then this part
            before, before_stats, _ = self.continued
            reply.content, stats = before + reply.content, continued_stats(before_stats, stats)
            self.continued = None
        reply.stats, reply.progress = stats, None
        reply.status = FINISH_STATUS.get(stats["finish_reason"], "error")
        reply.model = str(result.get("model") or reply.model)
        reply.engine = str(result.get("engine") or reply.engine)
        if reply.message_id is not None:
            self.save(
                self._store.update_message,
                reply.message_id,
                content=reply.content,
                status=reply.status,
                stats=stats,
                model=reply.model,
                engine=reply.engine,
            )
        self.reply = None
        self.catch_up()
        return stats

    def refuse(self, message: str) -> None:
        """The engine did not take the request: its empty reply goes (a continued one is as it was),
        a notice says why."""
        reply = self.reply
        if reply is not None and self.continued is not None:
            reply.content, reply.stats, reply.status = self.continued
            self.reply, self.continued = None, None
        elif reply is not None:
            if reply.message_id is not None:
                self.save(self._store.delete_messages_from, self.conversation_id, reply.message_id)
            self.entries.remove(reply)
            self.reply = None
            if reply.message_id is not None and not self.unsaved:
                self.reload()  # a regenerated reply that failed: the one it replaced is chosen again
        self.add_notice(message, "error")

    def save_partial(self) -> bool:
        """The tab closes or the app quits while generating: keep the text so far, marked partial."""
        reply = self.reply
        if reply is None:
            return False
        reply.status = "partial"
        reply.stats = {"finish_reason": "cancelled", "n_tokens": self.n_streamed}
        self.continued = None
        if reply.message_id is not None:
            self.save(
                self._store.update_message,
                reply.message_id,
                content=reply.content,
                status="partial",
                stats=reply.stats,
            )
        self.reply = None
        return True

    def add_notice(self, text: str, kind: str = "info") -> None:
        self.entries.append(Entry("notice", text, kind))

    # -- versions -------------------------------------------------------------------------------
    def keep_as_version(self, index: int) -> None:
        """entries[index:] leave the tab but stay in the store as the older version of their place;
        the next message sent or generated there is the new version."""
        stored = index < len(self.entries) and self.entries[index].message_id is not None
        if not stored or self.unsaved:  # not in the database: nothing to keep
            self._drop_from(index)
            return
        self.save(self._store.start_version, self.conversation_id, self.entries[index].message_id)
        del self.entries[index:]

    def select_version(self, index: int, step: int) -> bool:
        """Show the version ``step`` places from entry ``index``'s; the conversation continues from it."""
        if not 0 <= index < len(self.entries) or self.entries[index].message_id is None:
            return False
        if not self.save(
            self._store.select_version, self.conversation_id, self.entries[index].message_id, step
        ):
            return False
        self.reload()
        return True

    def reload(self) -> None:
        """The conversation as stored (after a version switch); notices go."""
        try:
            messages = self._store.messages(self.conversation_id)
        except StoreError as exc:
            log.warning("cannot reload conversation %s: %s", self.conversation_id, exc)
            return
        self.entries = _entries(messages)
        self.refresh_versions()

    def refresh_versions(self) -> None:
        """Mark each entry that has versions with (its number, how many)."""
        try:
            info = self._store.version_info(self.conversation_id)
        except StoreError as exc:
            log.warning("cannot read the versions of %s: %s", self.conversation_id, exc)
            info = {}
        for entry in self.entries:
            entry.versions = info.get(entry.message_id) if entry.message_id is not None else None

    def _drop_from(self, index: int) -> None:
        """Remove entries[index:] from memory and their messages from the database."""
        first_stored = next((e.message_id for e in self.entries[index:] if e.message_id is not None), None)
        if first_stored is not None:
            self.save(self._store.delete_messages_from, self.conversation_id, first_stored)
        del self.entries[index:]

    # -- store ----------------------------------------------------------------------------------
    def save(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """One store write; on failure the conversation stays in memory and a notice says why."""
        try:
            return write(*args, **kwargs)
        except (StoreError, KeyError) as exc:
            log.warning("store write failed: %s", exc)
            self.unsaved = True
            detail = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            self.add_notice(f"{detail}. This conversation is kept in memory only for now.", "error")
            return None

    def catch_up(self) -> None:
        """After a failed write, once writing works again (space freed, file writable): store the
        conversation as the tab shows it, so nothing typed or generated meanwhile is lost."""
        if not self.unsaved or self.reply is not None:
            return
        kept = [e for e in self.entries if e.role in ("user", "assistant")]
        try:
            stored = self._store.replace_messages(
                self.conversation_id,
                [(e.role, e.content, e.status, e.stats, e.model, e.engine) for e in kept],
                system_prompt=self.system_prompt,
                settings=self.settings,
            )
        except (StoreError, KeyError) as exc:  # still failing: the tab's notice already says so
            log.info("conversation %s still not saved: %s", self.conversation_id, exc)
            return
        for entry, message in zip(kept, stored, strict=True):
            entry.message_id = message.id
        self.unsaved = False
        self.refresh_versions()  # stored again as one thread: no versions
        log.info("conversation %s saved again (%d messages)", self.conversation_id, len(stored))
