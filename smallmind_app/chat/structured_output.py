"""Structured output in a chat, without Qt: the JSON schema a tab's replies must match, as its
sampling overrides store it (``constraint = {"kind": "json_schema", "value": <schema text>}``), and
how a reply generated under it is shown: pretty-printed in a ``json`` code block (highlighted by the
transcript's code blocks). The Sampling dialog's section is ``structured_output_box.py``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

CONSTRAINT_KEY = "constraint"
STRUCTURED = "structured"  # a reply's stats: it was generated under the chat's schema
EXAMPLES: dict[str, dict[str, Any]] = {
    "A person": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 40},
                       "age": {"type": "integer", "minimum": 0, "maximum": 130}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "A sentiment label": {
        "type": "object",
        "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["sentiment"], "additionalProperties": False,
    },
}  # fmt: skip


def schema_of(overrides: Mapping[str, Any]) -> str | None:
    """The JSON schema text a chat's overrides ask for, or None."""
    constraint = overrides.get(CONSTRAINT_KEY)
    if isinstance(constraint, Mapping) and constraint.get("kind") == "json_schema":
        return str(constraint.get("value", ""))
    return None


def displayed_markdown(content: str, structured: bool) -> str:
    """What the transcript renders for a reply: a structured one as a ``json`` code block (pretty-printed
    once it parses; as it streams, as written so far)."""
    if not structured or not content.strip():
        return content
    try:
        text = json.dumps(json.loads(content), indent=2, ensure_ascii=False)
    except json.JSONDecodeError:
        text = content
    return f"```json\n{text}\n```"
