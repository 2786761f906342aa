"""History search and listing over many conversations in a real SQLite file (FTS5).

    python benchmarks/bench_history.py [--conversations 5000] [--turns 3] [--runs 15] [--json PATH]

Writes ``--conversations`` generated conversations of ``--turns`` user/assistant pairs (fixed seed)
to a temporary database, then times (median of ``--runs``, after a warm-up): the store's search for
a rare word, a common word, two words, a prefix as typed, a word found nowhere; one snippet; the
history list (every conversation with its preview); and what the sidebar does per keystroke (search
+ rebuild its Qt model, offscreen). The issue's target is a search answer under 100 ms; the table
says how each one compares, it does not assert.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from common import median_time, report
from PySide6.QtWidgets import QApplication, QListView

from smallmind_app.history.list_model import PREVIEW_ROLE, HistoryDelegate, HistoryModel
from smallmind_app.history.store import ConversationStore
from tests.fixtures.history import fill_history

TARGET_MS = 100.0
RARE = "Xylophonia"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=5000)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()

    app = QApplication.instance() or QApplication([])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "conversations.sqlite3"
        ids = fill_history(path, args.conversations, n_turns=args.turns, seed=0)
        with ConversationStore(path) as store:
            said = store.add_message(ids[len(ids) // 3], "user", f"my cat is called {RARE}")
            n_messages = len(ids) * args.turns * 2 + 1
            model = HistoryModel(lambda message_id: store.snippet(message_id, "coffee"))
            view = QListView()  # as the sidebar shows it: one row height for all
            view.setModel(model)
            view.setItemDelegate(HistoryDelegate(view))
            view.setUniformItemSizes(True)
            view.resize(260, 700)
            summaries = store.history()
            queries = {
                "search: rare word (1 conversation)": RARE.lower(),
                "search: common word": "coffee",
                "search: two words": "coffee bread",
                "search: prefix as typed": "cof",
                "search: no match": "zzzzzz",
            }
            results: dict[str, dict[str, float]] = {}
            for name, text in queries.items():
                hits = store.search(text)
                results[name] = {
                    "ms": median_time(lambda t=text: store.search(t), args.runs) * 1000,
                    "hits": len(hits),
                }
            results["snippet of one message"] = {
                "ms": median_time(lambda: store.snippet(said.id, RARE), args.runs) * 1000,
                "hits": 1,
            }
            results["history list (all, with previews)"] = {
                "ms": median_time(store.history, args.runs) * 1000,
                "hits": len(summaries),
            }

            def reread() -> None:  # after a message is sent or a reply ends
                model.set_conversations(store.history())
                view.doItemsLayout()

            results["sidebar list re-read (history, Qt model, layout)"] = {
                "ms": median_time(reread, args.runs) * 1000,
                "hits": model.n_conversations,
            }

            def keystroke() -> None:
                model.set_conversations(summaries, store.search("coffee"))
                view.doItemsLayout()
                for row in range(min(model.rowCount(), 20)):  # the rows on screen ask for their snippet
                    model.data(model.index(row), PREVIEW_ROLE)

            results["sidebar per keystroke (search, Qt model, 20 snippets)"] = {
                "ms": median_time(keystroke, args.runs) * 1000,
                "hits": model.n_conversations,
            }
    app.quit()
    table = [("operation", "median ms", "results", f"< {TARGET_MS:.0f} ms")]
    for name, row in results.items():
        table.append(
            (name, f"{row['ms']:.1f}", f"{int(row['hits']):,}", "yes" if row["ms"] < TARGET_MS else "NO")
        )
    report(
        "history",
        {"conversations": len(ids), "messages": n_messages, "runs": args.runs, **results},
        table,
        args.json,
    )


if __name__ == "__main__":
    main()
