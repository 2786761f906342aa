"""Document readers and the passage splitter, on real files: text, Markdown, code, HTML, PDF."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from engine.documents import PassageOptions, SkipFile, estimate_tokens, read_blocks, split_passages
from engine.documents.readers import decode_text, looks_binary
from tests.fixtures.documents import write_pdf

PROSE = (
    "The lighthouse keeper climbed the stairs each evening at dusk and trimmed the wick of the lamp, "
    "then wrote the weather, the ships seen and the state of the sea in the log kept on the desk. "
)


def wrapped_paragraphs(n_paragraphs: int, n_lines: int = 6) -> str:
    """Paragraphs of numbered, wrapped lines (like a Project Gutenberg text)."""
    paragraphs = []
    for p in range(n_paragraphs):
        paragraphs.append("\n".join(f"p{p} line{k}: {PROSE[:60]}" for k in range(n_lines)))
    return "\n\n".join(paragraphs) + "\n"


def test_markdown_headings_start_passages_and_name_them(tmp_path: Path) -> None:
    text = (
        "# Harbour\n\nThe harbour light is green.\n\n"
        "## Tides\n\nHigh tide comes twice a day.\n\n```\ncode line one\n\ncode line after a blank\n```\n"
    )
    passages = split_passages(read_blocks("guide.md", text.encode()))
    assert [p.heading for p in passages] == ["Harbour", "Tides"]
    assert passages[0].text == "# Harbour\n\nThe harbour light is green."
    assert (passages[0].line_start, passages[0].line_end) == (1, 3)
    # the fenced block stays whole, its blank line included, in the Tides passage
    assert "code line one\n\ncode line after a blank" in passages[1].text
    assert (passages[1].line_start, passages[1].line_end) == (5, 13)


def test_line_ranges_point_at_the_passage_text_in_the_file() -> None:
    text = wrapped_paragraphs(40)
    lines = text.splitlines()
    options = PassageOptions(max_tokens=120, overlap_tokens=30)
    passages = split_passages(read_blocks("story.txt", text.encode()), options)
    assert len(passages) > 10
    for p in passages:
        assert p.line_start is not None and p.line_end is not None
        in_file = [line for line in lines[p.line_start - 1 : p.line_end] if line]
        assert in_file == [line for line in p.text.splitlines() if line]
        assert p.n_tokens <= options.max_tokens


def test_consecutive_passages_overlap_and_cover_every_line() -> None:
    text = wrapped_paragraphs(30)
    passages = split_passages(read_blocks("story.txt", text.encode()), PassageOptions(120, 30))
    for before, after in itertools.pairwise(passages):
        assert before.line_end is not None and after.line_start is not None
        assert after.line_start <= before.line_end  # the next one repeats the last lines of this one
        assert after.line_start > (before.line_start or 0)
    covered = {n for p in passages for n in range(p.line_start or 0, (p.line_end or 0) + 1)}
    expected = {n for n, line in enumerate(text.splitlines(), start=1) if line}
    assert expected <= covered


def test_without_overlap_passages_do_not_repeat_lines() -> None:
    passages = split_passages(
        read_blocks("story.txt", wrapped_paragraphs(30).encode()), PassageOptions(120, 0)
    )
    for before, after in itertools.pairwise(passages):
        assert after.line_start is not None and before.line_end is not None
        assert after.line_start > before.line_end


def test_the_models_tokenizer_sizes_passages_when_given(tiny) -> None:
    _, tok = tiny

    def count(text: str) -> int:
        return len(tok.encode(text, parse_special=False))

    text = wrapped_paragraphs(20)
    options = PassageOptions(max_tokens=100, overlap_tokens=20)
    passages = split_passages(read_blocks("story.txt", text.encode()), options, count_tokens=count)
    assert passages
    for p in passages:
        assert count(p.text) <= options.max_tokens + 4  # pieces are counted apart (+1 for each join)
        assert p.n_tokens <= options.max_tokens
    estimated = split_passages(read_blocks("story.txt", text.encode()), options)
    assert [p.line_start for p in estimated] != [p.line_start for p in passages]  # the count mattered


def test_a_line_with_no_breaks_is_cut_to_size() -> None:
    blob = "x" * 20_000  # a minified file, a base64 blob: one line, no spaces
    passages = split_passages(read_blocks("app.min.js", blob.encode()), PassageOptions(100, 20))
    assert "".join(p.text for p in passages) == blob
    assert all(p.n_tokens <= 100 and (p.line_start, p.line_end) == (1, 1) for p in passages)


def test_code_files_split_between_blank_separated_blocks() -> None:
    code = "\n".join(f"def f{i}(x):\n    y = x * 2\n    return y + {i}\n" for i in range(3))
    blocks = read_blocks("tool.py", code.encode())
    assert [b.line_start for b in blocks] == [1, 5, 9]
    passages = split_passages(blocks, PassageOptions(max_tokens=16, overlap_tokens=0))
    assert [p.text.splitlines()[0] for p in passages] == ["def f0(x):", "def f1(x):", "def f2(x):"]


def test_html_keeps_visible_text_and_source_lines() -> None:
    html = (
        "<html><head><title>Tide tables</title>\n"
        "<style>p { color: red }</style><script>alert('no')</script></head>\n"
        "<body><h1>High &amp; low</h1>\n"
        "<p>The tide\n turns at <b>noon</b>.</p>\n"
        "<!-- a comment --><p>Second &lt;para&gt;</p></body></html>"
    )
    blocks = read_blocks("tides.html", html.encode())
    assert [(b.kind, b.text, b.line_start) for b in blocks] == [
        ("heading", "Tide tables", 1),
        ("heading", "High & low", 3),
        ("text", "The tide turns at noon.", 4),
        ("text", "Second <para>", 6),
    ]


def test_html_external_entities_are_not_expanded(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-VALUE")
    html = f'<!DOCTYPE x [<!ENTITY leak SYSTEM "file://{secret}">]><p>before &leak; after</p>'
    text = " ".join(b.text for b in read_blocks("page.html", html.encode()))
    assert "TOP-SECRET-VALUE" not in text
    assert "before" in text and "after" in text


def test_pdf_pages_become_passages_that_cite_their_page(tmp_path: Path) -> None:
    pdf = write_pdf(
        tmp_path / "report.pdf", ["Apples grow on trees.\nThey are red.", "The harbour light is green."]
    )
    passages = split_passages(read_blocks(pdf, pdf.read_bytes()))
    assert [(p.page, p.text) for p in passages] == [
        (1, "Apples grow on trees.\nThey are red."),
        (2, "The harbour light is green."),
    ]
    assert all(p.line_start is None for p in passages)


def test_an_encrypted_pdf_is_skipped_and_one_with_only_an_owner_password_is_read(tmp_path: Path) -> None:
    locked = write_pdf(tmp_path / "locked.pdf", ["private"], user_password="secret")
    with pytest.raises(SkipFile, match="encrypted PDF"):
        read_blocks(locked, locked.read_bytes())
    owner_only = write_pdf(tmp_path / "print-restricted.pdf", ["open to read"], owner_password="owner")
    assert read_blocks(owner_only, owner_only.read_bytes())[0].text == "open to read"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"%PDF-1.7\n garbage", "not a readable PDF"),
        (b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF", ""),
    ],
)
def test_a_broken_pdf_is_skipped_with_a_reason(data: bytes, reason: str) -> None:
    with pytest.raises(SkipFile) as raised:
        read_blocks("broken.pdf", data)
    assert reason in raised.value.reason


def test_a_pdf_of_images_only_says_it_has_no_text(tmp_path: Path) -> None:
    empty = write_pdf(tmp_path / "scan.pdf", [""])
    with pytest.raises(SkipFile, match="no text"):
        read_blocks(empty, empty.read_bytes())


def test_binary_and_text_detection() -> None:
    assert looks_binary(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert looks_binary(bytes(range(1, 32)) * 10)
    assert not looks_binary("naïve café, ünïcode — text\n".encode())
    with pytest.raises(SkipFile, match="binary"):
        decode_text(b"ELF\x00\x01\x02")
    assert decode_text("caf\u00e9".encode("cp1252")) == "café"  # not UTF-8: Windows-1252
    assert decode_text("\ufeffBOM first".encode()) == "BOM first"
    assert decode_text("wide text".encode("utf-16")) == "wide text"


def test_estimate_tokens_is_a_quarter_of_the_characters() -> None:
    assert [estimate_tokens(s) for s in ("", "abc", "abcd", "abcde")] == [0, 1, 1, 2]


@pytest.mark.parametrize(("max_tokens", "overlap"), [(8, 0), (100, 51), (100, -1), (10_000, 0)])
def test_passage_options_name_the_bad_field(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match=r"max_tokens|overlap_tokens"):
        PassageOptions(max_tokens, overlap)
