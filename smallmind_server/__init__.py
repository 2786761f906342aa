"""SmallMind's OpenAI-compatible HTTP API, served by the engine; imports the engine, never Qt.

``create_app(engine, model_name, ...)`` builds the app around a running engine (tests and the desktop
app use it); ``serve.run`` is ``smallmind serve``.
"""

from .app import create_app
from .protocol import ApiError

__all__ = ["ApiError", "create_app"]
