"""From what the caller gives (raw text or chat messages) to prompt token ids that fit the session.

Chat messages are rendered with the model's own chat template; message contents are tokenized as
plain text (``Tokenizer.encode_messages``), so text a user types that spells a special token cannot
forge a role turn. A conversation longer than the session's token limit loses its oldest whole turns
after the system prompt (``context_trimmed``); what still does not fit is refused with the numbers.
How many turns go is found by bisection, so a 400-turn chat is tokenized about 10 times, not 400.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ContextOverflowError
from .sampling import InferenceOptions

ROLES = ("system", "user", "assistant")
_SURROGATES = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Replace lone UTF-16 surrogates (not encodable as UTF-8) with U+FFFD."""
    return _SURROGATES.sub("\ufffd", text)


def check_messages(messages: Sequence[Mapping[str, Any]], allow_tools: bool = False) -> list[dict[str, Any]]:
    """Validate chat messages; returns clean copies. Raises ValueError naming the problem.

    ``allow_tools`` (a template with its own tool format): ``role: "tool"`` results (with their
    ``tool_call_id``) and assistant messages with ``tool_calls`` are kept as they are."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        roles = (*ROLES, "tool") if allow_tools else ROLES
        if role not in roles:
            raise ValueError(f"message {i} has role {role!r}; allowed roles: {', '.join(roles)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be text, got {type(content).__name__}")
        out.append({"role": str(role), "content": clean_text(content)})
        if allow_tools:
            out[-1].update(_tool_fields(i, message))
    if not out[-1]["content"].strip():
        raise ValueError("the last message is empty; write something to send")
    return out


def _tool_fields(i: int, message: Mapping[str, Any]) -> dict[str, Any]:
    """A message's tool-calling fields, checked: an assistant's ``tool_calls``, a result's id."""
    fields: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        if message.get("role") != "assistant" or not isinstance(calls, list):
            raise ValueError(f"message {i}: only an assistant message has tool_calls, a list")
        fields["tool_calls"] = calls
    if message.get("role") == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise ValueError(f"message {i}: a tool result needs the tool_call_id of its call")
        fields["tool_call_id"] = call_id
    return fields


class TurnTrimmer:
    """A conversation and its shorter versions: ``version(k)`` is it without its k oldest turns.

    A turn is a user message and the assistant reply after it; system messages and the last message
    always stay. Finding every cut point costs O(len(messages)) and only the versions asked for are
    built, so bisecting over a long chat stays cheap.
    """

    def __init__(self, messages: list[dict[str, str]]) -> None:
        self._messages = messages
        self._systems: list[int] = []  # indices of the system messages (kept in every version)
        self._cuts: list[tuple[int, int]] = []  # per version: (n of _systems before the tail, tail start)
        tail, last = 0, len(messages) - 1
        while True:
            while tail <= last and messages[tail]["role"] == "system":
                self._systems.append(tail)
                tail += 1
            self._cuts.append((len(self._systems), tail))
            if tail >= last:
                break
            end = tail + 1
            if messages[tail]["role"] == "user" and end < last and messages[end]["role"] == "assistant":
                end += 1
            tail = end

    def __len__(self) -> int:
        """How many versions: the whole conversation, then one per droppable turn."""
        return len(self._cuts)

    def version(self, k: int) -> list[dict[str, str]]:
        n_systems, tail = self._cuts[k]
        return [self._messages[i] for i in self._systems[:n_systems]] + self._messages[tail:]


class Continuation(list[dict[str, str]]):
    """Chat messages whose last one is an assistant reply to go on from (a reply cut by its token
    limit, or stopped): the prompt is the conversation before it, the assistant's turn opened, and
    the reply's text, with no end of turn. Its tokens are those the reply was generated after, so the
    session's cached K/V are reused (the prompt is not recomputed)."""


class PromptBuilder:
    """Tokenizes prompts for the engine, fitting conversations into a token limit."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def build(
        self,
        prompt: str | Sequence[Mapping[str, Any]],
        limit: int,
        options: InferenceOptions,
        tools: Sequence[Any] | None = None,
    ) -> tuple[list[int], bool]:
        """(prompt ids, whether old turns were dropped). A str is raw text (special tokens parsed);
        ``tools``: the functions a template with its own tool format describes."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"the prompt is {'only whitespace' if prompt else 'empty'}; write something")
            ids = list(self.tokenizer.encode(clean_text(prompt)))
            if len(ids) > limit:
                raise ContextOverflowError(len(ids), limit)
            return ids, False
        messages = check_messages(prompt, allow_tools=tools is not None)
        continuing = isinstance(prompt, Continuation)
        if continuing and messages[-1]["role"] != "assistant":
            raise ValueError("a continuation's last message must be the assistant's reply to go on from")
        trimmer = TurnTrimmer(messages)
        reserve = min(options.max_new_tokens, limit // 2)  # room left for the reply
        encoded = functools.cache(lambda k: self._encode(trimmer.version(k), tools, continuing))
        low, high = 0, len(trimmer) - 1  # bisect: the fewest dropped turns that fit, else all droppable
        while low < high:
            middle = (low + high) // 2
            if len(encoded(middle)) + reserve <= limit:
                high = middle
            else:
                low = middle + 1
        ids = encoded(low)
        if len(ids) > limit:
            raise ContextOverflowError(
                len(ids), limit, what="the conversation, even without its older turns,"
            )
        return ids, low > 0

    def _encode(
        self, messages: list[dict[str, Any]], tools: Sequence[Any] | None = None, continuing: bool = False
    ) -> list[int]:
        if not continuing:
            return list(self.tokenizer.encode_messages(messages, add_generation_prompt=True, tools=tools))
        opened = list(self.tokenizer.encode_messages(messages[:-1], add_generation_prompt=True, tools=tools))
        return opened + list(self.tokenizer.encode(messages[-1]["content"], parse_special=False))
