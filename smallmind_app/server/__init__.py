"""The in-app OpenAI-compatible API server's dialog (the server itself runs on the worker)."""
