"""The *Find similar cells* map tool: click a cell, see where else the ground looks like it.

A query by example over an embedding raster (``engine.similar.run_similar``): only stored
embeddings are read, no cell is encoded, so it runs at once, on the main thread, when the user
clicks. Which embedding raster it queries: see :mod:`..embedding_layers` (the active layer when
it is one or was made from one, else the last one written or used). The result is a
dissimilarity raster in a temporary file, added styled (red = most alike) as "Similar to cell N",
with the clicked cell outlined on the map.
"""

from __future__ import annotations

import os
import uuid

from qgis.core import (
    Qgis,
    QgsColorRampLegendNodeSettings,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsGeometry,
    QgsPointXY,
    QgsProcessingUtils,
    QgsProject,
    QgsRasterLayer,
    QgsRectangle,
)
from qgis.gui import QgsMapTool, QgsRubberBand
from qgis.PyQt.QtCore import Qt, pyqtSignal
from qgis.PyQt.QtGui import QColor
from qgis.PyQt.QtWidgets import QAction, QApplication

from ..embedding_layers import EMBEDDINGS_PROPERTY, embeddings_of_layer, last_embeddings, remember_embeddings
from .map_tool import _POLYGON

__all__ = ["SimilarCellsTool", "SimilarCellsFace", "find_embeddings", "MESSAGE_TITLE", "NO_EMBEDDINGS"]

MESSAGE_TITLE = "Find similar cells"
NO_EMBEDDINGS = ("No embedding raster to query. Run 'Embed area' (or Find Mars analog sites with 'Keep the "
                 "embeddings'), or select an embedding raster layer, then click a cell.")
MORE_ALIKE, LESS_ALIKE = "more alike", "less alike"


def find_embeddings(active_layer) -> str | None:
    """The embedding raster a click queries: the active layer's, else the last one remembered."""
    return embeddings_of_layer(active_layer) or last_embeddings()


def _relabel_legend(layer: QgsRasterLayer) -> None:
    """The plugin's dissimilarity styling, with the legend saying "alike" instead of "Mars-like"."""
    shader = layer.renderer().shader() if hasattr(layer.renderer(), "shader") else None
    function = shader.rasterShaderFunction() if shader is not None else None
    if function is None or not hasattr(function, "setLegendSettings"):
        return
    legend = QgsColorRampLegendNodeSettings()
    legend.setUseContinuousLegend(True)
    legend.setMinimumLabel(f"{function.minimumValue():.3g} ({MORE_ALIKE})")
    legend.setMaximumLabel(f"{function.maximumValue():.3g} ({LESS_ALIKE})")
    function.setLegendSettings(legend)


class SimilarCellsTool(QgsMapTool):
    """Left-click a cell: a "Similar to cell N" layer (dissimilarity to that cell's embedding).

    Args:
        canvas: the map canvas.
        iface: the QGIS interface (message bar, active layer).
        project: where the layer goes (default: the current project).

    Attributes:
        last_layer: the last layer added; ``last_message``: the last message-bar text.
    """

    similarAdded = pyqtSignal(object)  # noqa: N815 - Qt signal naming; the QgsRasterLayer added

    def __init__(self, canvas, iface, project: QgsProject | None = None) -> None:
        super().__init__(canvas)
        self.iface = iface
        self.project = project
        self.last_layer: QgsRasterLayer | None = None
        self.last_message = ""
        self.marker = QgsRubberBand(canvas, _POLYGON)
        self.marker.setColor(QColor(0, 0, 0, 0))
        self.marker.setFillColor(QColor(0, 0, 0, 0))
        self.marker.setStrokeColor(QColor(20, 20, 20))
        self.marker.setWidth(2)
        self.setCursor(Qt.CursorShape.CrossCursor)

    # -- events ----------------------------------------------------------------------------
    def canvasReleaseEvent(self, event) -> None:  # noqa: N802 - QgsMapTool API
        if event.button() != Qt.MouseButton.LeftButton:
            return
        self.find_similar(event.mapPoint())

    def deactivate(self) -> None:
        self.marker.reset(_POLYGON)
        super().deactivate()

    # -- the query -------------------------------------------------------------------------
    def find_similar(self, point: QgsPointXY) -> QgsRasterLayer | None:
        """Query the cell under ``point`` (canvas CRS); the layer added, or ``None`` (a message says why)."""
        path = find_embeddings(self.iface.activeLayer() if self.iface is not None else None)
        if path is None:
            self._message(NO_EMBEDDINGS, Qgis.MessageLevel.Warning)
            return None
        QApplication.setOverrideCursor(Qt.CursorShape.WaitCursor)
        try:
            return self._query(path, point)
        finally:
            QApplication.restoreOverrideCursor()

    def _query(self, path: str, point: QgsPointXY) -> QgsRasterLayer | None:
        from ..engine.errors import AnalogFinderError

        try:
            from ..engine.embeddings import EmbeddingRaster
            from ..engine.similar import SimilarParams, run_similar

            source = EmbeddingRaster.open(path)
            raster_crs = QgsCoordinateReferenceSystem.fromWkt(source.grid.crs_wkt)
            canvas_crs = self.canvas().mapSettings().destinationCrs()
            x, y = point.x(), point.y()
            if raster_crs.isValid() and canvas_crs.isValid() and raster_crs != canvas_crs:
                tr = QgsCoordinateTransform(canvas_crs, raster_crs, self._project())
                try:
                    p = tr.transform(QgsPointXY(x, y))
                except Exception:  # QgsCsException: a click where the raster's CRS is undefined
                    self._message("The click is outside the embedded area. Click a cell of the embedding raster.",
                                  Qgis.MessageLevel.Warning)
                    return None
                x, y = p.x(), p.y()
            index = source.cell_at(x, y)
            cell_id = int(source.grid.ids[index])
            out = os.path.join(QgsProcessingUtils.tempFolder(), f"similar_cell_{cell_id}_{uuid.uuid4().hex[:8]}.tif")
            result = run_similar(SimilarParams(embeddings=path, cells=[cell_id], top_k=5), out)
        except AnalogFinderError as exc:
            self._message(str(exc), Qgis.MessageLevel.Warning)
            return None
        except ImportError as exc:
            from ..processing.base import install_hint, missing_dependencies

            self._message(install_hint([exc.name] if exc.name else missing_dependencies() or ["torch"]),
                          Qgis.MessageLevel.Critical)
            return None
        layer = self._add_layer(out, cell_id, path)
        self._outline(source, index, raster_crs)
        best = [s for s in result.best(4) if s["id"] != cell_id][:3]
        where = "; ".join(f"cell {s['id']} at lon {s['lon']:.4f}, lat {s['lat']:.4f}" for s in best)
        self._message(f"Similar to cell {cell_id}: red = most alike." + (f" Closest: {where}." if where else ""),
                      Qgis.MessageLevel.Info)
        self.last_layer = layer
        self.similarAdded.emit(layer)
        return layer

    # -- helpers ---------------------------------------------------------------------------
    def _project(self) -> QgsProject:
        return self.project or QgsProject.instance()

    def _add_layer(self, out: str, cell_id: int, embeddings: str) -> QgsRasterLayer:
        from ..styles import style_dissimilarity_raster

        name = f"Similar to cell {cell_id}"
        layer = QgsRasterLayer(out, name)
        style_dissimilarity_raster(layer, name)
        _relabel_legend(layer)
        layer.setCustomProperty(EMBEDDINGS_PROPERTY, embeddings)  # a click on it queries the same embeddings
        remember_embeddings(embeddings)
        self._project().addMapLayer(layer)
        return layer

    def _outline(self, source, index: int, raster_crs) -> None:
        """Outline the clicked cell on the canvas."""
        minx, miny, maxx, maxy = (float(v) for v in source.grid.bounds(index))
        geom = QgsGeometry.fromRect(QgsRectangle(minx, miny, maxx, maxy))
        self.marker.reset(_POLYGON)
        self.marker.setToGeometry(geom, raster_crs)

    def _message(self, text: str, level) -> None:
        self.last_message = text
        if self.iface is not None:
            self.iface.messageBar().pushMessage(MESSAGE_TITLE, text, level=level, duration=10)


class SimilarCellsFace:
    """The tool's action in the plugin's menu and toolbar (made by ``AnalogGui.initGui``)."""

    def __init__(self, iface, menu: str, toolbar=None) -> None:
        from qgis.core import QgsApplication

        self.iface = iface
        self.menu = menu
        self.toolbar = toolbar
        self.canvas = iface.mapCanvas()
        self.tool = SimilarCellsTool(self.canvas, iface)
        self.action = QAction(QgsApplication.getThemeIcon("/mActionIdentify.svg"), "Find Similar Cells",
                              iface.mainWindow())
        self.action.setObjectName("siameseAnalogSimilarCells")
        self.action.setCheckable(True)
        self.action.setToolTip("Click a cell on the map: a layer shows where else the ground looks like it (from the "
                               "embedding raster of the active layer, or the last one made by Embed area)")
        self.action.triggered.connect(self.activate)
        self.tool.setAction(self.action)
        iface.addPluginToMenu(menu, self.action)
        if toolbar is not None:
            toolbar.addAction(self.action)
        else:
            iface.addToolBarIcon(self.action)

    def activate(self, _checked: bool = False) -> None:
        if self.canvas.mapTool() is not self.tool:
            self.canvas.setMapTool(self.tool)
        else:
            self.action.setChecked(True)
        if find_embeddings(self.iface.activeLayer()) is None:
            self.tool._message(NO_EMBEDDINGS, Qgis.MessageLevel.Info)

    def unload(self) -> None:
        if self.canvas.mapTool() is self.tool:
            self.canvas.unsetMapTool(self.tool)
        self.tool.marker.reset(_POLYGON)
        self.canvas.scene().removeItem(self.tool.marker)
        self.tool.setAction(None)
        self.iface.removePluginMenu(self.menu, self.action)
        if self.toolbar is not None:
            self.toolbar.removeAction(self.action)
        else:
            self.iface.removeToolBarIcon(self.action)
        self.action.deleteLater()
        self.tool.deleteLater()
