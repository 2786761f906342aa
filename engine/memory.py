"""Giving memory the process freed back to the system."""

from __future__ import annotations

import ctypes


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; nothing elsewhere).

    A load frees large intermediates (unpacking and packing SmolLM2's tensors ~50 MB; building its
    tokenizer's tables ~5 MB) that glibc would otherwise keep in the process's resident memory."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim(0)
