"""Tool calls: the prompt that describes the tools, the grammar a call is generated under, and
reading the calls back out of the reply (whole, or as streaming deltas).

A chat template with its own tool format (one that renders ``tools``, as Qwen's does) gets the tools
and the messages' tool calls and results as they are. Neither bundled model's template has one, so
for them the tools are described in a documented prompt format (the Hermes/Qwen convention many
small models were tuned on), added to the system message::

    <tools>
    {"type": "function", "function": {"name": "get_weather", "parameters": {...}}}
    </tools>

and a call is written as::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

An assistant message sent back with ``tool_calls`` is rendered in that form; ``role: "tool"``
messages become a user turn holding ``<tool_response>...</tool_response>`` (consecutive results in
one turn), since the templates know only system, user and assistant.

``tool_choice`` "required" or a named function: the reply is generated under a Lark grammar whose
calls are exactly the call syntax above with each function's ``parameters`` as an inline JSON
schema, so even a tiny model returns calls that parse and validate. "auto": the grammar allows
either text that does not begin with ``<tool_call>`` or calls, so the model chooses. A named
function, or ``parallel_tool_calls`` false, gives exactly one call; otherwise one to ``MAX_CALLS``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from engine.constraints import JSON_LAYOUT, Constraint

from .json_schema import closed_objects
from .protocol import ChatCompletionRequest, ChatMessage, Tool

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_CALLS = 8
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}
TOOLS_PROMPT = (
    "You can call functions to help with the user's request. The functions are described in JSON "
    "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with its name and arguments as JSON inside <tool_call></tool_call>:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments>}}}}\n</tool_call>'
)
ROLES = {"developer": "system"}


# -- the prompt ----------------------------------------------------------------------------------------
def engine_messages(
    request: ChatCompletionRequest, native: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(the conversation as the engine takes it, the tools for a template with its own tool format).

    ``native`` (the model's template renders ``tools`` itself): tool results and assistant tool calls
    go to the template as they are, with the tools. Otherwise the documented format: plain roles and
    text, the tools described in the system message, calls and results written out. With
    tool_choice "none" the tools are not described at all."""
    if native:
        return [_native_message(m) for m in request.messages], (
            [tool.model_dump(exclude_none=True) for tool in request.tools or ()]
            if request.tool_mode != "none"
            else []
        )
    out: list[dict[str, Any]] = []
    for message in request.messages:
        role, text = ROLES.get(message.role, message.role), message.text()
        if message.role == "tool":
            response = f"<tool_response>\n{text}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1]["content"] += "\n" + response  # results of parallel calls: one turn
            else:
                out.append({"role": "user", "content": response})
            continue
        if message.tool_calls:
            text = "\n".join([text] * bool(text) + [_written_call(c.function.name, c.function.arguments)
                                                    for c in message.tool_calls])  # fmt: skip
        out.append({"role": role, "content": text})
    if request.tool_mode != "none" and request.tools:
        described = TOOLS_PROMPT.format(tools="\n".join(_tool_json(tool) for tool in request.tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out, None


def _native_message(message: ChatMessage) -> dict[str, Any]:
    """A message for a template with its own tool format (as transformers' chat templates take it)."""
    out: dict[str, Any] = {"role": ROLES.get(message.role, message.role), "content": message.text()}
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name,
                                                          "arguments": _arguments(c.function.arguments)}}
            for c in message.tool_calls
        ]  # fmt: skip
    return out


def _arguments(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # as the client sent it


def _tool_json(tool: Tool) -> str:
    return json.dumps(tool.model_dump(exclude_none=True), ensure_ascii=False)


def _written_call(name: str, arguments: str) -> str:
    body = json.dumps({"name": name, "arguments": _arguments(arguments)}, ensure_ascii=False)
    return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"


# -- the grammar ---------------------------------------------------------------------------------------
def call_prefix(name: str) -> str:
    """A call's text up to its arguments (the grammar forces it, the parser reads it)."""
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '


def tools_constraint(
    request: ChatCompletionRequest, text_schema: dict[str, Any] | None, tags_are_tokens: bool = False
) -> Constraint | None:
    """The grammar a reply with tools is generated under (None when tool_choice is "none").
    ``text_schema``: with "auto", a reply that is not a call must match it (response_format).
    ``tags_are_tokens``: the vocabulary has ``<tool_call>`` and ``</tool_call>`` as special tokens
    (Qwen's): the grammar asks for those tokens, as the model was trained to write them."""
    mode = request.tool_mode
    if mode == "none" or not request.tools:
        return None
    tools = list(request.tools)
    if mode == "named":
        assert request.tool_choice is not None and not isinstance(request.tool_choice, str)
        tools = [t for t in tools if t.function.name == request.tool_choice.function.name]
    single = mode == "named" or request.parallel_tool_calls is False  # a named function: one call
    calls = "call" if single else f'call ("\\n" call){{0,{MAX_CALLS - 1}}}'
    lines = ["%llguidance {}", f"start: {calls}" if mode != "auto" else f"start: text | {calls}"]
    if mode == "auto":
        lines.append(
            "text: %json " + _schema_json(text_schema)
            if text_schema is not None
            else f"text: TEXT\nTEXT: /(?s:.+)/ & ~/{CALL_OPEN}(?s:.*)/"
        )
    lines.append("call: " + " | ".join(f"call_{i}" for i in range(len(tools))))
    for i, tool in enumerate(tools):
        schema = tool.function.parameters or NO_PARAMETERS
        if tool.function.strict:  # as with response_format: no keys beyond those listed
            schema = closed_objects(schema)
        head, tail = call_prefix(tool.function.name), "}\n" + CALL_CLOSE
        if tags_are_tokens:  # <tool_call> is one special token: the grammar names it, Lark's <...> syntax
            head, tail = head.removeprefix(CALL_OPEN), tail.removesuffix(CALL_CLOSE)
            lines.append(f"call_{i}: {CALL_OPEN} {json.dumps(head)} %json {_schema_json(schema)} "
                         f"{json.dumps(tail)} {CALL_CLOSE}")  # fmt: skip
        else:
            lines.append(f"call_{i}: {json.dumps(head)} %json {_schema_json(schema)} {json.dumps(tail)}")
    return Constraint.lark("\n".join(lines))


def _schema_json(schema: dict[str, Any] | None) -> str:
    """An inline schema for ``%json``, laid out as the engine lays JSON out (no free whitespace)."""
    return json.dumps({**(schema or {}), "x-guidance": JSON_LAYOUT})


# -- reading calls -------------------------------------------------------------------------------------
@dataclass
class ParsedCall:
    name: str
    arguments: str  # the arguments as the model wrote them (so far, while streaming)
    complete: bool


def scan_calls(text: str) -> tuple[list[ParsedCall], bool]:
    """(calls found so far, whether the text is calls at all): text that begins with ``<tool_call>``
    is read as calls; each call's arguments run from after ``"arguments": `` to the end of that JSON
    value (tracked by nesting depth and strings), so a partial reply gives partial arguments."""
    stripped = text.lstrip()
    if not stripped.startswith(CALL_OPEN):
        return [], False
    calls: list[ParsedCall] = []
    pos = len(text) - len(stripped)
    while True:
        start = text.find(CALL_OPEN, pos)
        if start < 0:
            return calls, True
        head = text[start:]
        name = _read_name(head)
        if name is None:
            return calls, True
        args_at = start + len(call_prefix(name))
        end = _json_value_end(text, args_at)
        calls.append(ParsedCall(name, text[args_at : end if end is not None else len(text)], end is not None))
        if end is None:
            return calls, True
        pos = end


def _read_name(head: str) -> str | None:
    """The function name of a call that starts ``head`` once its prefix is complete, else None."""
    opening = f'{CALL_OPEN}\n{{"name": '
    if not head.startswith(opening):
        return None
    try:
        name, _ = json.JSONDecoder().raw_decode(head, len(opening))
    except json.JSONDecodeError:
        return None
    if not isinstance(name, str) or not head.startswith(call_prefix(name)):
        return None
    return name


def _json_value_end(text: str, start: int) -> int | None:
    """Where the JSON object starting at ``start`` ends (index after its ``}``); None if it has not."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def tool_calls_of(text: str) -> list[dict[str, Any]] | None:
    """The finished reply's calls in OpenAI's shape, or None when the reply is text."""
    calls, is_calls = scan_calls(text)
    if not is_calls or not calls:
        return None
    return [{"id": new_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]  # fmt: skip


@dataclass
class ToolCallStream:
    """Turns a streamed reply into content deltas and ``tool_calls`` deltas: the first delta of a
    call carries its id, type and name, later ones pieces of its arguments. While the reply could
    still become a call (a prefix of ``<tool_call>``), its text is held back."""

    text: str = ""
    _sent: list[int] = field(default_factory=list)  # per call: argument characters sent
    _content_sent: int = 0

    def feed(self, piece: str) -> tuple[str, list[dict[str, Any]]]:
        """(content to send, tool-call deltas to send) after ``piece``."""
        self.text += piece
        calls, is_calls = scan_calls(self.text)
        if not is_calls:
            if CALL_OPEN.startswith(self.text.lstrip()) and not self._content_sent:
                return "", []  # may still become a call
            content = self.text[self._content_sent :]
            self._content_sent = len(self.text)
            return content, []
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(calls):
            if index == len(self._sent):
                self._sent.append(0)
                deltas.append({"index": index, "id": new_call_id(), "type": "function",
                               "function": {"name": call.name, "arguments": ""}})  # fmt: skip
            fresh = call.arguments[self._sent[index] :]
            if fresh:
                deltas.append({"index": index, "function": {"arguments": fresh}})
                self._sent[index] = len(call.arguments)
        return "", deltas

    def flush(self) -> str:
        """At the end: text still held back (a reply that only looked like the start of a call)."""
        if scan_calls(self.text)[1] or self._content_sent >= len(self.text):
            return ""
        content = self.text[self._content_sent :]
        self._content_sent = len(self.text)
        return content
