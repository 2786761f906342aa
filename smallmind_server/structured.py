"""What grammar a chat request's reply is generated under: ``response_format`` and ``tools``.

``response_format``: ``text`` (free), ``json_object`` (any JSON object), ``json_schema`` (output
that parses and validates against the schema; ``strict`` or not, the schema is always enforced).
With tools in play the tools' grammar (smallmind_server/tools.py) decides, and a schema from
``response_format`` applies to the reply when the model answers in text. A schema the constraint
library refuses is a 400 naming the problem, raised when the request is submitted.
"""

from __future__ import annotations

from typing import Any

from engine.constraints import Constraint, ConstraintError

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
    return fmt.json_schema.schema_


def request_constraint(request: ChatCompletionRequest) -> tuple[Constraint | None, str]:
    """(the constraint, the request's kind for the counters: chat, json_object, json_schema, tools)."""
    schema = response_schema(request)
    try:
        by_tools = tools_constraint(request, schema)
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
