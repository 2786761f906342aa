"""A request's logits -> the logits its sampler draws from, for the options beyond the classic ones.

In order: the repetition penalty (llama.cpp's, over the last ``repetition_window`` context tokens),
OpenAI's presence and frequency penalties (over the tokens generated so far: a token seen c > 0
times loses ``c * frequency_penalty + presence_penalty``), ``logit_bias`` (added to the token's
logit), then the constraint mask (every token the grammar forbids at -inf). ``sample_token`` then
applies temperature, top-k, top-p and min-p as always. A request that uses none of these options
never gets a processor: its logits go to ``sample_token`` untouched (the path the reference tests pin).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .constraints import TokenMatcher
from .logprobs import TokenLogprob, token_logprob
from .sampling import InferenceOptions, _apply_repetition_penalty


class LogitProcessor:
    """Penalties, bias, the constraint mask and log-probabilities for one request."""

    def __init__(self, options: InferenceOptions, matcher: TokenMatcher | None) -> None:
        self.options = options
        self.matcher = matcher
        bias = options.logit_bias
        self._bias_ids = np.array([i for i, _ in bias], dtype=np.int64)  # (Nb,)
        self._bias = np.array([b for _, b in bias], dtype=np.float32)  # (Nb,)

    @staticmethod
    def needed(options: InferenceOptions, matcher: TokenMatcher | None) -> bool:
        return bool(
            matcher is not None
            or options.presence_penalty
            or options.frequency_penalty
            or options.logit_bias
            or options.logprobs is not None
        )

    def process(self, logits: np.ndarray, context_ids: Sequence[int], generated: Sequence[int]) -> np.ndarray:
        """The logits (V,) to sample from (a copy whenever anything changed)."""
        o = self.options
        x = _apply_repetition_penalty(np.asarray(logits), o, context_ids)  # (V,) a copy if penalized
        if (o.presence_penalty or o.frequency_penalty) and len(generated):
            ids, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)  # (U,), (U,)
            x = x.copy() if x is logits else x
            x[ids] -= (counts * o.frequency_penalty + o.presence_penalty).astype(x.dtype)
        if self._bias_ids.size:
            if self._bias_ids.max() >= x.size:
                raise ValueError(f"logit_bias names token {int(self._bias_ids.max())}, outside [0, {x.size})")
            x = x.copy() if x is logits else x
            x[self._bias_ids] += self._bias.astype(x.dtype)
        if self.matcher is not None:
            x = self.matcher.mask(x)
        return x

    def logprob(self, processed: np.ndarray, token_id: int) -> TokenLogprob | None:
        k = self.options.logprobs
        return None if k is None else token_logprob(processed, token_id, k)
