"""Option dataclasses to and from JSON-style dicts: one helper for ``BatchingOptions``,
``KvCacheOptions`` and ``InferenceOptions``, with one wording of the unknown-key error.

Missing keys take the dataclass's defaults; the values are checked by the class's own
``__post_init__``, so a bad value's message is the class's, naming the field and its range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Options = TypeVar("Options", bound=DataclassInstance)
else:
    Options = TypeVar("Options")


def option_names(cls: type[Any]) -> list[str]:
    """The option names of an options dataclass, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def options_from_dict(cls: type[Options], data: Mapping[str, Any]) -> Options:
    """``cls(**data)``, refusing a key that is not one of its options (ValueError naming it)."""
    names = option_names(cls)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(
            f"unknown {cls.__name__} option(s): {', '.join(unknown)}; the options are {', '.join(names)}"
        )
    return cls(**data)


def options_to_dict(options: DataclassInstance) -> dict[str, Any]:
    """Every option by name, JSON-ready (tuples as lists); ``options_from_dict`` gives it back."""
    out: dict[str, Any] = {}
    for name in option_names(type(options)):
        out[name] = _json_ready(getattr(options, name))
    return out


def _json_ready(value: Any) -> Any:
    """Tuples as lists (nested too); an object with ``to_dict`` (a constraint) as its dict."""
    if isinstance(value, tuple):
        return [_json_ready(item) for item in value]
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value
