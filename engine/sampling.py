"""Logits -> token id: the sampling options, a per-request RNG, and stop-string detection.

`sample_token` follows llama.cpp's order of operations:

    repetition penalty -> (greedy: argmax) -> temperature -> top-k -> top-p -> min-p -> sample

Only the top-k survivors are sorted and exponentiated, so a default call on a 49k vocabulary costs
a partial `np.argpartition` plus work on 40 numbers; without top-k, top-p sorts only the most likely
candidates. The caller's logits array is never modified. NaN logits count as -inf; if any logit is
+inf, the choice is made among the +inf tokens only.

`StopStringMatcher` holds back streamed text that could be the start of a stop string until it is
clear either way, so the app never shows half of a stop string.
"""

from __future__ import annotations

import logging
import math
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .constraints import Constraint
from .logprobs import MAX_TOP_LOGPROBS
from .options import options_from_dict, options_to_dict

log = logging.getLogger(__name__)


def _require(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} = {value!r} is invalid; allowed: {allowed}")


def _check_int(name: str, value: object, low: int, allowed: str) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    _require(ok, name, value, allowed)


def _is_real(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True, slots=True)
class InferenceOptions:
    """How one request turns logits into tokens, and when it stops.

    temperature: 0 means greedy (always the most likely token).
    top_k: keep the k most likely tokens; 0 (or any k >= the vocabulary size) disables it.
    top_p: keep the smallest set of most likely tokens whose probabilities sum to >= top_p; 1 disables
        it and 0 keeps only the most likely token (the set always holds at least one token).
    min_p: drop tokens whose probability is below min_p times the top token's; 0 disables it.
    repetition_penalty: for tokens among the last `repetition_window` context tokens (0 = all of
        them), positive logits are divided by it and negative ones multiplied (llama.cpp / HF); 1 = off.
        The default 1.1 over 64 tokens is llama.cpp's; comparisons with a reference set 1.0 explicitly.
    seed: None draws a fresh seed per request.
    stop: strings that end the generation; the stop string itself is not emitted.
    max_time_ms: a generation time limit, enforced by whoever drives the generation.
    allow_drafting: let the engine guess tokens from the context and verify them in one step (the
        output is the same either way; False only turns the speed-up off).
    presence_penalty, frequency_penalty: OpenAI's, in [-2, 2]: a token generated c > 0 times so far
        loses c * frequency_penalty + presence_penalty from its logit; 0 = off.
    logit_bias: (token id, bias in [-100, 100]) pairs added to those tokens' logits (a dict is taken).
    logprobs: None = off; k in 0..20: each generated token's log-probability and the k most likely
        alternatives (engine/logprobs.py). prompt_logprobs: the same for the prompt's tokens.
    constraint: a grammar the output must match (engine/constraints.py); None = free text.
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.0
    repetition_penalty: float = 1.1  # mild, as llama.cpp and LM Studio default: small models loop without it
    repetition_window: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    max_time_ms: int | None = None
    stop_on_eos: bool = True
    allow_drafting: bool = True  # False: never verify drafted tokens for this request (speculative.py)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 1, "an integer >= 1")
        _check_int("top_k", self.top_k, 0, "an integer >= 0 (0 disables top-k)")
        _check_int("repetition_window", self.repetition_window, 0, "an integer >= 0 (0 = whole context)")
        if self.seed is not None:
            _check_int("seed", self.seed, 0, "None or an integer >= 0")
        if self.max_time_ms is not None:
            _check_int("max_time_ms", self.max_time_ms, 1, "None or an integer >= 1")
        self._check_floats()
        self._normalize_stop()
        _require(isinstance(self.stop_on_eos, bool), "stop_on_eos", self.stop_on_eos, "True or False")
        _require(
            isinstance(self.allow_drafting, bool), "allow_drafting", self.allow_drafting, "True or False"
        )
        self._check_api_options()

    def _check_floats(self) -> None:
        t, p, m, r = self.temperature, self.top_p, self.min_p, self.repetition_penalty
        _require(_is_real(t) and t >= 0, "temperature", t, "a finite number >= 0 (0 = greedy)")
        _require(_is_real(p) and 0 <= p <= 1, "top_p", p, "a number in [0, 1] (0 = only the top token)")
        _require(_is_real(m) and 0 <= m <= 1, "min_p", m, "a number in [0, 1] (0 = off)")
        _require(_is_real(r) and r > 0, "repetition_penalty", r, "a finite number > 0 (1 = off)")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def _normalize_stop(self) -> None:
        stop = self.stop
        if isinstance(stop, str) or not isinstance(stop, Sequence):
            raise ValueError(f"stop = {stop!r} is invalid; allowed: a list or tuple of non-empty strings")
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop = {stop!r} is invalid: item {s!r}; allowed: non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))

    def _check_api_options(self) -> None:
        """The OpenAI-style options: penalties, logit_bias, logprobs, constraint."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _require(_is_real(v) and -2 <= v <= 2, name, v, "a number in [-2, 2] (0 = off)")
            object.__setattr__(self, name, float(v))
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None:
                _check_int(name, v, 0, f"None or an integer in [0, {MAX_TOP_LOGPROBS}]")
                _require(v <= MAX_TOP_LOGPROBS, name, v, f"None or an integer in [0, {MAX_TOP_LOGPROBS}]")
        object.__setattr__(self, "logit_bias", _normalize_logit_bias(self.logit_bias))
        if self.constraint is not None:
            object.__setattr__(self, "constraint", Constraint.from_value(self.constraint))

    @property
    def is_greedy(self) -> bool:
        """True when these options always pick the most likely token (after the repetition penalty)."""
        return self.temperature == 0.0 or self.top_k == 1 or self.top_p == 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InferenceOptions:
        """Build from a JSON-style dict; missing keys take their defaults, unknown keys are an error."""
        return options_from_dict(cls, d)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (`stop` as a list) that `from_dict` turns back into equal options."""
        return options_to_dict(self)


def _normalize_logit_bias(bias: object) -> tuple[tuple[int, float], ...]:
    """``{token id: bias}`` or (id, bias) pairs -> sorted pairs; ValueError naming a bad entry."""
    allowed = "a {token id: bias} dict or (id, bias) pairs, ids >= 0, biases in [-100, 100]"
    if isinstance(bias, Mapping):
        items = list(bias.items())
    elif isinstance(bias, Sequence) and not isinstance(bias, str):
        items = [tuple(pair) if isinstance(pair, Sequence) and not isinstance(pair, str) else (pair,)
                 for pair in bias]  # fmt: skip
    else:
        raise ValueError(f"logit_bias = {bias!r} is invalid; allowed: {allowed}")
    out: dict[int, float] = {}
    for item in items:
        key, value = (item[0], item[1]) if len(item) == 2 else (None, None)
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        ok = isinstance(key, int) and not isinstance(key, bool) and key >= 0
        if not ok or not _is_real(value) or not -100 <= value <= 100:
            raise ValueError(f"logit_bias entry {item!r} is invalid; allowed: {allowed}")
        out[int(key)] = float(value)
    return tuple(sorted(out.items()))


def make_rng(options: InferenceOptions) -> np.random.Generator:
    """The request's random generator: seeded from `options.seed`, or from fresh OS entropy."""
    return np.random.default_rng(options.seed)


# ---------------------------------------------------------------------------------------------------
# sample_token and its steps


def sample_token(
    logits: np.ndarray,
    options: InferenceOptions,
    rng: np.random.Generator,
    context_ids: Sequence[int] | np.ndarray = (),
) -> int:
    """Choose the next token id from `logits` (V,) with `options`; `rng` is the request's generator.

    `context_ids` are the tokens so far (prompt and generated); the repetition penalty looks at the
    last `options.repetition_window` of them. Raises ValueError if every logit is NaN or -inf.
    """
    x = np.asarray(logits)  # (V,)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    x = _apply_repetition_penalty(x, options, context_ids)  # a copy if anything changed
    x = _nan_to_neg_inf(x)  # a copy if there was a NaN
    if options.is_greedy:
        return _argmax(x)
    ids, vals = _top_k(x, options.top_k)  # (K,), (K,) in no particular order
    top = vals.max()
    if top == -np.inf:
        raise ValueError("all logits are NaN or -inf")
    if top == np.inf:  # infinitely more likely than the rest: choose uniformly among the +inf tokens
        return int(rng.choice(ids[vals == np.inf]))
    probs = _softmax(vals, options.temperature)  # (K,) float64
    ids, probs = _top_p(ids, vals, probs, options.top_p)  # (P,), most likely first when top_p < 1
    ids, probs = _min_p(ids, probs, options.min_p)  # (M,)
    return int(ids[_draw(probs, rng)])


def _apply_repetition_penalty(
    x: np.ndarray, options: InferenceOptions, context_ids: Sequence[int] | np.ndarray
) -> np.ndarray:
    penalty = options.repetition_penalty
    if penalty == 1.0 or len(context_ids) == 0:
        return x
    ctx = np.asarray(context_ids, dtype=np.int64).reshape(-1)  # (N,)
    if options.repetition_window > 0:
        ctx = ctx[-options.repetition_window :]
    seen = np.unique(ctx)  # (U,) sorted
    if seen[0] < 0 or seen[-1] >= x.size:
        raise ValueError(f"context_ids hold a token id outside [0, {x.size}): {seen[0]}..{seen[-1]}")
    x = x.copy()
    v = x[seen].astype(np.float64)  # float64: -3e38 * 1.3 must not overflow to -inf
    penalized = np.where(v > 0, v / penalty, v * penalty)
    limits = np.finfo(x.dtype)
    x[seen] = np.where(np.isfinite(v), np.clip(penalized, limits.min, limits.max), v)  # ±inf stay as they are
    return x


def _nan_to_neg_inf(x: np.ndarray) -> np.ndarray:
    if not np.isnan(x.max()):  # max propagates NaN: one cheap reduction in the common case
        return x
    nan = np.isnan(x)
    log.debug("%d of %d logits are NaN; treating them as -inf", int(nan.sum()), x.size)
    return np.where(nan, np.array(-np.inf, dtype=x.dtype), x)


def _argmax(x: np.ndarray) -> int:
    i = int(np.argmax(x))
    if x[i] == -np.inf:
        raise ValueError("all logits are NaN or -inf")
    return i


def _top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids and logits of the k largest logits (all of them when k is 0 or >= V)."""
    if k == 0 or k >= x.size:
        return np.arange(x.size), x
    if x.size >= 64 * k:
        # The k-th largest of every 16th logit is a lower bound on the k-th largest of all: partition
        # only the logits above it (about 16k of them), 2-3x faster than partitioning the vocabulary.
        threshold = np.partition(x[::16], -k)[-k]
        cand = np.flatnonzero(x >= threshold)  # (C,) C >= k
        ids = cand[np.argpartition(x[cand], -k)[-k:]]  # (K,)
    else:
        ids = np.argpartition(x, -k)[-k:]  # (K,)
    return ids, x[ids]


def _softmax(vals: np.ndarray, temperature: float) -> np.ndarray:
    with np.errstate(over="ignore"):  # a tiny temperature sends (v - max) / t to -inf: probability 0
        z = (vals.astype(np.float64) - vals.max()) / temperature  # (K,) <= 0
    e = np.exp(z)
    return e / e.sum()


def _top_p(
    ids: np.ndarray, vals: np.ndarray, probs: np.ndarray, top_p: float
) -> tuple[np.ndarray, np.ndarray]:
    """The fewest most likely tokens whose probabilities sum to >= top_p, most likely first.

    Tokens are ranked by logit (`vals`), which separates logits too close for their float64
    probabilities to differ, then by token id, so the result does not depend on the order of `ids`.
    Only the most likely candidates are sorted: 64 of them, then 8x more until they hold top_p.
    """
    if top_p >= 1.0:
        return ids, probs
    n_candidates = 64
    while True:
        cand = _largest(vals, n_candidates)  # (C,) every token tied with the last one included
        c_ids, c_probs = ids[cand], probs[cand]
        order = np.lexsort((c_ids, -vals[cand]))  # (C,) by logit descending, then by id
        c_ids, c_probs = c_ids[order], c_probs[order]
        cum = np.cumsum(c_probs)
        if cum[-1] >= top_p or cand.size == vals.size:
            break
        n_candidates *= 8
    n_keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, cum.size)
    return c_ids[:n_keep], c_probs[:n_keep]


def _largest(vals: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values and of any tied with the n-th (all when n >= size)."""
    if n >= vals.size:
        return np.arange(vals.size)
    threshold = np.partition(vals, -n)[-n]
    return np.flatnonzero(vals >= threshold)


def _min_p(ids: np.ndarray, probs: np.ndarray, min_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The tokens whose probability is >= min_p times the top token's (always at least the top one)."""
    if min_p <= 0.0:
        return ids, probs
    keep = probs >= min_p * probs.max()
    return ids[keep], probs[keep]


def _draw(probs: np.ndarray, rng: np.random.Generator) -> int:
    """An index drawn with probability proportional to `probs` (not necessarily normalized)."""
    cum = np.cumsum(probs)
    i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
    if i >= probs.size:  # the draw rounded up to the total: take the last token that can be drawn
        i = int(np.flatnonzero(probs)[-1])
    return i


# ---------------------------------------------------------------------------------------------------
# Stop strings


class StopStringMatcher:
    """Incremental stop-string detection over streamed text.

    `feed(piece)` returns the text that is safe to show now and whether a stop string completed. Text
    that may be the start of a stop string is held back until the next pieces settle it. When several
    stop strings could match, the one that completes first in the stream wins (the longest one if they
    complete at the same character), so the result does not depend on how the text was split.

    Each stop string is followed with Knuth-Morris-Pratt: per string, how many of its first characters
    the stream ends with now, and its failure table. Memory is linear in the stop strings' length and
    each streamed character costs O(1) per string (amortized).
    """

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            raise ValueError(f"stop = {stop!r} is invalid; allowed: a list or tuple of non-empty strings")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop = {list(stop)!r} is invalid; allowed: non-empty strings")
        self._stop = tuple(stop)
        self._fail = [_failure_table(s) for s in self._stop]
        self._matched = [0] * len(self._stop)  # per stop string: its prefix the stream ends with
        self._held = ""  # the stream's last max(_matched) characters: not shown yet
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string completed). After a stop, emits nothing."""
        if self._stopped:
            return "", True
        if not self._stop:
            return text, False
        buf = self._held + text
        base = len(self._held)
        for i, char in enumerate(text):
            completed = [len(s) for k, s in enumerate(self._stop) if self._advance(k, char) == len(s)]
            if completed:  # ends here; the longest one starts first
                self._held, self._stopped = "", True
                return buf[: base + i + 1 - max(completed)], True
        cut = len(buf) - max(self._matched, default=0)
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """The held-back text, for when generation ended for another reason than a stop string."""
        held, self._held = self._held, ""
        self._matched = [0] * len(self._stop)
        return "" if self._stopped else held

    def _advance(self, k: int, char: str) -> int:
        """Stop string ``k`` after one more character: how many of its first characters now match."""
        stop, fail, n = self._stop[k], self._fail[k], self._matched[k]
        while n and stop[n] != char:
            n = fail[n - 1]
        if stop[n] == char:
            n += 1
        self._matched[k] = n
        return n


def _failure_table(s: str) -> array:
    """KMP: ``table[i]`` is the length of the longest proper prefix of ``s[:i + 1]`` that is also
    its suffix (4 bytes per character)."""
    table = array("i", bytes(4 * len(s)))
    n = 0
    for i in range(1, len(s)):
        while n and s[i] != s[n]:
            n = table[n - 1]
        if s[i] == s[n]:
            n += 1
        table[i] = n
    return table
