"""Documents in the real window (offscreen, the real workers and the tiny model): a library added in
Tools → Documents…, a tab that uses it, the reply's citation opening the passage in the side panel,
the index following a changed file, a PDF's page cited. The citations are of the retrieved
passages, so nothing here depends on what the tiny model writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PySide6.QtCore import QUrl
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QFileDialog, QListWidget, QPushButton, QWidget

from smallmind_app.documents.choices import DEFAULT_BUDGET_TOKENS
from tests.fixtures.documents import write_pdf
from tests.fixtures.window import send, wait_idle

INDEX_TIMEOUT_MS = 60_000


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "lighthouse.md").write_text(
        "# Lighthouse\n\nThe lamp was first lit in 1848 by keeper Ada Voss.\n"
    )
    (notes / "ferry.txt").write_text("The ferry leaves the pier at seven and returns at noon.\n")
    (notes / "garden.txt").write_text("Tomatoes need six hours of sun each day.\n")
    write_pdf(notes / "survey.pdf", ["Harbour survey, part one.", "The kestrel nests on the north cliffs."])
    (notes / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    return notes


def add_library(qtbot: Any, window: Any, folder: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Tools → Documents…, "New library from a folder…" (the folder picker answers ``folder``)."""
    window.findChild(QAction, "actionDocuments").trigger()
    dialog = window.findChild(QWidget, "documentsDialog")
    assert dialog is not None and dialog.isVisible()
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *args, **kwargs: str(folder))
    dialog.findChild(QPushButton, "addLibraryButton").click()
    library_list = dialog.findChild(QListWidget, "libraryList")
    qtbot.waitUntil(lambda: library_list.count() == 1 and "4 files" in library_list.item(0).text(),
                    timeout=INDEX_TIMEOUT_MS)  # fmt: skip
    return dialog


def use_library(tab: Any, name: str, budget: int = 300) -> None:
    toggle = tab.findChild(QWidget, "documentsToggle")
    toggle.menu().findChild(QAction, f"library:{name}").trigger()
    toggle.set_budget(budget)  # the tiny model's context is 1,024 tokens


def ask(qtbot: Any, tab: Any, text: str) -> dict[str, Any]:
    send(tab, text)
    wait_idle(qtbot, tab)
    reply = next(e for e in reversed(tab.entries) if e.role == "assistant")
    assert reply.status == "complete", reply
    return reply.stats


def open_citation(qtbot: Any, tab: Any, number: int) -> Any:
    """Click the reply's [number] link, as the transcript receives it."""
    index = max(i for i, e in enumerate(tab.entries) if e.role == "assistant")
    href = f"{tab.transcript.link_scheme}:cite/{index}/{number}"  # the view's own links' secret scheme
    assert href in tab.transcript.toHtml()
    tab.transcript.anchorClicked.emit(QUrl(href))
    panel = tab.findChild(QWidget, "citationPanel")
    qtbot.waitUntil(panel.isVisible, timeout=5000)
    return panel


def test_a_reply_cites_the_file_that_holds_the_answer_and_opens_its_passage(
    qtbot: Any, make_window: Any, write_settings: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(sampling={"max_new_tokens": 4, "seed": 1})
    window = make_window()
    dialog = add_library(qtbot, window, folder, monkeypatch)
    skipped = dialog.findChild(QListWidget, "skippedList")
    assert [skipped.item(i).text() for i in range(skipped.count())] == [
        f"{folder / 'photo.png'} — binary file (.png)"
    ]
    tab = window.chat_tabs[0]
    use_library(tab, "notes")
    stats = ask(qtbot, tab, "Who first lit the lighthouse lamp?")
    first = stats["citations"][0]
    assert (Path(first["path"]).name, first["label"]) == ("lighthouse.md", "notes/lighthouse.md, lines 1-3")
    assert tab.findChild(QWidget, "documentsToggle").text() == "Documents: notes · 300 tokens"
    footer = tab.transcript.toPlainText()
    assert (
        f"Sources ({stats['documents_tokens']} of 300 tokens): [1] notes/lighthouse.md, lines 1-3" in footer
    )
    assert 0 < stats["documents_tokens"] <= 300
    panel = open_citation(qtbot, tab, 1)
    assert (
        "Ada Voss" in panel.text.toPlainText()
        and "notes/lighthouse.md, lines 1-3" in panel.text.toPlainText()
    )
    # the passage went after the question, into the prompt the engine saw
    assert stats["prompt_tokens"] > 100


def test_the_index_follows_a_changed_file(
    qtbot: Any, make_window: Any, write_settings: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(sampling={"max_new_tokens": 4, "seed": 1})
    window = make_window()
    add_library(qtbot, window, folder, monkeypatch)
    tab = window.chat_tabs[0]
    use_library(tab, "notes")
    before = ask(qtbot, tab, "When does the ferry leave the pier?")["citations"][0]
    assert Path(before["path"]).name == "ferry.txt" and "seven" in before["text"]
    with qtbot.waitSignal(window.documents.client.indexer.finished, timeout=INDEX_TIMEOUT_MS):
        (folder / "ferry.txt").write_text("The ferry now leaves the pier at nine.\n")  # the watcher sees it
    after = ask(qtbot, tab, "When does the ferry leave the pier?")["citations"][0]
    assert (
        Path(after["path"]).name == "ferry.txt" and "nine" in after["text"] and "seven" not in after["text"]
    )


def test_a_pdf_page_is_cited_and_the_choice_is_remembered_with_the_conversation(
    qtbot: Any, make_window: Any, write_settings: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(sampling={"max_new_tokens": 4, "seed": 1})
    window = make_window()
    add_library(qtbot, window, folder, monkeypatch)
    tab = window.chat_tabs[0]
    use_library(tab, "notes", budget=250)
    first = ask(qtbot, tab, "Where does the kestrel nest?")["citations"][0]
    assert (first["page"], first["label"]) == (2, "notes/survey.pdf, page 2")
    panel = open_citation(qtbot, tab, 1)
    assert "page 2" in panel.text.toPlainText() and "kestrel nests" in panel.text.toPlainText()
    assert tab.conversation_settings["documents"] == {"libraries": ["notes"], "budget_tokens": 250}
    conversation_id = tab.conversation_id
    window.close()
    again = make_window()
    qtbot.waitUntil(
        lambda: any(t.conversation_id == conversation_id for t in again.chat_tabs), timeout=10_000
    )
    reopened = next(t for t in again.chat_tabs if t.conversation_id == conversation_id)
    toggle = reopened.findChild(QWidget, "documentsToggle")
    assert toggle.chosen == ["notes"] and toggle.text() == "Documents: notes · 250 tokens"
    assert reopened.entries[-1].stats["citations"][0]["label"] == "notes/survey.pdf, page 2"  # kept
    panel = open_citation(qtbot, reopened, 1)
    assert "kestrel nests" in panel.text.toPlainText()


def test_the_apps_default_budget_is_the_engines() -> None:
    from engine.documents import DEFAULT_BUDGET_TOKENS as ENGINE_DEFAULT

    assert DEFAULT_BUDGET_TOKENS == ENGINE_DEFAULT


def test_stop_before_the_passages_come_ends_the_reply_and_sends_nothing(
    qtbot: Any, make_window: Any, write_settings: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(sampling={"max_new_tokens": 4, "seed": 1})
    window = make_window()
    add_library(qtbot, window, folder, monkeypatch)
    tab = window.chat_tabs[0]
    use_library(tab, "notes")
    submitted: list[str] = []
    window.client.submit_requested.connect(lambda conversation_id, *_: submitted.append(conversation_id))
    answers: list[str] = []
    window.documents.client.retriever.retrieved.connect(lambda request, *_: answers.append(request))
    send(tab, "Who first lit the lighthouse lamp?")
    tab.stop_button.click()  # in the same turn of the event loop: the passages cannot have come yet
    assert not tab.is_generating and tab.entries[-1].status == "partial"
    qtbot.waitUntil(lambda: bool(answers), timeout=10_000)  # the retrieval's answer arrives...
    qtbot.wait(100)  # ...and is dropped by the window
    assert submitted == [] and not tab.is_generating
    stats = ask(qtbot, tab, "And the ferry?")  # the next message goes as usual
    assert submitted == [tab.conversation_id] and "citations" in stats


def test_a_removed_library_is_said_and_the_message_goes_without_it(
    qtbot: Any, make_window: Any, write_settings: Any, folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_settings(sampling={"max_new_tokens": 4, "seed": 1})
    window = make_window()
    dialog = add_library(qtbot, window, folder, monkeypatch)
    tab = window.chat_tabs[0]
    use_library(tab, "notes")
    dialog.findChild(QPushButton, "removeLibraryButton").click()
    library_list = dialog.findChild(QListWidget, "libraryList")
    qtbot.waitUntil(lambda: library_list.count() == 0, timeout=INDEX_TIMEOUT_MS)
    assert tab.findChild(QWidget, "documentsToggle").menu().findChild(QAction, "library:notes").text() == (
        "notes (missing)"
    )
    stats = ask(qtbot, tab, "Who first lit the lighthouse lamp?")
    assert "citations" not in stats
    notices = [e.content for e in tab.entries if e.role == "notice"]
    assert notices == ["Documents not used for this message: no document library named 'notes' "
                       "(libraries: none yet)"]  # fmt: skip
