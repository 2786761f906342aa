"""The engine stats dock and its sparklines."""
