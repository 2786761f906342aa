"""``python -m smallmind_cli``: the same as the ``smallmind`` command."""

import sys

from . import main

sys.exit(main())
