"""Simulated mouse and key events for the canvas tool tests."""

from __future__ import annotations

from qgis.core import QgsPointXY
from qgis.gui import QgsMapMouseEvent
from qgis.PyQt.QtCore import QEvent, QPoint, Qt
from qgis.PyQt.QtGui import QKeyEvent


def click(tool, canvas, x: int, y: int, button=Qt.MouseButton.LeftButton) -> None:
    event = QgsMapMouseEvent(canvas, QEvent.Type.MouseButtonRelease, QPoint(x, y), button)
    tool.canvasReleaseEvent(event)


def move(tool, canvas, x: int, y: int) -> None:
    event = QgsMapMouseEvent(canvas, QEvent.Type.MouseMove, QPoint(x, y), Qt.MouseButton.NoButton)
    tool.canvasMoveEvent(event)


def key(tool, qt_key) -> QKeyEvent:
    event = QKeyEvent(QEvent.Type.KeyPress, qt_key, Qt.KeyboardModifier.NoModifier)
    tool.keyPressEvent(event)
    return event


def draw(tool, canvas, pixels, finish_with="right") -> None:
    """Click each pixel (moving there first, as a mouse does) and finish the polygon."""
    for x, y in pixels:
        move(tool, canvas, x, y)
        click(tool, canvas, x, y)
    if finish_with == "right":
        click(tool, canvas, *pixels[-1], button=Qt.MouseButton.RightButton)
    elif finish_with == "enter":
        key(tool, Qt.Key.Key_Return)


def map_point(canvas, x: int, y: int) -> QgsPointXY:
    return canvas.getCoordinateTransform().toMapCoordinates(QPoint(x, y))


def ring(geometry) -> list[QgsPointXY]:
    """The outer ring of a (multi)polygon geometry, without the closing vertex."""
    if geometry.isMultipart():
        pts = geometry.asMultiPolygon()[0][0]
    else:
        pts = geometry.asPolygon()[0]
    return list(pts[:-1])


def rubber_bands(canvas) -> list:
    """The rubber bands on the canvas's scene now."""
    from qgis.gui import QgsRubberBand

    return [item for item in canvas.scene().items() if isinstance(item, QgsRubberBand)]
