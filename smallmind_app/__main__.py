"""``python -m smallmind_app``: the desktop window (Qt's options, such as ``-platform``, pass through).

The ``smallmind`` command (``smallmind_cli``) starts the same window when given no subcommand.
"""

from __future__ import annotations

import sys

from .app import main

if __name__ == "__main__":
    sys.exit(main(sys.argv))
