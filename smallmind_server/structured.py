"""What grammar a chat request's reply is generated under: ``response_format`` and ``tools``.

``response_format``: ``text`` (free), ``json_object`` (any JSON object), ``json_schema`` (output
that parses and validates against the schema; ``strict`` or not, the schema is always enforced).
With ``strict: true`` an object that does not say otherwise gets no properties beyond those it
lists (OpenAI's strict mode demands ``additionalProperties: false`` everywhere; we assume it
instead of refusing the schema): a small model otherwise invents keys until it runs out of tokens.
With tools in play the tools' grammar (smallmind_server/tools.py) decides, and a schema from
``response_format`` applies to the reply when the model answers in text. A schema the constraint
library refuses is a 400 naming the problem and the field (``response_format``, or the tool whose
``parameters`` it is), found by compiling it once in a worker thread before anything is submitted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from engine.constraints import Constraint, ConstraintError, GrammarCompiler

from .json_schema import closed_objects
from .protocol import ApiError, ChatCompletionRequest
from .tools import tools_constraint

KINDS = ("chat", "json_object", "json_schema", "tools", "completions", "embeddings")


def response_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The schema a text reply must match: the given one, {"type": "object"}, or None (free text)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}
    assert fmt.json_schema is not None
    schema = fmt.json_schema.schema_
    return closed_objects(schema) if fmt.json_schema.strict else schema


def request_constraint(
    request: ChatCompletionRequest, tags_are_tokens: bool = False
) -> tuple[Constraint | None, str]:
    """(the constraint, the request's kind for the counters: chat, json_object, json_schema, tools)."""
    schema = response_schema(request)
    try:
        by_tools = tools_constraint(request, schema, tags_are_tokens)
        if by_tools is not None:
            return by_tools, "tools"
        if schema is None:
            return None, "chat"
        fmt = request.response_format
        assert fmt is not None
        if fmt.type == "json_object":
            return Constraint.json_object(), "json_object"
        return Constraint.json_schema(schema), "json_schema"
    except ConstraintError as exc:
        raise ApiError(400, str(exc), param="response_format") from exc


async def checked_constraint(
    grammars: GrammarCompiler, request: ChatCompletionRequest, tags_are_tokens: bool = False
) -> tuple[Constraint | None, str]:
    """``request_constraint``, with the grammar compiled once off the event loop so that a schema the
    library refuses is a 400 naming its field."""
    constraint, kind = request_constraint(request, tags_are_tokens)
    if constraint is not None:
        await asyncio.get_running_loop().run_in_executor(
            None, _compile_all, grammars, request, constraint, kind
        )
    return constraint, kind


def _compile_all(
    grammars: GrammarCompiler, request: ChatCompletionRequest, constraint: Constraint, kind: str
) -> None:
    if kind == "tools":
        for i, tool in enumerate(request.tools or ()):
            if tool.function.parameters is not None:
                try:
                    grammars.matcher(Constraint.json_schema(tool.function.parameters))
                except ConstraintError as exc:
                    raise ApiError(400, f"tools[{i}] ({tool.function.name}): {exc}", param="tools") from exc
    try:
        grammars.matcher(constraint)
    except ConstraintError as exc:
        raise ApiError(400, str(exc), param="response_format" if kind != "tools" else "tools") from exc
