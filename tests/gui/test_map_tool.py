"""The polygon tool on the pytest-qgis canvas, driven by simulated mouse and key events."""

from __future__ import annotations

import pytest
from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsPointXY,
    QgsProject,
    QgsSnappingConfig,
    QgsTolerance,
    QgsVectorLayer,
)
from qgis.PyQt.QtCore import Qt

from .helpers import click, draw, key, map_point, move, ring, rubber_bands

pytestmark = pytest.mark.qgis

UTM_EXTENT = (100000, 2600000, 340000, 2830000)  # over the Bahamas sample, EPSG:32618
SQUARE = [(100, 100), (300, 100), (300, 300), (100, 300)]


@pytest.fixture
def tool(set_canvas, project, clean_settings):
    from siamese_analog_plugin.gui.map_tool import AreaMapTool

    canvas = set_canvas("EPSG:32618", UTM_EXTENT)
    t = AreaMapTool(canvas)
    finished, statuses, cancelled = [], [], []
    t.areaFinished.connect(finished.append)
    t.statusChanged.connect(statuses.append)
    t.cancelled.connect(lambda: cancelled.append(True))
    t.finished, t.statuses, t.cancels = finished, statuses, cancelled
    canvas.setMapTool(t)
    try:
        yield t
    finally:
        canvas.unsetMapTool(t)
        t.deleteLater()


class TestDrawing:
    def test_clicks_make_the_polygon_in_the_canvas_crs(self, tool):
        canvas = tool.canvas()
        draw(tool, canvas, SQUARE)
        assert len(tool.finished) == 1
        drawn = tool.finished[0]
        assert drawn.crs == QgsCoordinateReferenceSystem("EPSG:32618")
        expected = [map_point(canvas, x, y) for x, y in SQUARE]
        got = ring(drawn.geometry)
        assert len(got) == 4
        for g, e in zip(got, expected):
            assert g.x() == pytest.approx(e.x(), abs=1e-6) and g.y() == pytest.approx(e.y(), abs=1e-6)
        # 200 px a side at the canvas scale, in square metres (UTM metres ~ ground metres here).
        side = 200 * canvas.mapUnitsPerPixel()
        assert drawn.area_m2 == pytest.approx(side * side, rel=0.01)
        assert tool.points == [] and tool.rubber_band.numberOfVertices() == 0

    def test_shape_follows_the_mouse(self, tool):
        canvas = tool.canvas()
        click(tool, canvas, 100, 100)
        click(tool, canvas, 300, 100)
        move(tool, canvas, 300, 300)
        assert tool.rubber_band.numberOfVertices() == 3
        hover = tool.rubber_band.getPoint(0, 2)
        assert hover.x() == pytest.approx(map_point(canvas, 300, 300).x())
        move(tool, canvas, 200, 350)
        assert tool.rubber_band.getPoint(0, 2).y() == pytest.approx(map_point(canvas, 200, 350).y())
        # The moving vertex is not a vertex until clicked.
        assert len(tool.points) == 2

    def test_enter_finishes(self, tool):
        draw(tool, tool.canvas(), SQUARE[:3], finish_with="enter")
        assert len(tool.finished) == 1
        assert len(ring(tool.finished[0].geometry)) == 3

    def test_finishing_needs_three_vertices(self, tool):
        canvas = tool.canvas()
        draw(tool, canvas, SQUARE[:2])
        assert tool.finished == []
        assert "at least 3 vertices" in tool.last_status
        assert len(tool.points) == 2  # still drawing

    def test_backspace_removes_the_last_vertex(self, tool):
        canvas = tool.canvas()
        for x, y in SQUARE:
            click(tool, canvas, x, y)
        event = key(tool, Qt.Key.Key_Backspace)
        assert event.isAccepted()  # QGIS must not also delete selected features
        assert len(tool.points) == 3
        assert tool.points[-1] == map_point(canvas, *SQUARE[2])
        key(tool, Qt.Key.Key_Return)
        assert len(ring(tool.finished[0].geometry)) == 3

    def test_escape_cancels(self, tool):
        canvas = tool.canvas()
        for x, y in SQUARE:
            click(tool, canvas, x, y)
        move(tool, canvas, 50, 50)
        key(tool, Qt.Key.Key_Escape)
        assert tool.points == [] and tool.hover is None
        assert tool.rubber_band.numberOfVertices() == 0
        assert tool.cancels == [True]
        # Enter after Esc finishes nothing.
        key(tool, Qt.Key.Key_Return)
        assert tool.finished == []

    def test_other_keys_are_left_to_qgis(self, tool):
        assert not key(tool, Qt.Key.Key_A).isAccepted()


class TestStatusEstimate:
    def test_area_and_cells_while_drawing(self, tool):
        from siamese_analog_plugin.engine.grid import estimate_cell_count

        canvas = tool.canvas()
        tool.cell_size_m, tool.cell_size_why = 6000.0, "last used"
        click(tool, canvas, 100, 100)
        click(tool, canvas, 300, 100)
        assert "2 corners" in tool.last_status
        move(tool, canvas, 300, 300)
        area, cells, too_many = tool.last_estimate
        side = 200 * canvas.mapUnitsPerPixel()
        assert area == pytest.approx(side * side / 2, rel=0.01)
        assert cells == estimate_cell_count(area, 6000.0)
        assert f"{cells:,} cells of 6,000 m" in tool.last_status
        assert "km²" in tool.last_status and not too_many

    def test_estimate_counts_only_the_part_over_the_raster(self, tool):
        from qgis.core import QgsRectangle

        from siamese_analog_plugin.engine.grid import estimate_cell_count

        canvas = tool.canvas()
        tool.cell_size_m = 6000.0
        left, top = map_point(canvas, 100, 100), map_point(canvas, 300, 300)
        # The raster covers the left half of the square (in the canvas CRS).
        mid_x = (left.x() + top.x()) / 2
        tool.raster_extent = (QgsRectangle(left.x() - 5e4, top.y() - 5e4, mid_x, left.y() + 5e4),
                              QgsCoordinateReferenceSystem("EPSG:32618"))
        for x, y in SQUARE:
            click(tool, canvas, x, y)
        area, cells, _ = tool.last_estimate
        side = 200 * canvas.mapUnitsPerPixel()
        assert area == pytest.approx(side * side, rel=0.01)
        assert abs(cells - estimate_cell_count(area / 2, 6000.0)) <= 1  # half the square
        assert cells < estimate_cell_count(area, 6000.0) - 100
        assert "over the input raster" in tool.last_status

    def test_raster_in_another_crs_and_outside(self, tool):
        from qgis.core import QgsRectangle

        from siamese_analog_plugin.engine.grid import estimate_cell_count

        canvas = tool.canvas()
        tool.cell_size_m = 6000.0
        wgs84 = QgsCoordinateReferenceSystem("EPSG:4326")
        tool.raster_extent = (QgsRectangle(-85.0, 15.0, -70.0, 30.0), wgs84)  # all of the drawn square
        for x, y in SQUARE:
            click(tool, canvas, x, y)
        area, cells, _ = tool.last_estimate
        assert cells == estimate_cell_count(area, 6000.0) and "over the input raster" not in tool.last_status
        tool.raster_extent = (QgsRectangle(-74.0, 40.0, -72.0, 42.0), wgs84)  # New York, far north
        move(tool, canvas, 320, 320)
        assert tool.last_estimate[1] == 0 and "OUTSIDE the input raster" in tool.last_status

    def test_warns_when_the_area_makes_too_many_cells(self, tool):
        canvas = tool.canvas()
        tool.cell_size_m = 30.0  # 30 m cells over ~130x130 km: ~19 million cells
        for x, y in SQUARE:
            click(tool, canvas, x, y)
        area, cells, too_many = tool.last_estimate
        assert too_many and cells > 1_000_000
        assert "TOO LARGE" in tool.last_status and "1,000,000" in tool.last_status

    def test_geographic_canvas_measures_square_metres(self, set_canvas, project):
        from siamese_analog_plugin.gui.map_tool import AreaMapTool

        canvas = set_canvas("EPSG:4326", (-79.0, 23.5, -76.5, 25.6))
        t = AreaMapTool(canvas)
        finished = []
        t.areaFinished.connect(finished.append)
        canvas.setMapTool(t)
        try:
            draw(t, canvas, SQUARE)
        finally:
            canvas.unsetMapTool(t)
        drawn = finished[0]
        assert drawn.crs.isGeographic()
        # The same polygon measured planimetrically in UTM 18N (scale error < 0.1 % here).
        utm = QgsGeometry(drawn.geometry)
        utm.transform(QgsCoordinateTransform(drawn.crs, QgsCoordinateReferenceSystem("EPSG:32618"),
                                             QgsProject.instance()))
        assert drawn.area_m2 == pytest.approx(utm.area(), rel=0.005)
        assert drawn.area_m2 > 1e9  # square metres, not square degrees


class TestSnapping:
    def test_vertices_snap_per_project_settings(self, tool):
        canvas = tool.canvas()
        target = map_point(canvas, 205, 205)
        layer = QgsVectorLayer("Point?crs=EPSG:32618", "snap targets", "memory")
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(target)))
        layer.dataProvider().addFeatures([f])
        QgsProject.instance().addMapLayer(layer)
        config = QgsSnappingConfig(QgsProject.instance())
        config.setEnabled(True)
        config.setMode(QgsSnappingConfig.AllLayers)
        config.setTypeFlag(QgsSnappingConfig.VertexFlag) if hasattr(config, "setTypeFlag") else config.setType(
            QgsSnappingConfig.Vertex)
        config.setTolerance(15)
        config.setUnits(QgsTolerance.Pixels)
        QgsProject.instance().setSnappingConfig(config)
        canvas.setLayers([layer])
        canvas.unsetMapTool(tool)
        canvas.setMapTool(tool)  # activation picks up the project's snapping settings
        try:
            click(tool, canvas, 200, 200)  # 5 px off the point: snaps
            click(tool, canvas, 100, 100)  # far from it: stays where clicked
            assert tool.points[0].x() == pytest.approx(target.x(), abs=1e-6)
            assert tool.points[0].y() == pytest.approx(target.y(), abs=1e-6)
            assert tool.points[1] == map_point(canvas, 100, 100)
            config.setEnabled(False)
            QgsProject.instance().setSnappingConfig(config)
            canvas.unsetMapTool(tool)
            canvas.setMapTool(tool)
            click(tool, canvas, 200, 200)
            assert tool.points[-1] == map_point(canvas, 200, 200)  # snapping off: no snap
        finally:
            config.setEnabled(False)
            QgsProject.instance().setSnappingConfig(config)
            canvas.setLayers([])


class TestCleanUp:
    def test_deactivation_removes_the_rubber_band(self, tool):
        canvas = tool.canvas()
        before = len(rubber_bands(canvas)) - (1 if tool.rubber_band is not None else 0)
        for x, y in SQUARE[:3]:
            click(tool, canvas, x, y)
        band = tool.rubber_band
        assert band in rubber_bands(canvas)
        canvas.unsetMapTool(tool)
        assert tool.rubber_band is None
        assert band not in rubber_bands(canvas)
        assert len(rubber_bands(canvas)) == before
        assert tool.points == []
