"""Blocks -> passages of a few hundred tokens, cut at headings and paragraphs, with some overlap.

A heading starts a new passage and names the passages under it; paragraphs are packed until the
next one would pass ``max_tokens``; the next passage then repeats the last lines of the previous one
(up to ``overlap_tokens``), so a fact that straddles a cut is whole in one of them. A block longer
than ``max_tokens - overlap_tokens`` is cut between lines (a line longer than that between words),
so the overlap and the next piece always fit. Passages never cross a PDF page, so each cites one
page (or a line range for every other file).

Tokens are counted by ``count_tokens`` (the model's tokenizer) when given, else estimated as one per
four characters, which is close for English with the models here and costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .readers import Block

CountTokens = Callable[[str], int]
CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class PassageOptions:
    max_tokens: int = 320
    overlap_tokens: int = 48

    def __post_init__(self) -> None:
        if not 16 <= self.max_tokens <= 8192:
            raise ValueError(f"max_tokens must be between 16 and 8192, got {self.max_tokens}")
        if not 0 <= self.overlap_tokens <= self.max_tokens // 2:
            raise ValueError(
                f"overlap_tokens must be between 0 and max_tokens / 2 ({self.max_tokens // 2}), "
                f"got {self.overlap_tokens}"
            )


@dataclass(frozen=True, slots=True)
class Passage:
    """A piece of a file to retrieve and cite: its text, the heading above it, where it is."""

    text: str
    heading: str
    n_tokens: int
    line_start: int | None = None
    line_end: int | None = None
    page: int | None = None


def split_passages(
    blocks: Iterable[Block], options: PassageOptions | None = None, count_tokens: CountTokens | None = None
) -> list[Passage]:
    options = options or PassageOptions()
    count = count_tokens or estimate_tokens
    packer = _Packer(options, count)
    piece_tokens = options.max_tokens - options.overlap_tokens  # so the overlap and a piece always fit
    for block in blocks:
        for piece in _pieces(block, piece_tokens, count):
            packer.add(piece)
    packer.flush(keep_overlap=False)
    return packer.passages


class _Packer:
    """Packs pieces (blocks no longer than max_tokens) into passages."""

    def __init__(self, options: PassageOptions, count: CountTokens) -> None:
        self.options = options
        self.count = count
        self.passages: list[Passage] = []
        self.current: list[tuple[Block, int]] = []  # (piece, its tokens)
        self.n_tokens = 0
        self.n_new = 0  # pieces in current that are not overlap from the previous passage
        self.heading = ""

    def add(self, piece: Block) -> None:
        n = self.count(piece.text)
        if self.current and piece.page != self.current[-1][0].page:
            self.flush(keep_overlap=False)  # a passage cites one page
        if piece.kind == "heading":
            self.flush(keep_overlap=False)
            self.heading = " ".join(piece.text.lstrip("# ").split())[:200]
        elif self.current and self.n_tokens + n + 1 > self.options.max_tokens:
            if self.n_new:
                self.flush(keep_overlap=True)
            while self.current and self.n_tokens + n + 1 > self.options.max_tokens:
                self._drop_first()  # the overlap must leave room for the piece
        self.current.append((piece, n))
        self.n_tokens += n + (1 if len(self.current) > 1 else 0)  # +1: the blank line between pieces
        self.n_new += 1

    def flush(self, keep_overlap: bool) -> None:
        if self.n_new and any(piece.kind != "heading" for piece, _ in self.current):
            self.passages.append(self._passage())
        elif self.n_new and not keep_overlap:
            return  # a heading alone stays, to open the passage under it
        if not keep_overlap:
            self.current, self.n_tokens, self.n_new = [], 0, 0
            return
        kept: list[tuple[Block, int]] = []
        total = 0
        for piece, n in reversed(self.current):
            if total + n > self.options.overlap_tokens:
                tail = _tail_lines(piece, self.options.overlap_tokens - total, self.count)
                if tail is not None:
                    kept.insert(0, (tail, self.count(tail.text)))
                break
            kept.insert(0, (piece, n))
            total += n
        self.current = kept
        self.n_tokens = sum(n for _, n in kept) + max(len(kept) - 1, 0)
        self.n_new = 0

    def _drop_first(self) -> None:
        _, n = self.current.pop(0)
        self.n_tokens -= n + (1 if self.current else 0)

    def _passage(self) -> Passage:
        pieces = [piece for piece, _ in self.current]
        lines = [piece.line_start for piece in pieces if piece.line_start is not None]
        ends = [piece.line_end for piece in pieces if piece.line_end is not None]
        return Passage(
            text="\n\n".join(piece.text for piece in pieces),
            heading=self.heading,
            n_tokens=self.n_tokens,
            line_start=min(lines) if lines else None,
            line_end=max(ends) if ends else None,
            page=pieces[0].page,
        )


def _tail_lines(piece: Block, budget: int, count: CountTokens) -> Block | None:
    """The last lines of ``piece`` that fit ``budget`` tokens (None if not even one line does)."""
    if piece.kind == "heading" or budget <= 0:
        return None
    taken = 0
    total = 0
    for line in reversed(piece.lines):
        n = count(line) + 1
        if total + n > budget:
            break
        total += n
        taken += 1
    if taken == 0:
        return None
    start = None if piece.line_start is None else piece.line_start + len(piece.lines) - taken
    return Block(piece.kind, piece.lines[-taken:], line_start=start, page=piece.page)


def _pieces(block: Block, max_tokens: int, count: CountTokens) -> Iterable[Block]:
    """``block`` cut between lines (and long lines between words) into pieces of <= max_tokens."""
    if count(block.text) <= max_tokens:
        yield block
        return
    lines: list[str] = []
    start = block.line_start
    n_lines = 0
    for offset, line in enumerate(block.lines):
        number = None if block.line_start is None else block.line_start + offset
        for part in _cut_line(line, max_tokens, count):
            if lines and n_lines + count(part) + 1 > max_tokens:
                yield Block(block.kind, tuple(lines), line_start=start, page=block.page)
                lines, n_lines = [], 0
            if not lines:
                start = number
            lines.append(part)
            n_lines += count(part) + 1
    if lines:
        yield Block(block.kind, tuple(lines), line_start=start, page=block.page)


def _cut_line(line: str, max_tokens: int, count: CountTokens) -> Iterable[str]:
    if count(line) <= max_tokens:
        yield line
        return
    words: list[str] = []
    for word in line.split(" "):
        while count(word) > max_tokens:  # no spaces at all (a minified file, a base64 blob)
            cut = max(1, len(word) * max_tokens // (count(word) + 1))
            if words:
                yield " ".join(words)
                words = []
            yield word[:cut]
            word = word[cut:]
        if words and count(" ".join([*words, word])) > max_tokens:
            yield " ".join(words)
            words = []
        words.append(word)
    if words:
        yield " ".join(words)
