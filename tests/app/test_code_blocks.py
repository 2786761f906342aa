"""The pieces under the transcript's code blocks and attachments: splitting a reply at its fences,
highlighting (a growing block in cached chunks), fencing an attached file, refusing what is not text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smallmind_app.chat.attachments import AttachmentError, fenced, read_attachment
from smallmind_app.chat.code_blocks import (
    LINES_PER_TABLE,
    CodeBlock,
    _highlight,
    code_block_html,
    code_blocks,
    highlighted,
    split_markdown,
)


def test_a_reply_splits_at_its_fences_into_prose_and_code() -> None:
    text = "Intro\n\n```python\nx = 1\n\n```\nMiddle\n  ~~~~\n```not a close\n  ~~~~\nAfter\n````js\nopen"
    assert split_markdown(text) == [
        "Intro\n",
        CodeBlock("python", "x = 1\n", True),
        "Middle",
        CodeBlock("", "```not a close", True),  # a ``` line inside a ~~~~ block is code
        "After",
        CodeBlock("js", "open", False),  # no closing fence yet: the reply is still streaming
    ]
    assert [b.code for b in code_blocks("   ```\n   indented\n     more\n   ```")] == ["indented\n  more"]


def test_a_growing_block_is_highlighted_in_cached_groups_of_lines(qapp: Any) -> None:
    first = "".join(f"def f{i}(): return {i}\n" for i in range(LINES_PER_TABLE))  # one full group
    lines = highlighted(CodeBlock("python", first + "def b(", False))
    assert len(lines) == LINES_PER_TABLE + 1 and lines[0].startswith(
        '<span style="color: #008000; font-weight: bold">def</span>'
    )
    hits = _highlight.cache_info().hits
    grown = highlighted(CodeBlock("python", first + "def b():\n    return 2", False))
    assert _highlight.cache_info().hits == hits + 1  # the finished first group was not lexed again
    whole = highlighted(CodeBlock("python", first + "def b():\n    return 2", True))
    assert whole == grown  # once closed, the same lines: the tables already shown stay as they are
    tables = code_block_html(CodeBlock("python", first + "x = 1", True), "copycode:0.0", False, "#ffffff")
    assert len(tables) == 2 and "copycode:0.0" in tables[0] and "copycode" not in tables[1]


def test_an_attachment_is_fenced_with_its_language_and_a_fence_longer_than_its_own(tmp_path: Path) -> None:
    assert fenced("notes.md", "Use ```code``` here") == "notes.md:\n````markdown\nUse ```code``` here\n````"
    assert fenced("data.unknownext", "x\n") == "data.unknownext:\n```\nx\n```"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(
        AttachmentError, match=r"“latin1.txt”: it is not UTF-8 text \(byte 0xe9 at offset 3\)"
    ):
        read_attachment(latin1)
    with pytest.raises(AttachmentError, match=r"“missing\.txt”: No such file"):
        read_attachment(tmp_path / "missing.txt")
    with pytest.raises(AttachmentError, match=r"“empty\.txt”: it is empty"):
        (tmp_path / "empty.txt").write_text("  \n")
        read_attachment(tmp_path / "empty.txt")
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbfhello")
    assert read_attachment(bom).text == "hello"


def test_rendering_only_what_changed_gives_the_document_a_full_render_gives(qapp: Any) -> None:
    from smallmind_app.chat.conversation_model import Entry
    from smallmind_app.chat.transcript import TranscriptView

    reply = "Intro\n\n```python\n" + "".join(f"x{i} = {i}\n" for i in range(40)) + "```\n\nAfter | a |"
    streamed, fresh = TranscriptView(), TranscriptView()
    fresh.link_scheme = streamed.link_scheme  # each view draws its own secret for its links: the same here
    entries = [Entry("user", "Question"), Entry("notice", "A notice"), Entry("assistant", "", "streaming")]
    for end in range(0, len(reply) + 1, 37):  # grows as a streaming reply does
        entries[-1].content = reply[:end]
        streamed.render(entries)
    entries[-1].status = "complete"
    streamed.render(entries)
    fresh.render(entries)
    assert streamed.toHtml() == fresh.toHtml() and "x39 = 39" in streamed.toPlainText()
    streamed.render(entries[:1])  # fewer entries: the rest goes
    assert streamed.toPlainText().strip().endswith("Question")
