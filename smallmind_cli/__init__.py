"""``smallmind``: the desktop app, or a command of the command line.

No subcommand starts the window; ``install-desktop-entry`` adds it to the desktop's menu; ``chat``
(the terminal chat), ``models``, ``serve`` (the API server, no window) and ``documents`` go to the
parser in ``main.py``, and so does any other word, which it refuses with the usage (exit status 2)
instead of opening the window.

This package sits above the engine, the server and the app: it imports each only when a command
needs it (``smallmind models`` loads neither Qt nor the web stack), and none of them imports it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["install-desktop-entry"]:
        from smallmind_app.desktop_entry import main as desktop_entry_main

        return desktop_entry_main(args[1:])
    if args and (args[0] in ("-h", "--help") or not args[0].startswith("-")):
        from .main import main as command_main

        return command_main(args)
    from smallmind_app.app import main as gui_main  # Qt options (-style, -platform ...) go to the window

    return gui_main([sys.argv[0], *args])
