"""What a model file says about how to talk to it: its chat template's own default system prompt and
the sampling settings its publisher recommends (``general.sampling.*``), read without loading it.

A chat template may write a system turn when the conversation has none (SmolLM2's says "You are a
helpful AI assistant named SmolLM, trained by Hugging Face"); that text is the model's default system
prompt. A file without a chat template is a base model: it has none, and no other model's may be
sent to it (a base model repeats the prompt it is given).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import gguf_constants as keys
from .chat_template import ChatTemplate, ChatTemplateError
from .gguf import GgufFile
from .sampling import InferenceOptions

log = logging.getLogger(__name__)

_MARK = "\ue000smallmind-{}\ue001"  # private-use characters no template writes by itself
_SPECIAL_NAMES = ("bos", "eos", "unknown", "padding")
# general.sampling.* keys (llama.cpp's names) -> InferenceOptions fields, with each one's type
_SAMPLING_KEYS: dict[str, tuple[str, type]] = {
    keys.SAMPLING_TEMP: ("temperature", float),
    keys.SAMPLING_TOP_K: ("top_k", int),
    keys.SAMPLING_TOP_P: ("top_p", float),
    keys.SAMPLING_MIN_P: ("min_p", float),
    keys.SAMPLING_PENALTY_REPEAT: ("repetition_penalty", float),
}


@dataclass(frozen=True, slots=True)
class ModelDefaults:
    """A model's own defaults (``model_defaults``)."""

    system_prompt: str | None = None  # what its chat template writes when no system prompt is sent
    sampling: dict[str, Any] = field(default_factory=dict)  # InferenceOptions fields the file sets
    has_chat_template: bool = False  # False: a base model (the engine uses its family's turn format)

    def to_dict(self) -> dict[str, Any]:
        return {"system_prompt": self.system_prompt, "sampling": dict(self.sampling),
                "has_chat_template": self.has_chat_template}  # fmt: skip


def model_defaults(source: str | os.PathLike[str] | GgufFile) -> ModelDefaults:
    """The defaults written in a GGUF file (its metadata only: fast, no weights are read)."""
    f = source if isinstance(source, GgufFile) else GgufFile(source)
    return defaults_from_metadata(f.metadata)


def defaults_from_metadata(meta: Mapping[str, Any]) -> ModelDefaults:
    source = meta.get("tokenizer.chat_template")
    prompt = None
    if isinstance(source, str) and source.strip():
        tokens = meta.get("tokenizer.ggml.tokens") or []
        variables = {}
        for name in _SPECIAL_NAMES:
            token_id = meta.get(f"tokenizer.ggml.{name}_token_id")
            if isinstance(token_id, int) and 0 <= token_id < len(tokens):
                variables[f"{name}_token"] = str(tokens[token_id])
        prompt = template_system_prompt(ChatTemplate(source, variables))
    return ModelDefaults(prompt, _sampling(meta), isinstance(source, str) and bool(source.strip()))


def template_system_prompt(template: ChatTemplate) -> str | None:
    """The system prompt ``template`` writes for a conversation that has none, or None.

    The conversation is rendered with a marked system message and without one; where the marked
    one sits in the first, the second holds the template's own text (if the rest is the same)."""
    system, user = _MARK.format("system"), _MARK.format("user")
    try:
        marked = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        with_system = template.render(marked, add_generation_prompt=True)
        without = template.render(marked[1:], add_generation_prompt=True)
    except ChatTemplateError as exc:
        log.debug("no default system prompt: %s", exc)
        return None
    before, found, after = with_system.partition(system)
    if not found or len(before) + len(after) > len(without):
        return None
    if not without.startswith(before) or not without.endswith(after):
        return None
    own = without[len(before) : len(without) - len(after)]
    return own.strip() if own.strip() and system not in own and user not in own else None


def _sampling(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The recommended sampling settings the file holds, each one a value InferenceOptions takes."""
    out: dict[str, Any] = {}
    for key, (name, kind) in _SAMPLING_KEYS.items():
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if kind is int and not float(value).is_integer():
            continue
        try:
            InferenceOptions(**{name: kind(value)})
        except (ValueError, TypeError):
            log.info("ignoring %s = %r: not a valid %s", key, value, name)
            continue
        out[name] = kind(value)
    return out
