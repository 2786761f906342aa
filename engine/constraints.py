"""Constrained decoding: a grammar that decides which tokens may come next, for one request.

A request's ``InferenceOptions.constraint`` names a grammar: a JSON Schema, "any JSON object", a
regular expression or a Lark grammar. At submit the engine compiles it once into a ``TokenMatcher``
(llguidance's matcher over OUR tokenizer's vocabulary: the bytes of every token id, special tokens
marked, the model's end-of-sequence ids); a grammar the library refuses is a ``ConstraintError``
naming the problem. Each step, before sampling, the matcher gives a bitmask of the allowed next
tokens; the row's logits outside it become -inf; the sampled token advances the matcher. Every row
of a batched step has its own matcher, so each row gets its own mask. The matcher only ever sees
tokens the request took: a drafted token is verified by sampling from the masked logits, so a draft
the grammar forbids is never taken, and drafts are cut to the prefix the grammar allows before they
cost a row (``valid_prefix``). ``rollback`` undoes taken tokens for a caller that un-takes them.

    compiler = GrammarCompiler(tokenizer, vocab_size=model.config.vocab_size)
    matcher = compiler.matcher(Constraint.json_schema({"type": "object"}))
    logits = matcher.mask(logits)           # a copy with the forbidden tokens at -inf
    matcher.accept(token_id)

The llguidance tokenizer is built once per compiler (0.1 s for SmolLM2's 49k tokens, ~2 s for
Gemma's 262k) on the first constrained request; a mask costs tens of microseconds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import EngineError

log = logging.getLogger(__name__)

ConstraintKind = Literal["json_schema", "json_object", "regex", "lark"]
CONSTRAINT_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "lark")
# JSON as models write it (`{"a": 1, "b": [2, 3]}`) and nothing else: with free whitespace a small
# model can fill its whole token budget with newlines between two keys.
JSON_LAYOUT: Any = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SPECIAL_MARK = b"\xff"  # llguidance's marker for a special token's bytes (as llama.cpp's binding)


class ConstraintError(EngineError, ValueError):
    """A grammar the constraint library refuses (the message says why), or a bad constraint spec."""


@dataclass(frozen=True, slots=True)
class Constraint:
    """What the output must match. ``value``: the JSON Schema as JSON text, the regex, or the Lark
    grammar ("" for json_object). Build with the class methods."""

    kind: ConstraintKind
    value: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise ConstraintError(
                f"constraint kind {self.kind!r} is invalid; allowed: {', '.join(CONSTRAINT_KINDS)}"
            )
        if not isinstance(self.value, str):
            raise ConstraintError(f"constraint value must be text, got {type(self.value).__name__}")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.value)
            except json.JSONDecodeError as exc:
                raise ConstraintError(f"the JSON schema is not valid JSON: {exc}") from exc
            if not isinstance(schema, dict | bool):
                raise ConstraintError(f"a JSON schema must be an object, got {type(schema).__name__}")
        elif self.kind in ("regex", "lark") and not self.value:
            raise ConstraintError(f"a {self.kind} constraint needs a non-empty {self.kind}")

    @classmethod
    def json_schema(cls, schema: Mapping[str, Any] | str) -> Constraint:
        return cls("json_schema", schema if isinstance(schema, str) else json.dumps(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> Constraint:
        return cls("lark", grammar)

    @classmethod
    def from_value(cls, value: Constraint | Mapping[str, Any]) -> Constraint:
        """A Constraint, or one from its dict form (``{"kind": ..., "value": ...}``, as ``to_dict``)."""
        if isinstance(value, Constraint):
            return value
        if not isinstance(value, Mapping) or set(value) - {"kind", "value"} or "kind" not in value:
            allowed = "{'kind': ..., 'value': ...}"
            raise ConstraintError(f"constraint = {value!r} is invalid; allowed: {allowed}")
        raw = value.get("value", "")
        return cls(value["kind"], raw if isinstance(raw, str) else json.dumps(raw))

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind, "value": self.value}

    def check(self) -> None:
        """Raise ConstraintError if the library refuses this grammar (no tokenizer needed: what a
        settings dialog can ask while the user types)."""
        import llguidance

        try:
            grammar = self.grammar()
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"the {_what(self)} is invalid: {exc}") from exc
        message = llguidance.LLMatcher.validate_grammar(grammar)
        if message:
            raise ConstraintError(f"the {_what(self)} is not supported: {_first_line(message)}")

    def grammar(self) -> str:
        """The llguidance grammar text for this constraint."""
        import llguidance

        if self.kind in ("json_schema", "json_object"):
            schema = self.value if self.kind == "json_schema" else '{"type": "object"}'
            return str(llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT))
        if self.kind == "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(self.value))
        return str(llguidance.LLMatcher.grammar_from_lark(self.value))


class _VocabularyView:
    """Our tokenizer in the shape llguidance's ``TokenizerWrapper`` reads: every token's bytes
    (special tokens as b"\\xff" + their text), the special ids, EOS, and text -> ids."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        n = tokenizer.vocab_size
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(n):
            if tokenizer.is_special(i):
                self.tokens.append(_SPECIAL_MARK + tokenizer.token_text(i).encode("utf-8"))
                self.special_token_ids.append(i)
            else:
                self.tokens.append(tokenizer.token_bytes(i))
        self.tokens += [b""] * max(0, vocab_size - n)  # ids the model has and the vocabulary does not
        eos = sorted(tokenizer.eos_ids)
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return list(self._tokenizer.encode(text, parse_special=False))


class GrammarCompiler:
    """Compiles constraints into matchers over one tokenizer's vocabulary (thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = max(tokenizer.vocab_size, vocab_size or 0)  # the logits' length
        self._ll_tokenizer: Any = None
        self._lock = threading.Lock()

    def _library_tokenizer(self) -> Any:
        with self._lock:
            if self._ll_tokenizer is None:
                import llguidance

                started = time.perf_counter()
                eos = sorted(self._tokenizer.eos_ids)
                if not eos:
                    raise ConstraintError(
                        "the model has no end-of-sequence token: constrained output cannot end"
                    )
                view = _VocabularyView(self._tokenizer, self.vocab_size)
                self._ll_tokenizer = llguidance.LLTokenizer(
                    llguidance.TokenizerWrapper(view), n_vocab=self.vocab_size, eos_token=eos
                )
                log.info("grammar tokenizer for %d tokens built in %.2f s", self.vocab_size,
                         time.perf_counter() - started)  # fmt: skip
            return self._ll_tokenizer

    def matcher(self, constraint: Constraint) -> TokenMatcher:
        """A fresh matcher for one request; ConstraintError when the library refuses the grammar."""
        import llguidance

        ll_tokenizer = self._library_tokenizer()
        try:
            grammar = constraint.grammar()
        except (ValueError, TypeError) as exc:
            raise ConstraintError(f"the {_what(constraint)} is invalid: {exc}") from exc
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            reason = _first_line(matcher.get_error())
            raise ConstraintError(f"the {_what(constraint)} is not supported: {reason}")
        return TokenMatcher(matcher, self.vocab_size)


def _what(constraint: Constraint) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regular expression",
            "lark": "Lark grammar"}[constraint.kind]  # fmt: skip


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0][:500] if message.strip() else "unknown error"


class TokenMatcher:
    """One request's grammar state: the mask of allowed next tokens, and the tokens taken so far.

    Used by the engine thread only. ``mask_s`` and ``n_masks`` count the time spent on masks."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._words = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)  # one bit per token
        self.mask_s = 0.0
        self.n_masks = 0
        self.n_taken = 0

    def allowed(self) -> np.ndarray:
        """(V,) bool: the tokens the grammar allows next (only EOS once it is complete)."""
        started = time.perf_counter()
        words = self._words[0]
        self._matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        bits = np.unpackbits(words.view(np.uint8), count=self.vocab_size, bitorder="little")  # (V,)
        self.mask_s += time.perf_counter() - started
        self.n_masks += 1
        return bits.view(np.bool_)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` (V,) with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        started = time.perf_counter()
        x = np.asarray(logits)
        n = min(x.size, allowed.size)
        out = np.full(x.shape, -np.inf, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64)
        np.copyto(out[:n], x[:n], where=allowed[:n])
        self.mask_s += time.perf_counter() - started
        return out

    def accept(self, token_id: int) -> bool:
        """Advance past a taken token; False (and an error state) if the grammar forbids it."""
        ok = bool(self._matcher.consume_token(int(token_id)))
        if ok:
            self.n_taken += 1
        return ok

    def rollback(self, n_tokens: int) -> None:
        """Undo the last ``n_tokens`` taken tokens."""
        if n_tokens > 0:
            self._matcher.rollback(n_tokens)
            self.n_taken -= n_tokens

    def valid_prefix(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids`` the grammar allows in a row from here (the state is unchanged)."""
        if not token_ids or self._matcher.is_stopped():
            return 0
        return int(self._matcher.validate_tokens([int(t) for t in token_ids]))

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing but the end of the sequence."""
        return bool(self._matcher.is_stopped())

    @property
    def accepting(self) -> bool:
        """The text so far is a complete match (more may still be allowed)."""
        return bool(self._matcher.is_accepting())

    @property
    def error(self) -> str | None:
        message = self._matcher.get_error()
        return str(message) if message else None
