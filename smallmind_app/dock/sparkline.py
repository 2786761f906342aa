"""A small QPainter line plot of the recent values of one number (tokens/s, memory, batch size).

Its frame, text and (given a theme color name instead of "#rrggbb") its line follow colors.colors().
"""

from __future__ import annotations

from collections import deque

from PySide6.QtCore import QPointF, QRectF, QSize, Qt
from PySide6.QtGui import QColor, QFont, QPainter, QPainterPath, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from ..colors import colors

HISTORY_POINTS = 4 * 60 * 5  # five minutes at four updates a second
MIN_SPAN_POINTS = 4 * 60  # the x axis spans at least one minute


class Sparkline(QWidget):
    """The last ``HISTORY_POINTS`` values as a filled line; the title and latest value on top."""

    def __init__(self, title: str, unit: str = "", color: str = "#2563eb", parent: QWidget | None = None):
        super().__init__(parent)
        self.title = title
        self.unit = unit
        self._color = color  # "#rrggbb", or the name of a theme color
        self.values: deque[float] = deque(maxlen=HISTORY_POINTS)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMinimumHeight(58)
        self.setAccessibleName(title)

    @property
    def color(self) -> QColor:
        return QColor(self._color if self._color.startswith("#") else colors()[self._color])

    def sizeHint(self) -> QSize:
        return QSize(240, 58)

    def add(self, value: float) -> None:
        self.values.append(float(value))
        self.update()

    def _format(self, value: float) -> str:
        text = f"{value:,.0f}" if value >= 100 else f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"
        return f"{text} {self.unit}".rstrip()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = QRectF(self.rect()).adjusted(0.5, 0.5, -0.5, -0.5)
        theme = colors()
        painter.setPen(QPen(QColor(theme["plot_border"])))
        painter.setBrush(QColor(theme["plot_background"]))
        painter.drawRoundedRect(rect, 4, 4)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() * 0.9))
        painter.setFont(font)
        text_height = painter.fontMetrics().height()
        latest = self.values[-1] if self.values else 0.0
        painter.setPen(QColor(theme["plot_label"]))
        painter.drawText(
            rect.adjusted(6, 2, -6, 0), Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop, self.title
        )
        painter.setPen(QColor(theme["plot_value"]))
        painter.drawText(
            rect.adjusted(6, 2, -6, 0),
            Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignTop,
            self._format(latest),
        )
        plot = rect.adjusted(4, text_height + 4, -4, -4)
        if len(self.values) >= 2 and plot.height() > 4:
            self._draw_line(painter, plot)
        painter.end()

    def _draw_line(self, painter: QPainter, plot: QRectF) -> None:
        values = list(self.values)
        top = max(max(values), 1e-9) * 1.15  # scaled to the data: the trend, not the limit
        span = min(HISTORY_POINTS, max(len(values), MIN_SPAN_POINTS))  # one minute, growing to five
        step = plot.width() / (span - 1)
        x0 = plot.right() - step * (len(values) - 1)
        points = [
            QPointF(x0 + i * step, plot.bottom() - min(v / top, 1.0) * plot.height())
            for i, v in enumerate(values)
        ]
        line = QPainterPath(points[0])
        for point in points[1:]:
            line.lineTo(point)
        area = QPainterPath(line)
        area.lineTo(points[-1].x(), plot.bottom())
        area.lineTo(points[0].x(), plot.bottom())
        area.closeSubpath()
        color = self.color
        fill = QColor(color)
        fill.setAlpha(40)
        painter.fillPath(area, fill)
        painter.setPen(QPen(color, 1.5))
        painter.setBrush(Qt.BrushStyle.NoBrush)  # an open path would be filled with the frame's brush
        painter.drawPath(line)
