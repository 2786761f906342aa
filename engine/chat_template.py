"""The model's own chat template (Jinja2, from ``tokenizer.chat_template``), rendered in a sandbox.

Rendering follows transformers' ``apply_chat_template``: an ``ImmutableSandboxedEnvironment`` with
``trim_blocks`` and ``lstrip_blocks``, the ``raise_exception`` and ``strftime_now`` globals, a
``tojson`` filter that keeps non-ASCII text, and the special tokens (``bos_token``, ``eos_token``...)
as variables. A template comes from a downloaded file, so it never reaches Python internals: the
sandbox refuses ``''.__class__`` and the like, and every failure is a ``ChatTemplateError``.

The sandbox is also bounded (``template_sandbox.py``): a render stops past ``MAX_RENDER_S`` or when
it makes more than the context's worth of characters (plus room for the messages themselves), and
every exception a render can raise (OverflowError, MemoryError, RecursionError, TypeError, Jinja's
own...) becomes a ``ChatTemplateError`` naming the template ("the chat template of model.gguf").

``segments`` tells the template's own text apart from message contents, so that special-token
markers typed by a user stay plain text (see ``Tokenizer.encode_messages``).
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta

from .errors import EngineError
from .template_sandbox import (
    MAX_RENDER_S,
    BoundedSandbox,
    TemplateLimitError,
    guarded_filter,
    render_limits,
    tick,
)

log = logging.getLogger(__name__)

Messages = Sequence[Mapping[str, Any]]
Segment = tuple[str, bool]  # (text, special tokens allowed in it)

# Used when a GGUF has no template (llama.cpp does the same).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_MAX_CHARS = 1 << 20  # the most a render may write when the caller gives no context size
MAX_JSON_INDENT = 64


class ChatTemplateError(EngineError, ValueError):
    """The chat template is broken, refused the conversation (``raise_exception``) or broke the sandbox."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    if isinstance(indent, int) and indent > MAX_JSON_INDENT:
        raise TemplateLimitError(f"tojson's indent {indent:,} is more than {MAX_JSON_INDENT}")
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> BoundedSandbox:
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = guarded_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template and the special-token strings it may use.

    ``name`` says whose template it is in error messages; ``max_chars`` is the context's worth of
    characters (a render may write that much, plus twice what the messages hold)."""

    def __init__(
        self,
        source: str,
        special_tokens: Mapping[str, str],
        name: str = "the chat template",
        max_chars: int = DEFAULT_MAX_CHARS,
        max_render_s: float = MAX_RENDER_S,
    ) -> None:
        self.source = source
        self.name = name
        self.max_chars = max_chars
        self.max_render_s = max_render_s
        self._variables = dict(special_tokens)
        # True when the template renders a ``tools`` list itself: the model's own tool-calling format
        self.supports_tools = False
        try:
            env = _environment()
            self._template: jinja2.Template | None = env.from_string(source)
            self._compile_error: str | None = None
            self.supports_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        except Exception as exc:  # kept: the model still works for plain completion
            self._template, self._compile_error = None, f"{name} does not compile: {_short(exc)}"
            log.warning("%s", self._compile_error)

    def render(
        self, messages: Messages, add_generation_prompt: bool = True, tools: Sequence[Any] | None = None
    ) -> str:
        """The conversation as the model expects to read it (``tools``: the functions it may call,
        for a template with its own tool format)."""
        if self._template is None:
            raise ChatTemplateError(self._compile_error)
        _check_messages(messages)
        contents = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
        contents += (
            len(json.dumps([tools, [m.get("tool_calls") for m in messages]], default=str)) if tools else 0
        )
        try:
            with render_limits(self.max_chars + 2 * contents, self.max_render_s) as limits:
                pieces, n_chars = [], 0
                for piece in self._template.generate(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    tools=list(tools) if tools else None,
                    documents=None,
                    **self._variables,
                ):
                    tick()
                    n_chars += len(piece)
                    if n_chars > limits.max_chars:
                        raise TemplateLimitError(
                            f"it wrote more than {limits.max_chars:,} characters (the context's worth, "
                            f"and room for the messages)"
                        )
                    pieces.append(piece)
                return "".join(pieces)
        except TemplateLimitError as exc:
            raise ChatTemplateError(f"{self.name} was stopped: {exc}") from exc
        except Exception as exc:  # whatever the sandbox raises: OverflowError, MemoryError, jinja's...
            raise ChatTemplateError(f"{self.name} failed: {type(exc).__name__}: {_short(exc)}") from exc

    def segments(
        self,
        messages: Messages,
        add_generation_prompt: bool,
        has_special: Callable[[str], bool],
        tools: Sequence[Any] | None = None,
    ) -> list[Segment]:
        """The rendered chat as (text, specials allowed) pieces: template text True, message content False.

        The pieces join to exactly ``render(messages)``. The template is rendered once more with a
        unique marker in place of each content; the text between markers is the template's own. Each
        content must then sit, as is or stripped (``| trim``), exactly between its template pieces.
        If a template reshapes contents beyond that, the whole rendering may parse special tokens
        only when no content spells one; otherwise a ``ChatTemplateError`` (never a forged role turn).
        """
        rendered = self.render(messages, add_generation_prompt, tools)
        contents = [m.get("content") for m in messages]
        tag = _unused_tag(c for c in contents if isinstance(c, str))
        masked = [
            {**m, "content": f"{tag}{i}\ue001"} if isinstance(c, str) else m
            for i, (m, c) in enumerate(zip(messages, contents, strict=True))
        ]
        skeleton = _split_on_tags(self.render(masked, add_generation_prompt, tools), tag, len(contents))
        segments = _anchor(rendered, skeleton, contents) if skeleton is not None else None
        if segments is not None:
            return segments
        if not any(isinstance(c, str) and has_special(c) for c in contents):
            log.debug("chat template reshapes message contents; none spells a special token")
            return [(rendered, True)]
        raise ChatTemplateError(
            "the chat template reshapes a message that spells a special token; "
            "refusing to turn that text into special tokens"
        )


def _check_messages(messages: Messages) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, not {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}"
            )


def _unused_tag(contents: Any) -> str:
    """A marker prefix (private-use characters + random hex) that no content contains."""
    texts = list(contents)
    while True:
        tag = f"\ue000{secrets.token_hex(6)}:"
        if not any(tag in t for t in texts):
            return tag


def _split_on_tags(skeleton: str, tag: str, n_contents: int) -> tuple[list[str], list[int]] | None:
    """(template pieces, content indices) from a rendering with tagged markers; one more piece than index.

    None if a marker came out altered (the template changed the content's text).
    """
    pieces = skeleton.split(tag)
    texts, indices = [pieces[0]], []
    for piece in pieces[1:]:
        index, sep, rest = piece.partition("\ue001")
        if not sep or not index.isdecimal() or int(index) >= n_contents:
            return None
        indices.append(int(index))
        texts.append(rest)
    return texts, indices


def _anchor(
    rendered: str, skeleton: tuple[list[str], list[int]], contents: list[Any]
) -> list[Segment] | None:
    """Match template pieces and contents against the rendering left to right; None where they do not fit."""
    texts, indices = skeleton
    segments: list[Segment] = []
    pos = 0
    for k, text in enumerate(texts):
        if not rendered.startswith(text, pos):
            return None
        segments.append((text, True))
        pos += len(text)
        if k == len(indices):
            break
        content = str(contents[indices[k]])
        for candidate in dict.fromkeys((content, content.strip(), content.lstrip(), content.rstrip())):
            if rendered.startswith(candidate, pos) and rendered.startswith(
                texts[k + 1], pos + len(candidate)
            ):
                segments.append((candidate, False))
                pos += len(candidate)
                break
        else:
            return None
    return segments if pos == len(rendered) else None


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:300] + "…"
