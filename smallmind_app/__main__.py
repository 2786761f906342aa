"""``smallmind`` and ``python -m smallmind_app``: the command line, or the terminal chat by default.

A later issue replaces the no-subcommand case with the GUI; keep this dispatch a few obvious lines.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

CLI_FIRST_ARGS = frozenset({"chat", "models", "-h", "--help"})


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    from engine import cli  # imported here so that `import smallmind_app` stays light

    if args and args[0] in CLI_FIRST_ARGS:
        return cli.main(args)
    return cli.main(["chat", *args])  # no subcommand: the terminal chat, for now


if __name__ == "__main__":
    sys.exit(main())
