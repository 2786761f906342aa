"""The conversations on disk (SQLite store, full-text search index) and the history sidebar."""
