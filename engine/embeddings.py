"""Embedding requests: one vector per input from the loaded chat model, computed by the scheduler.

An embedding request is a prompt-only request: its rows go through the same batched forwards as
every chat row (chunked like any prefill), the model hands back the final, normed hidden state of
each of its positions (``Model.forward_tails(..., hidden=...)``), and the request keeps their sum.
When its last position is computed it ends with the mean over the positions, L2-normalized. It
never samples, never reuses cached K/V (every position's hidden state must be computed) and never
keeps its K/V afterwards. A chat model's embeddings are a convenience, not a retrieval model's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .generation import FinishReason, GenerationEvent, GenerationRequest, GenerationResult
from .sampling import InferenceOptions

EMBEDDING_OPTIONS = InferenceOptions(max_new_tokens=1, temperature=0.0, repetition_penalty=1.0,
                                     allow_drafting=False)  # fmt: skip


def pool(hidden: np.ndarray) -> np.ndarray:
    """Mean over positions (T, D) -> (D,), L2-normalized, float32."""
    return _unit(np.asarray(hidden, dtype=np.float64).mean(axis=0))


def _unit(mean: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(mean)
    return (mean / norm if norm > 0 else mean).astype(np.float32)


class EmbeddingRequest(GenerationRequest):
    """A request for the mean-pooled hidden state of its prompt (see the module docstring)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self._sum: np.ndarray | None = None  # (D,) float64: the hidden states of positions pooled so far
        self._n_pooled = 0

    @property
    def needs_every_position(self) -> bool:
        return True

    def on_hidden(self, hidden: np.ndarray) -> None:
        """The final hidden states (T, D) of the chunk that starts at position ``n_computed``; a
        position already pooled (computed again after a preemption) is not counted twice."""
        start = self.n_computed
        fresh = hidden[max(0, self._n_pooled - start) :]  # (T', D)
        if not len(fresh):
            return
        total = fresh.astype(np.float64).sum(axis=0)  # (D,)
        self._sum = total if self._sum is None else self._sum + total
        self._n_pooled = start + len(hidden)

    def on_logits(self, logits: np.ndarray, now: float) -> GenerationEvent:
        if self.n_computed < self.n_prompt:
            return GenerationEvent(
                self.request_id, "prefill", prompt_done=self.n_computed, prompt_total=self.n_prompt
            )
        if self.first_token_at is None:
            self.first_token_at = now
        return self.finish("stop", now)

    def _result(self, reason: FinishReason, now: float, error: str | None) -> GenerationResult:
        result = super()._result(reason, now, error)
        if reason != "stop" or self._sum is None or self._n_pooled < self.n_prompt:
            return result
        return dataclasses.replace(result, embedding=_unit(self._sum / self._n_pooled))


def embedding_input_ids(tokenizer: Any, text_or_ids: str | Sequence[int], vocab_size: int) -> list[int]:
    """An embedding input as token ids: text encoded plainly after BOS (when the model adds one), or
    the ids given (checked against the vocabulary)."""
    if isinstance(text_or_ids, str):
        if not text_or_ids.strip():
            raise ValueError("an embedding input is empty or only whitespace")
        ids = list(tokenizer.encode(text_or_ids, parse_special=False))
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            ids.insert(0, tokenizer.bos_id)
        return ids
    ids = [int(i) for i in text_or_ids]
    if not ids:
        raise ValueError("an embedding input has no tokens")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids
