"""Model files: the Models dialog and the first-run dialog (downloads run on the worker)."""
