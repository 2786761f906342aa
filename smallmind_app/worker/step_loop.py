"""When the worker steps the local models' pool: at once and again while a model has work (a
zero-interval timer, so that queued submit, cancel and settings calls are handled between two
steps), after the batch wait when requests wait for company (a single shot), not at all while every
model is idle, and never in a spin when a step found nothing it could run.

``StepLoop`` is a part of the ``EngineWorker`` (its child QObject, on the worker's thread). Each
``pool.step()`` runs one step of one model's engine; the engine's events arrive inside it, and
after it ``stepped`` lets the worker send them on.
"""

from __future__ import annotations

import logging
import math

from PySide6.QtCore import QObject, QTimer, Signal, Slot

from .local_engine import LocalEngine

log = logging.getLogger(__name__)


class StepLoop(QObject):
    """See the module docstring; ``local`` holds the pool (None before the first model is opened)."""

    stepped = Signal()  # a step ran (or failed): what it produced may be sent

    def __init__(self, local: LocalEngine, parent: QObject) -> None:
        super().__init__(parent)
        self.local = local
        self._step_timer: QTimer | None = None
        self._wait_timer: QTimer | None = None

    @property
    def stepping(self) -> bool:
        """Whether a step is due (now, or after the batch wait): False while the engine is idle."""
        timers = (self._step_timer, self._wait_timer)
        return any(timer is not None and timer.isActive() for timer in timers)

    def initialize(self) -> None:
        """On the worker's thread (``EngineWorker.initialize``): the timers belong to it."""
        self._step_timer = QTimer(self, interval=0)
        self._step_timer.timeout.connect(self._run_step)
        self._wait_timer = QTimer(self)
        self._wait_timer.setSingleShot(True)
        self._wait_timer.timeout.connect(self._run_step)

    def stop(self) -> None:
        for timer in (self._step_timer, self._wait_timer):
            if timer is not None:
                timer.stop()

    def schedule(self) -> None:
        """Step now (zero-interval timer), after the batch wait (single shot), or not at all (idle)."""
        if self._step_timer is None or self._wait_timer is None:
            return
        pool = self.local.pool
        wait = pool.seconds_until_ready() if pool is not None else None
        if wait is None:
            self._step_timer.stop()
            self._wait_timer.stop()
        elif wait > 0:
            self._step_timer.stop()
            if not self._wait_timer.isActive():
                self._wait_timer.start(max(1, math.ceil(wait * 1000)))
        else:
            self._wait_timer.stop()
            if not self._step_timer.isActive():
                self._step_timer.start()

    @Slot()
    def _run_step(self) -> None:
        pool = self.local.pool
        if pool is None:
            self.schedule()
            return
        try:
            worked = pool.step()
        except Exception:  # the engine fails requests itself; this is a bug: log it, keep serving
            log.exception("engine step failed")
            worked = False
        self.stepped.emit()
        if not worked and pool.has_work and self._step_timer is not None and self._wait_timer is not None:
            self._step_timer.stop()  # nothing ran: never spin, look again in a moment
            wait = pool.seconds_until_ready() or 0.0
            self._wait_timer.start(max(1, math.ceil(wait * 1000)))
            return
        self.schedule()
