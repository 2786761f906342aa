"""Text <-> token ids from the GGUF's own vocabulary, the chat template, and UTF-8-safe streaming.

    tok = Tokenizer.from_gguf(path)                      # or an opened GgufFile
    ids = tok.encode_messages([{"role": "user", "content": "Hi"}])
    dec = tok.stream_decoder()
    text = "".join(dec.feed(i) for i in generated_ids) + dec.flush()

Special tokens (token types CONTROL and USER_DEFINED) written in text become their ids when
``parse_special``; ``encode_messages`` allows that only in the template's own text, never in a
message's content, so a user cannot forge a role turn by typing ``<|im_start|>system``.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
from array import array
from collections.abc import Iterable, Mapping, Sequence
from enum import IntEnum
from itertools import accumulate
from pathlib import Path
from typing import Any, Protocol

import regex

from .architectures import ARCHITECTURES, PLAIN_TRANSCRIPT_TEMPLATE
from .bpe import ByteLevelBpe
from .chat_template import CHATML_TEMPLATE, ChatTemplate, ChatTemplateError, Messages, Segment
from .errors import ModelFileError, UnsupportedModelError
from .gguf import MAX_CONTEXT_LENGTH, GgufFile
from .memory import return_freed_memory
from .spm import SentencePieceBpe

log = logging.getLogger(__name__)

__all__ = ["ChatTemplateError", "StreamDecoder", "TokenType", "Tokenizer"]


class TokenType(IntEnum):
    """``tokenizer.ggml.token_type`` values (llama.cpp's ``llama_token_type``)."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6


_MATCHED_IN_TEXT = (TokenType.CONTROL, TokenType.USER_DEFINED)  # written whole in text, never made by BPE
_SKIPPED = (TokenType.CONTROL, TokenType.UNKNOWN)  # markers that decode(skip_special=True) drops
_SPECIAL, _SKIP = 1, 2  # a token's flags: one of _MATCHED_IN_TEXT, one of _SKIPPED
# tokenizer.ggml.<name>_token_id keys; the chat template sees each as <name>_token (bos_token, eos_token...).
_SPECIAL_NAMES = ("bos", "eos", "eot", "eom", "unknown", "padding")


class TextModel(Protocol):
    """What the tokenizer needs from a vocabulary model (byte-level BPE, SentencePiece BPE)."""

    def encode_text(self, text: str) -> list[int]: ...

    def token_bytes(self, token: str) -> bytes: ...

    @property
    def strip_leading_space(self) -> bool: ...


class StreamDecoder:
    """Turns generated ids into text as they come, holding back bytes of a character split across tokens."""

    __slots__ = ("_at_start", "_piece", "_skip", "_utf8")

    def __init__(self, tokenizer: Tokenizer, skip_special: bool) -> None:
        self._piece = tokenizer._piece
        self._skip = tokenizer._skip_ids if skip_special else frozenset()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = tokenizer._model.strip_leading_space  # drop the space encoding put in front

    def feed(self, token_id: int) -> str:
        """The text completed by this token ("" while a character is still incomplete)."""
        if token_id in self._skip:
            return ""
        return self._strip_first(self._utf8.decode(self._piece(token_id)))

    def flush(self) -> str:
        """Whatever is left; an incomplete character becomes U+FFFD."""
        return self._strip_first(self._utf8.decode(b"", final=True))

    def _strip_first(self, text: str) -> str:
        if self._at_start and text:
            self._at_start = False
            return text.removeprefix(" ")
        return text


class Tokenizer:
    """A GGUF model's tokenizer. Build it with ``Tokenizer.from_gguf``."""

    def __init__(
        self,
        model: TextModel,
        tokens: Sequence[str],
        token_types: Sequence[int],
        *,
        bos_id: int | None,
        eos_ids: Iterable[int],
        add_bos: bool,
        chat_template: ChatTemplate,
        has_own_template: bool = True,
    ) -> None:
        self._model = model
        # Every token's bytes in one string, token i at _ends[i]:_ends[i + 1] (a special token: its text
        # in UTF-8), and one flag byte per token: ~0.6 MiB for SmolLM2 where a list of str took ~3 MiB.
        self._flags = bytes(
            (_SPECIAL if t in _MATCHED_IN_TEXT else 0) | (_SKIP if t in _SKIPPED else 0) for t in token_types
        )
        pieces = [
            text.encode() if flag & _SPECIAL else model.token_bytes(text)
            for text, flag in zip(tokens, self._flags, strict=True)
        ]
        self._bytes = b"".join(pieces)
        self._ends = array("I", [0, *accumulate(map(len, pieces))])
        self.bos_id = bos_id
        self.eos_ids = frozenset(eos_ids)
        self.add_bos = add_bos
        self._special_ids: dict[str, int] = {}
        for i, flag in enumerate(self._flags):
            if flag & _SPECIAL and tokens[i]:
                self._special_ids.setdefault(tokens[i], i)
        by_length = sorted(self._special_ids, key=len, reverse=True)  # longest first: leftmost-longest match
        self._special_re = regex.compile("|".join(map(regex.escape, by_length))) if by_length else None
        self._skip_ids = frozenset(i for i, flag in enumerate(self._flags) if flag & _SKIP)
        self.chat_template = chat_template
        # False for a file without a chat template: usually a base model, which continues text rather
        # than following instructions (the app says so)
        self.has_own_template = has_own_template

    @classmethod
    def from_gguf(
        cls, source: str | os.PathLike[str] | GgufFile, *, chat_template: str | None = None
    ) -> Tokenizer:
        """The tokenizer stored in a GGUF file; ``chat_template`` overrides the file's own."""
        f = source if isinstance(source, GgufFile) else GgufFile(source)
        tokenizer = _from_metadata(f.metadata, f.path, chat_template)
        del f  # a file opened here is closed now
        return_freed_memory()  # the tables' intermediates (~5 MB for SmolLM2), freed but kept by the C heap
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return len(self._flags)

    def token_text(self, token_id: int) -> str:
        """The token as text: special tokens as written, partial UTF-8 bytes as ``\\xNN``."""
        if self.is_special(token_id):
            return self._piece(token_id).decode()
        return self._piece(token_id).decode("utf-8", errors="backslashreplace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (a special token: its text as written, in UTF-8)."""
        return self._piece(token_id)

    def is_special(self, token_id: int) -> bool:
        """A CONTROL or USER_DEFINED token: matched whole in text, never produced by BPE."""
        return bool(self._flags[self._check_id(token_id)] & _SPECIAL)

    def encode(self, text: str, *, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` (no BOS added); special-token text becomes its id when ``parse_special``."""
        return self._encode_segments([(text, parse_special)])

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """The text of ``ids``; ``skip_special`` drops control tokens (user-defined ones are text)."""
        skip = self._skip_ids if skip_special else frozenset()
        text = b"".join(self._piece(i) for i in ids if i not in skip).decode("utf-8", errors="replace")
        return text.removeprefix(" ") if self._model.strip_leading_space else text

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        """The conversation rendered by the model's chat template (raises ``ChatTemplateError``)."""
        return self.chat_template.render(messages, add_generation_prompt)

    def encode_messages(
        self, messages: Messages, add_generation_prompt: bool = True, tools: Sequence[Any] | None = None
    ) -> list[int]:
        """Token ids of the rendered chat; message contents are plain text (no special tokens from them).

        Equals ``encode(apply_chat_template(messages))`` when no content holds special-token text,
        plus a leading BOS if the model asks for one (``add_bos``) and the template did not write it.
        ``tools`` go to a template with its own tool format; they and the messages' ``tool_calls``
        are rendered as the template's text, so one that spells a special token is refused.
        """
        calls = [m.get("tool_calls") for m in messages if isinstance(m, Mapping) and m.get("tool_calls")]
        if (tools or calls) and self._has_special_text(json.dumps([tools, calls], ensure_ascii=False)):
            raise ChatTemplateError("a tool definition or tool call spells a special token; refusing it")
        segments = self.chat_template.segments(messages, add_generation_prompt, self._has_special_text, tools)
        ids = self._encode_segments(segments)
        if self.add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _has_special_text(self, text: str) -> bool:
        return self._special_re is not None and self._special_re.search(text) is not None

    def _encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """Encode text pieces in order; special tokens are found only in pieces that allow them.

        Plain text on either side of a piece boundary is encoded as one string, so splitting a text
        into pieces changes nothing unless a special token is suppressed.
        """
        ids: list[int] = []
        pending: list[str] = []
        for text, allow_special in segments:
            pos = 0
            if allow_special and self._special_re is not None:
                for match in self._special_re.finditer(text):
                    pending.append(text[pos : match.start()])
                    ids += self._model.encode_text("".join(pending))
                    pending.clear()
                    ids.append(self._special_ids[match.group()])
                    pos = match.end()
            pending.append(text[pos:])
        ids += self._model.encode_text("".join(pending))
        return ids

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._flags):
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{len(self._flags) - 1})")
        return int(token_id)

    def _piece(self, token_id: int) -> bytes:
        """The bytes a token stands for."""
        i = self._check_id(token_id)
        return self._bytes[self._ends[i] : self._ends[i + 1]]


def _from_metadata(meta: Mapping[str, Any], path: os.PathLike[str], chat_template: str | None) -> Tokenizer:
    tokens = _require_list(meta, "tokenizer.ggml.tokens", path)
    types = meta.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ModelFileError(path, f"tokenizer has {len(tokens)} tokens but {len(types)} token types")
    model, add_bos_default = _text_model(meta, tokens, types, path)
    n = len(tokens)
    special = {name: _token_id(meta, f"tokenizer.ggml.{name}_token_id", n, path) for name in _SPECIAL_NAMES}
    eos_ids = [i for name in ("eos", "eot", "eom") if (i := special[name]) is not None]
    template = chat_template or meta.get("tokenizer.chat_template")
    if not template:  # a base model: its family's turn format, else ChatML (as llama.cpp), else plain text
        arch = ARCHITECTURES.get(str(meta.get("general.architecture", "")))
        if arch is not None and arch.chat_template:
            template = arch.chat_template
            if arch.end_of_turn in tokens:
                eos_ids.append(tokens.index(arch.end_of_turn))
        elif "<|im_start|>" in tokens:
            template = CHATML_TEMPLATE
        else:
            template = PLAIN_TRANSCRIPT_TEMPLATE
        log.warning("%s: no chat template (a base model?); using %s", path, _template_name(template))
    if not eos_ids:
        log.warning("%s: no end-of-sequence token; generation stops only at the token limit", path)
    variables = {f"{name}_token": tokens[i] for name, i in special.items() if i is not None}
    return Tokenizer(
        model,
        tokens,
        types,
        bos_id=special["bos"],
        eos_ids=eos_ids,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        chat_template=ChatTemplate(
            str(template),
            variables,
            name=f"the chat template {'given for' if chat_template else 'of'} {Path(path).name}",
            max_chars=_context_chars(meta, tokens),
        ),
        has_own_template=bool(chat_template or meta.get("tokenizer.chat_template")),
    )


def _context_chars(meta: Mapping[str, Any], tokens: Sequence[str]) -> int:
    """The most characters a prompt filling the model's context can have: its context length times
    its longest token (at least 16, at most 64 characters a token)."""
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    if isinstance(context, bool) or not isinstance(context, int) or not 1 <= context <= MAX_CONTEXT_LENGTH:
        context = MAX_CONTEXT_LENGTH // 64  # read_config refuses such a file; a tokenizer alone still renders
    longest = max(map(len, tokens), default=1)
    return context * min(64, max(16, longest))


def _template_name(template: str) -> str:
    if template == CHATML_TEMPLATE:
        return "ChatML"
    return "a plain transcript" if template == PLAIN_TRANSCRIPT_TEMPLATE else "the family's turn format"


def _text_model(
    meta: Mapping[str, Any], tokens: list[str], types: list[int], path: os.PathLike[str]
) -> tuple[TextModel, bool]:
    """The vocabulary model named by ``tokenizer.ggml.model`` and whether it adds BOS by default."""
    kind = str(meta.get("tokenizer.ggml.model", ""))
    unk_id = _token_id(meta, "tokenizer.ggml.unknown_token_id", len(tokens), path)
    if kind == "gpt2":
        merges = _require_list(meta, "tokenizer.ggml.merges", path)
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        return ByteLevelBpe(tokens, merges, pre, unk_id), False
    if kind == "llama":
        scores = _require_list(meta, "tokenizer.ggml.scores", path)
        if len(scores) != len(tokens):
            raise ModelFileError(path, f"tokenizer has {len(tokens)} tokens but {len(scores)} scores")
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        return SentencePieceBpe(tokens, scores, types, add_space_prefix=prefix, unk_id=unk_id), True
    raise UnsupportedModelError(
        path,
        f"tokenizer model {kind!r} is not supported; this engine reads byte-level BPE ('gpt2') "
        "and SentencePiece BPE ('llama')",
    )


def _require_list(meta: Mapping[str, Any], key: str, path: os.PathLike[str]) -> list[Any]:
    value = meta.get(key)
    if not isinstance(value, list) or not value:
        raise ModelFileError(path, f"metadata {key!r} is missing or empty; the tokenizer needs it")
    return value


def _token_id(meta: Mapping[str, Any], key: str, n_tokens: int, path: os.PathLike[str]) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < n_tokens:
        raise ModelFileError(path, f"metadata {key!r} = {value!r} is not a token id (0..{n_tokens - 1})")
    return value
