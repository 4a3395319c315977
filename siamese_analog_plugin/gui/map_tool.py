"""The map-canvas polygon tool: draw the area to search with a rubber band.

Left clicks add vertices (snapped per the project's snapping settings), the shape follows the
mouse, right click or Enter finishes, Backspace removes the last vertex, Esc cancels. While
drawing, :attr:`AreaMapTool.statusChanged` carries the area and the cells the search would
make; on finish :attr:`AreaMapTool.areaFinished` carries a :class:`DrawnArea`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsDistanceArea,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsRectangle,
    QgsUnitTypes,
    QgsWkbTypes,
)
from qgis.gui import QgsMapCanvas, QgsMapTool, QgsRubberBand, QgsSnapIndicator
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor

from ..engine.grid import DEFAULT_MAX_CELLS
from .parameters import area_status_message

__all__ = ["AreaMapTool", "DrawnArea", "measure_area_m2"]

# Enum spellings that work from QGIS 3.22 to QGIS 4 (scoped enums arrived in 3.30).
_POLYGON = getattr(getattr(Qgis, "GeometryType", None), "Polygon", None)
if _POLYGON is None:
    _POLYGON = QgsWkbTypes.PolygonGeometry
_SQUARE_METRES = getattr(getattr(Qgis, "AreaUnit", None), "SquareMeters", None)
if _SQUARE_METRES is None:
    _SQUARE_METRES = QgsUnitTypes.AreaSquareMeters


@dataclass
class DrawnArea:
    """A finished polygon: its geometry in ``crs`` (the canvas CRS when it was drawn)."""

    geometry: QgsGeometry
    crs: QgsCoordinateReferenceSystem
    area_m2: float | None


def measure_area_m2(geometry: QgsGeometry, crs: QgsCoordinateReferenceSystem,
                    project: QgsProject | None = None) -> float | None:
    """Ellipsoidal area in square metres (the project's ellipsoid, else the CRS's own, so a
    geographic canvas CRS measures metres too); ``None`` when it cannot be measured."""
    if geometry is None or geometry.isEmpty() or not crs.isValid():
        return None
    project = project or QgsProject.instance()
    da = QgsDistanceArea()
    da.setSourceCrs(crs, project.transformContext())
    ellipsoid = project.ellipsoid()
    if not ellipsoid or ellipsoid.upper() == "NONE":
        ellipsoid = crs.ellipsoidAcronym() or "EPSG:7030"
    da.setEllipsoid(ellipsoid)
    value = da.measureArea(geometry)
    return float(da.convertAreaMeasurement(value, _SQUARE_METRES))


class AreaMapTool(QgsMapTool):
    """Draws the polygon to search.

    Attributes:
        cell_size_m, stride_m, cell_size_why: the cell size the status estimate uses.
        max_cells: above this many cells the status text warns.
        raster_extent: ``(QgsRectangle, QgsCoordinateReferenceSystem)`` of the input raster, or
            ``None``: the estimate counts only the part of the area over it (the search makes
            no cells elsewhere).
    """

    areaFinished = pyqtSignal(object)  # noqa: N815 - Qt signal naming; carries a DrawnArea
    statusChanged = pyqtSignal(str)  # noqa: N815
    cancelled = pyqtSignal()

    def __init__(self, canvas: QgsMapCanvas) -> None:
        super().__init__(canvas)
        self.cell_size_m: float | None = None
        self.stride_m: float | None = None
        self.cell_size_why = ""
        self.max_cells = DEFAULT_MAX_CELLS
        self.raster_extent: tuple[QgsRectangle, QgsCoordinateReferenceSystem] | None = None
        self._footprint: tuple[tuple, QgsGeometry | None] | None = None  # (key, raster_extent in the canvas CRS)
        self.points: list[QgsPointXY] = []
        self.hover: QgsPointXY | None = None
        self.last_status = ""
        self.last_estimate: tuple[float | None, int | None, bool] = (None, None, False)
        self.rubber_band: QgsRubberBand | None = None
        self.snap_indicator: QgsSnapIndicator | None = None
        self.setCursor(Qt.CursorShape.CrossCursor)

    # -- lifecycle ---------------------------------------------------------------------
    def activate(self) -> None:
        super().activate()
        # The canvas's snapping utils follow the project's snapping settings in QGIS; set them
        # here too so the tool snaps the same way on any canvas.
        self.canvas().snappingUtils().setConfig(QgsProject.instance().snappingConfig())
        self._show_status(self._status_text())

    def deactivate(self) -> None:
        self.reset()
        self._remove_items()
        super().deactivate()

    def reset(self) -> None:
        """Forget the vertices drawn so far and hide the rubber band."""
        self.points = []
        self.hover = None
        if self.rubber_band is not None:
            self.rubber_band.reset(_POLYGON)
        if self.snap_indicator is not None:
            self.snap_indicator.setMatch(_no_match())

    def _remove_items(self) -> None:
        """Take the rubber band and snap marker off the canvas for good."""
        if self.rubber_band is not None:
            self.rubber_band.reset(_POLYGON)
            self.canvas().scene().removeItem(self.rubber_band)
            self.rubber_band = None
        if self.snap_indicator is not None:
            self.snap_indicator.setMatch(_no_match())
            self.snap_indicator = None

    def rubber_band_items(self) -> list:
        """The canvas items this tool has on the canvas now (for clean-up checks)."""
        return [item for item in (self.rubber_band,) if item is not None]

    # -- events ------------------------------------------------------------------------
    def canvasMoveEvent(self, e) -> None:
        self.hover = self._snapped(e)
        self._redraw()

    def canvasReleaseEvent(self, e) -> None:
        if e.button() == Qt.MouseButton.LeftButton:
            self.points.append(self._snapped(e))
            self.hover = None
            self._redraw()
        elif e.button() == Qt.MouseButton.RightButton:
            self.finish()

    def keyPressEvent(self, e) -> None:
        key = e.key()
        if key == Qt.Key.Key_Escape:
            self.cancel()
        elif key in (Qt.Key.Key_Backspace, Qt.Key.Key_Delete):
            self.undo()
        elif key in (Qt.Key.Key_Return, Qt.Key.Key_Enter):
            self.finish()
        else:
            e.ignore()
            return
        # Accepted so QGIS does not also act on the key (Backspace/Delete would delete features).
        e.accept()

    # -- actions -----------------------------------------------------------------------
    def undo(self) -> None:
        """Remove the last vertex."""
        if self.points:
            self.points.pop()
        self._redraw()

    def cancel(self) -> None:
        """Drop the polygon being drawn."""
        self.reset()
        self._show_status("Mars analog search area: cancelled")
        self.cancelled.emit()

    def finish(self) -> DrawnArea | None:
        """Close the polygon and emit it; keep drawing when it is not a polygon yet."""
        geometry = self.geometry(include_hover=False)
        if geometry is None:
            self._show_status("Mars analog search area: add at least 3 vertices before finishing")
            return None
        if not geometry.isGeosValid():
            # A self-crossing outline still means "this area": repair rather than refuse.
            geometry = geometry.makeValid()
        crs = self.canvas().mapSettings().destinationCrs()
        drawn = DrawnArea(QgsGeometry(geometry), QgsCoordinateReferenceSystem(crs), measure_area_m2(geometry, crs))
        self.reset()
        self._show_status(self._status_text())
        self.areaFinished.emit(drawn)
        return drawn

    def geometry(self, include_hover: bool = True) -> QgsGeometry | None:
        """The polygon drawn so far (with the mouse position as the moving vertex), or ``None``
        while it has fewer than 3 distinct vertices or no area."""
        pts = list(self.points)
        if include_hover and self.hover is not None:
            pts.append(self.hover)
        distinct = []
        for p in pts:
            if not distinct or not p.compare(distinct[-1], 1e-12):
                distinct.append(p)
        if len(distinct) > 1 and distinct[-1].compare(distinct[0], 1e-12):
            distinct.pop()
        if len(distinct) < 3:
            return None
        geometry = QgsGeometry.fromPolygonXY([distinct + [distinct[0]]])
        return geometry if geometry.area() > 0 else None

    # -- helpers -----------------------------------------------------------------------
    def _snapped(self, e) -> QgsPointXY:
        match = self.canvas().snappingUtils().snapToMap(e.mapPoint())
        if self.snap_indicator is None:
            self.snap_indicator = QgsSnapIndicator(self.canvas())
        self.snap_indicator.setMatch(match)
        return QgsPointXY(match.point()) if match.isValid() else QgsPointXY(e.mapPoint())

    def _ensure_rubber_band(self) -> QgsRubberBand:
        if self.rubber_band is None:
            rb = QgsRubberBand(self.canvas(), _POLYGON)
            rb.setStrokeColor(QColor(230, 80, 0, 220))
            rb.setFillColor(QColor(230, 80, 0, 50))
            rb.setWidth(2)
            self.rubber_band = rb
        return self.rubber_band

    def _redraw(self) -> None:
        rb = self._ensure_rubber_band()
        pts = list(self.points) + ([self.hover] if self.hover is not None else [])
        rb.reset(_POLYGON)
        for i, p in enumerate(pts):
            rb.addPoint(p, i == len(pts) - 1)  # repaint once, on the last vertex
        self._show_status(self._status_text())

    def _status_text(self) -> str:
        geometry = self.geometry()
        n = len(self.points) + (1 if self.hover is not None else 0)
        area = on_raster = None
        crs = self.canvas().mapSettings().destinationCrs()
        if geometry is not None:
            area = measure_area_m2(geometry, crs)
            on_raster = self._area_over_raster_m2(geometry, crs)
        text, cells, too_many = area_status_message(area, n, self.cell_size_m, self.stride_m,
                                                    self.cell_size_why, self.max_cells, on_raster)
        self.last_estimate = (area, cells, too_many)
        return text

    def _area_over_raster_m2(self, geometry: QgsGeometry, crs: QgsCoordinateReferenceSystem) -> float | None:
        """Area of the part of ``geometry`` over :attr:`raster_extent` (``None``: not known)."""
        if self.raster_extent is None:
            return None
        footprint = self._raster_footprint(crs)
        if footprint is None:
            return None
        if not geometry.isGeosValid():
            geometry = geometry.makeValid()  # a ring that crosses itself while being drawn
        overlap = geometry.intersection(footprint)
        return 0.0 if overlap.isEmpty() else measure_area_m2(overlap, crs)

    def _raster_footprint(self, crs: QgsCoordinateReferenceSystem) -> QgsGeometry | None:
        """:attr:`raster_extent` as a polygon in ``crs``, made once per raster and canvas CRS (the
        status is redrawn on every mouse move); ``None`` when it does not reproject there."""
        rect, raster_crs = self.raster_extent
        key = (rect.toString(), raster_crs.toWkt(), crs.toWkt())
        if self._footprint is None or self._footprint[0] != key:
            footprint = QgsGeometry.fromRect(rect)
            if raster_crs.isValid() and raster_crs != crs:
                # Densify first: a reprojected rectangle's edges are curves.
                footprint = footprint.densifyByCount(32)
                try:
                    footprint.transform(QgsCoordinateTransform(raster_crs, crs, QgsProject.instance()))
                except Exception:  # noqa: BLE001 - QgsCsException: the raster does not reproject here
                    footprint = None
            self._footprint = (key, footprint)
        return self._footprint[1]

    def _show_status(self, text: str) -> None:
        self.last_status = text
        self.statusChanged.emit(text)


def _no_match():
    from qgis.core import QgsPointLocator

    return QgsPointLocator.Match()
