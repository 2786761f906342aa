"""Twenty JSON schemas of the kinds clients send (nested objects, arrays, enums, bounded numbers,
required and optional fields), each with a question a chat model can answer in that shape. Strings
and arrays are bounded so that a 135M model's greedy reply ends within a small token budget."""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SHORT = {"type": "string", "maxLength": 40}


def obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties,
            "required": list(properties) if required is None else required,
            "additionalProperties": False, **extra}  # fmt: skip


SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    ("Describe a person.", obj({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}})),
    ("What is the capital of France?", obj({"city": NAME, "country": NAME})),
    ("Is the sky blue?", obj({"answer": {"type": "boolean"}})),
    ("Pick a primary color.", obj({"color": {"enum": ["red", "yellow", "blue"]}})),
    ("Rate this movie from 1 to 5.", obj({"stars": {"type": "integer", "minimum": 1, "maximum": 5}})),
    ("Name three fruits.", obj({"fruits": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}})),
    ("Give the temperature in Paris today.",
     obj({"celsius": {"type": "integer", "minimum": -40, "maximum": 50}, "unit": {"const": "C"}})),
    ("Describe a book.", obj({"title": NAME, "author": NAME, "year": {"type": "integer", "minimum": 1400,
                                                                       "maximum": 2025}})),
    ("Give a point on a map.", obj({"lat": {"type": "integer", "minimum": -90, "maximum": 90},
                                   "lon": {"type": "integer", "minimum": -180, "maximum": 180}})),
    ("Describe a user account.",
     obj({"user": obj({"name": NAME, "email": {"type": "string", "maxLength": 30}}),
          "active": {"type": "boolean"}})),
    ("List two tasks for today.",
     obj({"tasks": {"type": "array", "items": obj({"title": NAME, "done": {"type": "boolean"}}),
                    "minItems": 1, "maxItems": 2}})),
    ("Classify the sentiment of 'I love it'.",
     obj({"sentiment": {"enum": ["positive", "negative", "neutral"]},
          "confidence": {"type": "integer", "minimum": 0, "maximum": 100}})),
    ("Describe a car, optionally its color.",
     obj({"make": NAME, "color": {"enum": ["red", "black", "white"]}}, required=["make"])),
    ("Give a product with a price.",
     obj({"product": NAME, "price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 1}})),
    ("Describe a meeting.", obj({"topic": SHORT, "room": {"type": "integer", "minimum": 1, "maximum": 20},
                                 "remote": {"type": "boolean"}})),
    ("Give the size of a shirt.",
     obj({"size": {"enum": ["S", "M", "L", "XL"]},
          "count": {"type": "integer", "minimum": 1, "maximum": 9}})),
    ("Translate 'hello' to French.", obj({"source": NAME, "target": NAME}, required=["target"])),
    ("Describe an address.",
     obj({"address": obj({"street": SHORT, "city": NAME,
                          "zip": {"type": "string", "pattern": "^[0-9]{5}$"}})})),
    ("Give a yes or no answer and a reason.",
     obj({"yes": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 30}})),
    ("Describe a pet.",
     obj({"kind": {"enum": ["cat", "dog", "fish"]}, "name": NAME,
          "tags": {"type": "array", "items": {"enum": ["cute", "old", "small"]}, "maxItems": 2}},
         required=["kind", "name"])),
]  # fmt: skip
assert len(SCHEMAS) == 20
