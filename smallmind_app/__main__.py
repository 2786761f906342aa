"""``smallmind`` and ``python -m smallmind_app``: the desktop app, or a command of the command line.

No subcommand starts the window; ``install-desktop-entry`` adds it to the desktop's menu; ``chat``
(the terminal chat), ``models`` and ``serve`` (the API server, no window) go to ``engine.cli``, and
so does any other word, which ``engine.cli`` refuses with the usage (exit status 2) instead of
opening the window.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

CLI_FIRST_ARGS = frozenset({"chat", "models", "serve", "-h", "--help"})


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["install-desktop-entry"]:
        from .desktop_entry import main as desktop_entry_main

        return desktop_entry_main(args[1:])
    if args and (args[0] in CLI_FIRST_ARGS or not args[0].startswith("-")):
        from engine import cli  # imported here so that `import smallmind_app` stays light

        return cli.main(args)
    from .app import main as gui_main

    return gui_main([sys.argv[0], *args])


if __name__ == "__main__":
    sys.exit(main())
