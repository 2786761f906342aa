"""Python's cyclic garbage is collected on the GUI thread only.

Python runs its cycle collector in whichever thread happens to allocate when a generation's threshold
is crossed: with the engine loading weights on its own threads, that is often a worker thread. When
the garbage holds a Qt object (a closed dialog or window whose wrapper sits in a reference cycle, e.g.
through a lambda connected to one of its signals), its destructor then runs on that worker thread:
``QObject::~QObject`` takes Qt's connection mutex, PySide asks for the GIL inside it, while the GUI
thread, holding the GIL, waits for the same mutex in ``QObject::connect``. Both wait forever (seen as
a frozen window while a model loads; py-spy: ``gc_collect_main`` → ``~QObject`` →
``Shiboken::GilState::acquire`` on a loader thread, ``QBasicMutex::lockInternal`` on the GUI thread).

``install(app)`` turns the automatic collector off and collects from a timer on the GUI thread
instead, generation by generation as the automatic collector would (pyqtgraph does the same for the
same reason); ``uninstall()`` collects once more and gives the collector back to Python.
"""

from __future__ import annotations

import gc

from PySide6.QtCore import QCoreApplication, QObject, QThread, QTimer

INTERVAL_MS = 1000

_timer: QTimer | None = None


def _collect() -> None:
    """Collect the generations whose allocation counts crossed their thresholds (oldest first)."""
    thresholds = gc.get_threshold()
    counts = gc.get_count()
    for generation in (2, 1, 0):
        if thresholds[generation] and counts[generation] > thresholds[generation]:
            gc.collect(generation)
            return


def install(app: QObject | None = None, interval_ms: int = INTERVAL_MS) -> None:
    """Collect cyclic garbage on the GUI thread only (idempotent); call from the GUI thread."""
    global _timer
    owner = app if app is not None else QCoreApplication.instance()
    if owner is None:
        raise RuntimeError("gui_gc.install needs a QApplication")
    if QThread.currentThread() is not owner.thread():
        raise RuntimeError("gui_gc.install must be called from the GUI thread")
    if _timer is None:
        _timer = QTimer(owner, interval=interval_ms)
        _timer.timeout.connect(_collect)
        _timer.start()
    gc.disable()


def uninstall() -> None:
    """Collect everything now (on this, the GUI thread) and hand collection back to Python."""
    global _timer
    if _timer is not None:
        _timer.stop()
        _timer.deleteLater()
        _timer = None
    gc.collect()
    gc.enable()


def installed() -> bool:
    return _timer is not None and not gc.isenabled()
