"""From what the caller gives (raw text or chat messages) to prompt token ids that fit the session.

Chat messages are rendered with the model's own chat template; message contents are tokenized as
plain text (``Tokenizer.encode_messages``), so text a user types that spells a special token cannot
forge a role turn. A conversation longer than the session's token limit loses its oldest whole turns
after the system prompt (``context_trimmed``); what still does not fit is refused with the numbers.
"""

from __future__ import annotations

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


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Validate chat messages; returns clean copies. Raises ValueError naming the problem."""
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(
                f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}"
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has role {role!r}; allowed roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {i} content must be text, got {type(content).__name__}")
        out.append({"role": str(role), "content": clean_text(content)})
    if not out[-1]["content"].strip():
        raise ValueError("the last message is empty; write something to send")
    return out


def drop_oldest_turn(messages: list[dict[str, str]]) -> list[dict[str, str]] | None:
    """The conversation without its oldest turn after the system prompt(s), or None if none can go.

    A turn is a user message and the assistant reply after it; the last message always stays.
    """
    first = 0
    while first < len(messages) and messages[first]["role"] == "system":
        first += 1
    if first >= len(messages) - 1:
        return None
    end = first + 1
    if messages[first]["role"] == "user" and end < len(messages) - 1 and messages[end]["role"] == "assistant":
        end += 1
    return messages[:first] + messages[end:]


class PromptBuilder:
    """Tokenizes prompts for the engine, fitting conversations into a token limit."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def build(
        self, prompt: str | Sequence[Mapping[str, Any]], limit: int, options: InferenceOptions
    ) -> tuple[list[int], bool]:
        """(prompt ids, whether old turns were dropped). A str is raw text (special tokens parsed)."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = list(self.tokenizer.encode(clean_text(prompt)))
            if len(ids) > limit:
                raise ContextOverflowError(len(ids), limit)
            return ids, False
        messages = check_messages(prompt)
        reserve = min(options.max_new_tokens, limit // 2)  # room left for the reply
        ids = list(self.tokenizer.encode_messages(messages, add_generation_prompt=True))
        trimmed = False
        while len(ids) + reserve > limit:
            shorter = drop_oldest_turn(messages)
            if shorter is None:
                break
            messages, trimmed = shorter, True
            ids = list(self.tokenizer.encode_messages(messages, add_generation_prompt=True))
        if len(ids) > limit:
            raise ContextOverflowError(
                len(ids), limit, what="the conversation, even without its older turns,"
            )
        return ids, trimmed
