"""JSON Schema helpers for structured output and tool parameters."""

from __future__ import annotations

from typing import Any

_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMAS = ("items", "prefixItems", "additionalItems", "contains", "not", "if", "then", "else", "anyOf",
               "allOf", "oneOf", "additionalProperties", "unevaluatedProperties",
               "propertyNames")  # fmt: skip


def closed_objects(schema: Any) -> Any:
    """A copy of ``schema`` where every object schema listing ``properties`` and saying nothing about
    ``additionalProperties`` gets ``additionalProperties: false``."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict | list):
            out[key] = closed_objects(out[key])
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out
