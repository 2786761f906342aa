"""Byte-level BPE (GPT-2 style), the tokenizer of GGUF files whose ``tokenizer.ggml.model`` is ``gpt2``.

Text is split into words by a pre-tokenizer (a regex chosen by ``tokenizer.ggml.pre``), each word's
UTF-8 bytes are written as printable characters (GPT-2's ``bytes_to_unicode``), and adjacent symbols
are merged, lowest merge rank first (rank = position in ``tokenizer.ggml.merges``), until no pair of
neighbours has a merge. Ties go to the leftmost pair: the same order as Hugging Face ``tokenizers``
and llama.cpp. Each word's ids are cached, so a chat re-encoded every turn costs little.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import regex

log = logging.getLogger(__name__)

# GPT-2's pattern, as in Hugging Face's ByteLevel pre-tokenizer.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3's pattern (llama.cpp "llama-bpe"); Qwen2's is the same with single digits.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
DIGIT = r"\p{N}"


@dataclass(frozen=True, slots=True)
class PreTokenizerSpec:
    """How ``tokenizer.ggml.pre`` splits text into words.

    ``isolate`` (optional) is applied first and each of its matches becomes a word of its own (SmolLM2
    splits every digit apart this way); ``words`` then splits every remaining piece.
    ``ignore_merges``: a word that is itself a vocabulary token is that token (Llama 3).
    """

    words: str
    isolate: str | None = None
    ignore_merges: bool = False


_DIGITS_THEN_GPT2 = PreTokenizerSpec(words=GPT2_PATTERN, isolate=DIGIT)
_LLAMA3 = PreTokenizerSpec(words=LLAMA3_PATTERN, ignore_merges=True)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "gpt2": PreTokenizerSpec(words=GPT2_PATTERN),
    "default": PreTokenizerSpec(words=GPT2_PATTERN),
    "smollm": _DIGITS_THEN_GPT2,
    "starcoder": _DIGITS_THEN_GPT2,
    "refact": _DIGITS_THEN_GPT2,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "dbrx": _LLAMA3,
    "smaug-bpe": _LLAMA3,
    "qwen2": PreTokenizerSpec(words=QWEN2_PATTERN),
}
MAX_CACHED_WORDS = 1 << 16  # the word cache is cleared when it grows past this
_SCAN_MAX_SYMBOLS = 24  # longer words merge with a heap (n log n) instead of rescanning (n^2)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (space -> 'Ġ', newline -> 'Ċ')."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    n_extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n_extra)
            n_extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


BYTE_TO_CHAR = bytes_to_unicode()
_ENCODE_TABLE = BYTE_TO_CHAR  # str.translate table: latin-1 char (= byte) -> symbol
_DECODE_TABLE = {ord(c): b for b, c in BYTE_TO_CHAR.items()}  # symbol -> latin-1 char


def word_to_symbols(word: str) -> str:
    """The word's UTF-8 bytes, one printable character per byte."""
    return word.encode("utf-8", errors="replace").decode("latin-1").translate(_ENCODE_TABLE)


def symbols_to_bytes(token: str) -> bytes:
    """Inverse of ``word_to_symbols`` for one vocabulary token (characters outside the map as UTF-8)."""
    try:
        return token.translate(_DECODE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(
            bytes([_DECODE_TABLE[ord(c)]]) if ord(c) in _DECODE_TABLE else c.encode() for c in token
        )


def merge_scan(symbols: list[str], ranks: dict[str, int]) -> list[str]:
    """Merge the lowest-ranked (then leftmost) adjacent pair until none has a rank. For short words."""
    parts = symbols
    get = ranks.get
    while len(parts) > 1:
        best_rank, best_i = -1, -1
        for i in range(len(parts) - 1):
            rank = get(parts[i] + " " + parts[i + 1])
            if rank is not None and (best_i < 0 or rank < best_rank):
                best_rank, best_i = rank, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def merge_pairs(symbols: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Repeatedly merge the adjacent pair of lowest ``priority`` (ties: leftmost) until no pair has one.

    O(n log n): a heap of (priority, left position) over a linked list of symbols. Byte-level BPE ranks
    pairs by merge rank, SentencePiece by the negated score of the joined piece.
    """
    sym: list[str | None] = list(symbols)
    n = len(sym)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, str, str]] = []

    def push(i: int, j: int) -> None:
        left, right = sym[i], sym[j]
        if left is not None and right is not None and (p := priority(left, right)) is not None:
            heapq.heappush(heap, (p, i, left, right))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] != left or j < 0 or sym[j] != right:
            continue  # stale: one side was merged since this entry was pushed
        sym[i], sym[j] = left + right, None
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        if prv[i] >= 0:
            push(prv[i], i)
        if nxt[i] >= 0:
            push(i, nxt[i])
    return [s for s in sym if s is not None]


def merge_heap(symbols: list[str], ranks: dict[str, int]) -> list[str]:
    """Same result as ``merge_scan``: byte-level BPE merges in rank order."""
    return merge_pairs(symbols, lambda left, right: ranks.get(left + " " + right))


class ByteLevelBpe:
    """Vocabulary, merge ranks and pre-tokenizer of one byte-level BPE model; encodes plain text."""

    def __init__(
        self, tokens: Sequence[str], merges: Sequence[str], pre: str, unk_id: int | None = None
    ) -> None:
        if pre not in PRE_TOKENIZERS:
            log.warning("unknown pre-tokenizer %r; using GPT-2's", pre)
        spec = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt2"])
        self.pre = pre
        self._words = regex.compile(spec.words)
        self._isolate = regex.compile(f"({spec.isolate})") if spec.isolate else None
        self._ignore_merges = spec.ignore_merges
        self.vocab: dict[str, int] = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1), strict=True))
        self.ranks = _merge_ranks(merges, self.vocab)
        self._unk_id = unk_id
        missing = [b for b, c in BYTE_TO_CHAR.items() if c not in self.vocab]
        if missing:  # text with these bytes gets the unknown token, or loses them (as in HF tokenizers)
            log.debug(
                "vocabulary lacks %d byte tokens: %s", len(missing), " ".join(f"{b:02X}" for b in missing)
            )
        self._cache: dict[str, tuple[int, ...]] = {}

    def pre_tokenize(self, text: str) -> list[str]:
        """Split text into the words BPE runs on."""
        if self._isolate is None:
            return self._words.findall(text)
        words: list[str] = []
        for piece in self._isolate.split(text):
            if piece:
                words.extend(self._words.findall(piece))
        return words

    strip_leading_space = False  # decoding keeps the text as it is (no space was added by encoding)

    def token_bytes(self, token: str) -> bytes:
        """The bytes a (non-special) vocabulary token stands for."""
        return symbols_to_bytes(token)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text (no special tokens are recognised here)."""
        ids: list[int] = []
        cache = self._cache
        for word in self.pre_tokenize(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= MAX_CACHED_WORDS:
                    cache.clear()
                word_ids = cache[word] = self._encode_word(word)
            ids.extend(word_ids)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        symbols = word_to_symbols(word)
        vocab = self.vocab
        if self._ignore_merges and symbols in vocab:
            return (vocab[symbols],)
        parts = list(symbols)
        parts = (
            merge_scan(parts, self.ranks)
            if len(parts) <= _SCAN_MAX_SYMBOLS
            else merge_heap(parts, self.ranks)
        )
        try:
            return tuple(vocab[p] for p in parts)
        except KeyError:
            return tuple(self._known_ids(parts))

    def _known_ids(self, parts: list[str]) -> Iterator[int]:
        """Ids of symbols, a missing byte token becoming the unknown token (or dropped if there is none)."""
        for p in parts:
            tok_id = self.vocab.get(p, self._unk_id)
            if tok_id is not None:
                yield tok_id
            else:
                log.warning(
                    "dropped byte %r from the text: the vocabulary has no token for it", symbols_to_bytes(p)
                )


def _merge_ranks(merges: Sequence[str], vocab: dict[str, int]) -> dict[str, int]:
    """Merge "a b" at position r -> ranks["a b"] = r, the first one winning.

    Merges whose result is not a vocabulary token are dropped (they could only make unknown tokens).
    """
    ranks = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1), strict=True))
    bad = [m for m in ranks if m.replace(" ", "", 1) not in vocab or " " not in m[1:]]
    for m in bad:
        del ranks[m]
    if bad:
        log.warning(
            "ignored %d of %d merges that make no vocabulary token (first: %r)", len(bad), len(merges), bad[0]
        )
    return ranks
