"""Take docs/screenshot.png: the real window, SmolLM2, two tabs generating at once, the stats dock,
the history sidebar with a few earlier conversations (one pinned).

    xvfb-run -a -s "-screen 0 1400x900x24" python scripts/screenshot.py      # Linux without a display
    python scripts/screenshot.py --model PATH --out docs/screenshot.png      # with a display
    python scripts/screenshot.py --theme dark --out /tmp/dark.png            # the dark theme

Without a display (no $DISPLAY) the script runs itself again under ``xvfb-run`` when it exists.
Conversations and settings go to a temporary SMALLMIND_HOME, never to your own. The first tab gets
a short exchange first (so a finished reply shows its numbers), then both tabs are sent a prompt
at the same time and the window is grabbed once both replies are well under way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

XVFB = ["xvfb-run", "-a", "-s", "-screen 0 1400x900x24"]
FIRST_QUESTION = "What is a prime number? Answer in one sentence."
PROMPTS = (
    ("Sea poem", "Write a short poem about the sea."),
    (
        "Python help",
        "Write a Python function that checks whether a number is prime, then explain it briefly.",
    ),
)
MIN_CHARS = 160  # each reply has this much text when the window is grabbed
DAY_S = 86_400
EARLIER = (  # title, days ago, the user's message, the reply (written to the history before the start)
    ("Explain recursion", 0.2, "Explain recursion to a beginner.",
     "Recursion is when a function calls itself on a smaller part of the problem until it reaches a case "
     "simple enough to answer directly."),
    ("Trip to Lisbon", 1, "Plan three days in Lisbon.",
     "Day 1: Alfama and the castle. Day 2: Belém and its pastries. Day 3: a train to Sintra."),
    ("Sourdough starter", 3, "How often do I feed a sourdough starter?",
     "Once a day at room temperature, or once a week if you keep it in the fridge."),
    ("Birthday gift ideas", 12, "Gift ideas for a friend who likes hiking?",
     "A good headlamp, merino socks, a trail guide of your region, or a light rain jacket."),
    ("SQL join types", 40, "What is the difference between an inner and a left join?",
     "An inner join keeps rows that match on both sides; a left join keeps every row of the left table."),
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="GGUF file (default: the installed SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshot.png"))
    parser.add_argument("--size", default="1360x860", help="window size, WIDTHxHEIGHT")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before giving up")
    parser.add_argument("--theme", choices=("light", "dark"), default="light")
    return parser.parse_args()


def rerun_under_xvfb() -> int | None:
    """No display: run this script again under xvfb-run (None when that is not needed or possible)."""
    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM") or os.environ.get("SMALLMIND_IN_XVFB"):
        return None
    if shutil.which("xvfb-run") is None:
        print("no display and no xvfb-run: install xvfb, or set QT_QPA_PLATFORM=offscreen", file=sys.stderr)
        return 1
    env = {**os.environ, "SMALLMIND_IN_XVFB": "1"}
    return subprocess.call([*XVFB, sys.executable, *sys.argv], env=env)


def model_path(explicit: str | None) -> str:
    from engine import download

    return str(download.resolve_model_path(explicit))  # before SMALLMIND_HOME moves the models dir


def main() -> int:
    args = parse_args()
    code = rerun_under_xvfb()
    if code is not None:
        return code
    model = model_path(args.model)
    home = tempfile.mkdtemp(prefix="smallmind-screenshot-")
    os.environ["SMALLMIND_HOME"] = home
    os.environ["SMALLMIND_MODEL"] = model
    try:
        return take(args, Path(args.out))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def take(args: argparse.Namespace, out: Path) -> int:
    from PySide6.QtWidgets import QApplication

    from smallmind_app.app import create_window, ensure_application
    from smallmind_app.settings.app_settings import AppSettings, save_settings

    save_settings(
        AppSettings().with_changes(
            sampling={"max_new_tokens": 300, "temperature": 0.3, "seed": 42}, theme=args.theme
        )
    )
    seed_history()
    app = ensure_application()
    window = create_window()
    width, height = (int(v) for v in args.size.split("x"))
    window.resize(width, height)
    window.show()
    deadline = time.monotonic() + args.timeout

    def wait(condition, what: str) -> None:  # type: ignore[no-untyped-def]
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {what}")
            app.processEvents()
            time.sleep(0.02)

    wait(lambda: bool(window.model_info), "the model to load")
    poem = window.chat_tabs[0]
    window.tabs.rename_tab(0, PROMPTS[0][0])
    code = window.new_chat()
    window.tabs.rename_tab(1, PROMPTS[1][0])
    send(code, FIRST_QUESTION)
    wait(lambda: not code.is_generating, "the first reply")
    send(poem, PROMPTS[0][1])
    send(code, PROMPTS[1][1])
    tabs = (poem, code)
    wait(lambda: all(t.is_generating and len(t.entries[-1].content) >= MIN_CHARS for t in tabs), "replies")
    window.tabs.setCurrentWidget(code)
    code.render_now()
    for _ in range(30):  # let the dock take one more snapshot and the layout settle
        app.processEvents()
        time.sleep(0.02)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not window.grab().save(str(out)):
        print(f"could not write {out}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({window.width()}x{window.height()})")
    window.close()
    QApplication.processEvents()
    return 0


def seed_history() -> None:
    """Earlier conversations (closed, dated days ago) for the history sidebar; the first one pinned."""
    import sqlite3

    from smallmind_app import paths
    from smallmind_app.history.store import ConversationStore

    with ConversationStore(paths.database_file()) as store:
        for n, (title, days, question, answer) in enumerate(EARLIER):
            conversation = store.create_conversation(title, settings={"open": False})
            store.add_message(conversation.id, "user", question)
            store.add_message(conversation.id, "assistant", answer)
            when = time.time() - days * DAY_S
            with sqlite3.connect(store.path) as db:
                db.execute("UPDATE conversations SET created_at = ? WHERE id = ?", (when, conversation.id))
                db.execute(
                    "UPDATE messages SET created_at = ? WHERE conversation_id = ?", (when, conversation.id)
                )
            if n == 0:
                store.set_pinned(conversation.id, True)


def send(tab, text: str) -> None:  # type: ignore[no-untyped-def]
    tab.prompt_edit.setPlainText(text)
    tab.send()


if __name__ == "__main__":
    sys.exit(main())
