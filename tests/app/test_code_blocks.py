"""The pieces under the transcript's code blocks and attachments: splitting a reply at its fences,
highlighting (a growing block in cached chunks), fencing an attached file, refusing what is not text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from smallmind_app.attachments import AttachmentError, fenced, read_attachment
from smallmind_app.code_blocks import CodeBlock, _highlight, code_blocks, highlighted, split_markdown


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


def test_a_growing_block_is_highlighted_in_cached_chunks(qapp: Any) -> None:
    first = "def a():\n    return 1\n\n"
    growing = CodeBlock("python", first + "def b(", False)
    assert '<span style="color: #008000; font-weight: bold">def</span>' in highlighted(growing)
    hits = _highlight.cache_info().hits
    highlighted(CodeBlock("python", first + "def b():\n    return 2", False))
    assert _highlight.cache_info().hits == hits + 1  # the finished first chunk was not lexed again
    whole = highlighted(CodeBlock("python", first + "def b():\n    return 2", True))
    assert whole.count("def</span>") == 2 and not whole.endswith("\n")


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
