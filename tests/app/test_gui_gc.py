"""Cyclic garbage is collected on the GUI thread, never on an engine or loader thread.

A Qt object destroyed by Python's collector on a worker thread can deadlock against the GUI thread
(Qt's connection mutex vs the GIL): see smallmind_app/gui_gc.py.
"""

from __future__ import annotations

import gc
import threading
from typing import Any, ClassVar

from smallmind_app import gui_gc
from smallmind_app.app import ensure_application


class _Cycle:
    """Garbage only the cycle collector can free; records the thread that freed it."""

    freed_on: ClassVar[list[str]] = []

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        _Cycle.freed_on.append(threading.current_thread().name)


_kept: list[list[int]] = []


def _allocate_a_lot() -> None:
    """Containers kept alive: far past generation 0's threshold, where the automatic collector runs."""
    _kept.extend([] for _ in range(20 * gc.get_threshold()[0]))


def test_cycles_dropped_while_a_worker_allocates_are_freed_on_the_gui_thread(qtbot: Any) -> None:
    ensure_application()  # installs the GUI-thread collector
    try:
        assert gui_gc.installed() and not gc.isenabled()
        _Cycle.freed_on.clear()
        for _ in range(50):
            _Cycle()
        worker = threading.Thread(target=_allocate_a_lot, name="loader")
        worker.start()
        worker.join(30)
        assert _Cycle.freed_on == []  # the worker's allocations did not run the collector
        qtbot.waitUntil(lambda: len(_Cycle.freed_on) == 50, timeout=10_000)  # the timer's collections
        assert set(_Cycle.freed_on) == {threading.main_thread().name}
    finally:
        _kept.clear()
        gui_gc.uninstall()
    assert gc.isenabled() and not gui_gc.installed()


def test_uninstall_collects_at_once_and_gives_collection_back() -> None:
    ensure_application()
    _Cycle.freed_on.clear()
    _Cycle()
    gui_gc.uninstall()
    assert _Cycle.freed_on == [threading.main_thread().name] and gc.isenabled()
