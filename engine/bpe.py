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
from typing import TypeVar

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


def symbols_to_bytes(token: str) -> bytes:
    """The bytes of one vocabulary token, each printable character mapped back to its byte (characters
    outside the map as UTF-8)."""
    try:
        return token.translate(_DECODE_TABLE).encode("latin-1")
    except UnicodeEncodeError:
        return b"".join(
            bytes([_DECODE_TABLE[ord(c)]]) if ord(c) in _DECODE_TABLE else c.encode() for c in token
        )


def merge_scan(ids: list[int], merges: dict[int, int], bits: int) -> list[int]:
    """Merge the lowest-ranked (then leftmost) adjacent pair until none has a rank. For short words.

    ``merges`` maps a pair of ids (``left << bits | right``) to ``rank << bits | merged id``: the
    smallest value is the lowest rank."""
    parts = ids
    get = merges.get
    while len(parts) > 1:
        best, best_i = -1, -1
        for i in range(len(parts) - 1):
            merge = get(parts[i] << bits | parts[i + 1])
            if merge is not None and (best_i < 0 or merge < best):
                best, best_i = merge, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [best & ((1 << bits) - 1)]
    return parts


S = TypeVar("S")  # a symbol: a string (SentencePiece) or a token id (byte-level BPE)
P = TypeVar("P", bound=float)  # a pair's priority (an int for byte-level BPE)


def merge_pairs(
    symbols: list[S], priority: Callable[[S, S], P | None], join: Callable[[P, S, S], S]
) -> list[S]:
    """Repeatedly merge the adjacent pair of lowest ``priority`` (ties: leftmost) into ``join(priority,
    left, right)`` until no pair has one.

    O(n log n): a heap of (priority, left position) over a linked list of symbols. Byte-level BPE ranks
    pairs by merge rank, SentencePiece by the negated score of the joined piece.
    """
    sym: list[S | None] = list(symbols)
    n = len(sym)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap: list[tuple[P, int, S, S]] = []

    def push(i: int, j: int) -> None:
        left, right = sym[i], sym[j]
        if left is not None and right is not None and (p := priority(left, right)) is not None:
            heapq.heappush(heap, (p, i, left, right))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        p, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        if sym[i] != left or j < 0 or sym[j] != right:
            continue  # stale: one side was merged since this entry was pushed
        sym[i], sym[j] = join(p, left, right), None
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        if prv[i] >= 0:
            push(prv[i], i)
        if nxt[i] >= 0:
            push(i, nxt[i])
    return [s for s in sym if s is not None]


def merge_heap(ids: list[int], merges: dict[int, int], bits: int) -> list[int]:
    """Same result as ``merge_scan``: byte-level BPE merges in rank order."""
    mask = (1 << bits) - 1
    return merge_pairs(ids, lambda left, right: merges.get(left << bits | right), lambda m, _a, _b: m & mask)


class ByteLevelBpe:
    """Merges and pre-tokenizer of one byte-level BPE model; encodes plain text.

    Merging works on token ids: a word starts as the ids of its bytes' symbols, and ``merges`` maps a
    pair of ids to the merge's rank and the id it makes (one int each: SmolLM2's 49k merges take
    ~5 MiB, where the merge strings, the vocabulary's strings and a dict of both took ~15 MiB)."""

    def __init__(
        self, tokens: Sequence[str], merges: Sequence[str], pre: str, unk_id: int | None = None
    ) -> None:
        if pre not in PRE_TOKENIZERS:
            log.warning("unknown pre-tokenizer %r; using GPT-2's", pre)
        spec = PRE_TOKENIZERS.get(pre, PRE_TOKENIZERS["gpt2"])
        self.pre = pre
        self._words = regex.compile(spec.words)
        self._isolate = regex.compile(f"({spec.isolate})") if spec.isolate else None
        vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1), strict=True))  # first id wins
        self.bits = max(1, (len(tokens) - 1).bit_length())  # an id's bits in a merge key
        self.merges = _merge_table(merges, vocab, self.bits)
        self._unk_id = unk_id
        # the id of each byte's symbol; a byte the vocabulary lacks gets -1 - byte (merges never hold it)
        self._byte_ids = [vocab.get(BYTE_TO_CHAR[b], -1 - b) for b in range(256)]
        self._missing_bytes = min(self._byte_ids) < 0
        if self._missing_bytes:  # text with these bytes gets the unknown token, or loses them (as in HF)
            missing = [b for b in range(256) if self._byte_ids[b] < 0]
            log.debug(
                "vocabulary lacks %d byte tokens: %s", len(missing), " ".join(f"{b:02X}" for b in missing)
            )
        # ignore_merges: a word that is itself a token is that token (the only use of the strings)
        self._vocab = vocab if spec.ignore_merges else None
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
        data = word.encode("utf-8", errors="replace")
        if self._vocab is not None:
            whole = self._vocab.get(data.decode("latin-1").translate(_ENCODE_TABLE))
            if whole is not None:
                return (whole,)
        byte_ids = self._byte_ids
        parts = [byte_ids[b] for b in data]
        parts = (
            merge_scan(parts, self.merges, self.bits)
            if len(parts) <= _SCAN_MAX_SYMBOLS
            else merge_heap(parts, self.merges, self.bits)
        )
        if self._missing_bytes and any(p < 0 for p in parts):
            return tuple(self._known_ids(parts))
        return tuple(parts)

    def _known_ids(self, parts: list[int]) -> Iterator[int]:
        """The ids, a missing byte token becoming the unknown token (or dropped if there is none)."""
        for tok_id in parts:
            if tok_id >= 0:
                yield tok_id
            elif self._unk_id is not None:
                yield self._unk_id
            else:
                byte = bytes([-1 - tok_id])
                log.warning("dropped byte %r from the text: the vocabulary has no token for it", byte)


def _merge_table(merges: Sequence[str], vocab: dict[str, int], bits: int) -> dict[int, int]:
    """Merge "a b" at position r -> table[id(a) << bits | id(b)] = r << bits | id("ab"), the first
    one winning (a merge's two parts are split at its first space after the first character).

    Merges that do not join two vocabulary tokens into a third are dropped (they could only make
    unknown tokens; Hugging Face refuses them).
    """
    table: dict[int, int] = {}
    n_bad, first_bad = 0, ""
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        left, right = merge[:cut], merge[cut + 1 :]
        a, b, made = vocab.get(left), vocab.get(right), vocab.get(left + right)
        if cut < 0 or a is None or b is None or made is None:
            n_bad, first_bad = n_bad + 1, first_bad or merge
            continue
        table.setdefault(a << bits | b, rank << bits | made)
    if n_bad:
        log.warning(
            "ignored %d of %d merges that do not join two vocabulary tokens into one (first: %r)",
            n_bad,
            len(merges),
            first_bad,
        )
    return table
