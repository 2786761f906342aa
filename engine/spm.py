"""SentencePiece-style BPE, the tokenizer of GGUF files whose ``tokenizer.ggml.model`` is ``llama``.

Used by Llama 2 and TinyLlama. Spaces are written as '▁' (and a run of text gets a leading '▁' when
``add_space_prefix``); the text is split into characters and the adjacent pair whose joined text is
the vocabulary piece with the highest score (ties: leftmost) is merged, until no pair is a piece.
Characters that are no piece become their UTF-8 bytes as ``<0xXX>`` tokens (byte fallback), or the
unknown token if the vocabulary has no byte tokens. This is SentencePiece's and llama.cpp's order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .bpe import merge_pairs

log = logging.getLogger(__name__)

SPACE = "\u2581"  # '▁'
NORMAL, BYTE = 1, 6  # token types (see engine.tokenizer.TokenType)
MAX_CACHED_RUNS = 1 << 12
_MAX_CACHED_CHARS = 4096  # longer runs are not cached


def merge_by_score(chars: list[str], scores: dict[str, float]) -> list[str]:
    """Merge the adjacent pair that makes the best-scored piece, leftmost first, until none does."""

    def priority(left: str, right: str) -> float | None:
        score = scores.get(left + right)
        return None if score is None else -score

    return merge_pairs(chars, priority, lambda _, left, right: left + right)


class SentencePieceBpe:
    """Pieces, scores and byte tokens of one SentencePiece BPE vocabulary; encodes plain text."""

    def __init__(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        token_types: Sequence[int],
        *,
        add_space_prefix: bool,
        unk_id: int | None,
    ) -> None:
        self.add_space_prefix = add_space_prefix
        self._unk_id = unk_id
        self.vocab: dict[str, int] = {}
        self.scores: dict[str, float] = {}
        self._byte_ids: dict[int, int] = {}
        for i, (tok, score, kind) in enumerate(zip(tokens, scores, token_types, strict=True)):
            if kind == NORMAL and tok not in self.vocab:
                self.vocab[tok] = i
                self.scores[tok] = float(score)
            elif kind == BYTE and (byte := _byte_value(tok)) is not None:
                self._byte_ids.setdefault(byte, i)
        if len(self._byte_ids) < 256:
            log.debug("vocabulary has %d of 256 byte tokens", len(self._byte_ids))
        self._cache: dict[str, tuple[int, ...]] = {}

    @property
    def strip_leading_space(self) -> bool:
        """Decoding drops the space that encoding put in front of the text."""
        return self.add_space_prefix

    def token_bytes(self, token: str) -> bytes:
        """The bytes a (non-special) piece stands for: '▁' is a space, ``<0xXX>`` one byte."""
        byte = _byte_value(token)
        return bytes([byte]) if byte is not None else token.replace(SPACE, " ").encode()

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a run of plain text (one run: it gets the space prefix once)."""
        if not text:
            return []
        ids = self._cache.get(text)
        if ids is None:
            escaped = (SPACE if self.add_space_prefix else "") + text.replace(" ", SPACE)
            ids = tuple(self._piece_ids(merge_by_score(list(escaped), self.scores)))
            if len(text) <= _MAX_CACHED_CHARS:
                if len(self._cache) >= MAX_CACHED_RUNS:
                    self._cache.clear()
                self._cache[text] = ids
        return list(ids)

    def _piece_ids(self, pieces: list[str]) -> list[int]:
        """Piece ids; a character that is no piece becomes byte tokens, else the unknown token."""
        out: list[int | None] = []
        for piece in pieces:
            if (tok_id := self.vocab.get(piece)) is not None:
                out.append(tok_id)
            elif self._byte_ids:
                out += [self._byte_ids.get(b, self._unk_id) for b in piece.encode()]
            else:
                out.append(self._unk_id)
        if None in out:
            log.warning("dropped text that the vocabulary has no piece for (and no unknown token)")
        return [i for i in out if i is not None]


def _byte_value(token: str) -> int | None:
    """``<0x0A>`` -> 10; anything else -> None."""
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return int(token[3:5], 16)
        except ValueError:
            return None
    return None
