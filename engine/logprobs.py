"""Log-probabilities of sampled tokens: the chosen token's and the k most likely alternatives.

They are the log-softmax of the logits the sampler drew from: after the repetition, presence and
frequency penalties, ``logit_bias`` and the constraint mask, before temperature and the top-k/top-p/
min-p cut (OpenAI's and vLLM's convention: at temperature 0 with no penalties they are the model's
own log-softmax). A token the constraint forbids has -inf; the API reports such values as
``MIN_LOGPROB`` (-9999.0, as OpenAI does), since JSON has no infinity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20
MIN_LOGPROB = -9999.0


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position: the token taken, its log-probability, and the ``k`` most likely tokens there
    (id, log-probability), most likely first (ties by id)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(V,) float64 log-probabilities; -inf logits stay -inf (at least one must be finite)."""
    x = np.asarray(logits, dtype=np.float64)  # (V,)
    top = x.max()
    with np.errstate(under="ignore"):
        return x - (top + np.log(np.exp(x - top).sum()))


def token_logprob(logits: np.ndarray, token_id: int, k: int) -> TokenLogprob:
    """The logprob of ``token_id`` under ``logits`` (V,) and exactly ``k`` alternatives (k <= V)."""
    lp = log_softmax(logits)  # (V,)
    k = min(k, lp.size)
    if k <= 0:
        return TokenLogprob(int(token_id), float(lp[token_id]))
    ids = np.argpartition(-lp, k - 1)[:k] if k < lp.size else np.arange(lp.size)  # (K,) unordered
    ids = ids[np.lexsort((ids, -lp[ids]))]  # most likely first, then by id
    return TokenLogprob(int(token_id), float(lp[token_id]), tuple((int(i), float(lp[i])) for i in ids))


def finite(value: float) -> float:
    """A logprob as JSON can carry it: -inf becomes MIN_LOGPROB."""
    return max(value, MIN_LOGPROB)
