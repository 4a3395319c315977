"""The canvas face end to end: button -> drawing -> prefilled dialog -> remembered settings."""

from __future__ import annotations

import pytest
from qgis.core import (
    Qgis,
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeature,
    QgsGeometry,
    QgsProcessingFeatureSourceDefinition,
    QgsProject,
    QgsRectangle,
    QgsVectorLayer,
)
from shapely import wkt as shapely_wkt
from shapely.geometry import box

from .conftest import BAHAMAS, GANGES, HIRISE
from .helpers import draw, map_point, move, ring, rubber_bands

pytestmark = pytest.mark.qgis

UTM_EXTENT = (100000, 2600000, 340000, 2830000)
SQUARE = [(100, 100), (300, 100), (300, 300), (100, 300)]


def temporary_layers():
    from siamese_analog_plugin.gui.area_layer import TEMPORARY_PROPERTY

    return [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.customProperty(TEMPORARY_PROPERTY)]


def mercator_view_of_bahamas():
    """The raster's extent seen in Web Mercator (a CRS other than the raster's UTM 18N)."""
    tr = QgsCoordinateTransform(QgsCoordinateReferenceSystem("EPSG:32618"), QgsCoordinateReferenceSystem("EPSG:3857"),
                                QgsProject.instance())
    r = tr.transformBoundingBox(QgsRectangle(101985.0, 2611485.0, 339315.0, 2826915.0))
    return r.xMinimum(), r.yMinimum(), r.xMaximum(), r.yMaximum()


def area_as_the_algorithm_reads_it(area_value):
    """AREA -> engine Area, as the Processing algorithm does: the (selected) polygons of the
    layer, unioned, with the layer's CRS."""
    from siamese_analog_plugin.engine.grid import Area

    if isinstance(area_value, QgsProcessingFeatureSourceDefinition):
        layer = QgsProject.instance().mapLayer(area_value.source.staticValue())
        features = layer.selectedFeatures() if area_value.selectedFeaturesOnly else list(layer.getFeatures())
    else:
        layer = QgsProject.instance().mapLayer(area_value)
        features = list(layer.getFeatures())
    geometry = QgsGeometry.unaryUnion([f.geometry() for f in features])
    return Area(shapely_wkt.loads(geometry.asWkt()), layer.crs().toWkt())


class TestActions:
    def test_init_gui_adds_the_button_and_menu_entries(self, gui):
        assert gui.draw_action in gui.plugin.toolbar.actions()
        assert gui.selection_action not in gui.plugin.toolbar.actions()  # menu only
        assert gui.menu == "&Siamese Analog Finder"
        assert [a.objectName() for a in gui.actions] == ["siameseAnalogDrawArea", "siameseAnalogSelectedPolygons"]

    def test_button_activates_the_tool(self, gui, set_canvas):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        gui.draw_action.trigger()
        assert canvas.mapTool() is gui.tool
        assert gui.draw_action.isChecked()
        gui.draw_action.trigger()  # a second click keeps the tool
        assert canvas.mapTool() is gui.tool and gui.draw_action.isChecked()
        canvas.unsetMapTool(gui.tool)
        assert not gui.draw_action.isChecked()


    def test_tooltip_keeps_the_usage_hint(self, gui):
        """QGIS registers toolbar actions with its shortcuts manager, which rewrites the tooltip and
        drops any text in brackets (the desktop showed "... on the map , then open ...")."""
        from qgis.gui import QgsGui

        manager = QgsGui.shortcutsManager()
        manager.registerAction(gui.draw_action)
        try:
            tip = gui.plugin.toolbar.widgetForAction(gui.draw_action).toolTip()
            assert "right-click or Enter" in tip and "Esc" in tip
        finally:
            manager.unregisterAction(gui.draw_action)


class TestImageryIsNeverAResult:
    def test_a_result_raster_is_never_the_imagery(self, gui, bahamas, project, qgis_iface):
        """After a run the dissimilarity raster is on top and often active: a second area must
        still search the user's imagery."""
        from qgis.core import QgsRasterLayer

        from siamese_analog_plugin.styles import style_dissimilarity_raster

        result = QgsRasterLayer(str(BAHAMAS), "a result")
        style_dissimilarity_raster(result)  # as the Processing post-processor does
        project.addMapLayer(result)
        qgis_iface.setActiveLayer(result)
        assert gui.input_raster() is bahamas
        assert gui.dialog_parameters(area="x")["INPUT"] == bahamas.id()
        project.removeMapLayer(bahamas.id())
        assert gui.input_raster() is None  # no imagery left: the user chooses it in the dialog


class TestDrawnAreaDialog:
    def test_dialog_gets_drawn_area_raster_and_last_used(self, gui, set_canvas, bahamas, recorder, qgis_iface):
        from siamese_analog_plugin.gui.parameters import ALGORITHM_ID
        from siamese_analog_plugin.gui.settings import save_last_used

        save_last_used({"REFERENCE": [str(GANGES)], "CELL_SIZE": 6000.0, "DEVICE": "cpu", "BATCH_SIZE": 64})
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        qgis_iface.setActiveLayer(bahamas)
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)

        assert len(recorder.calls) == 1
        algorithm_id, params = recorder.calls[0]
        assert algorithm_id == ALGORITHM_ID
        assert params["INPUT"] == bahamas.id()
        assert params["REFERENCE"] == [str(GANGES)]
        assert params["CELL_SIZE"] == 6000.0 and params["DEVICE"] == "cpu" and params["BATCH_SIZE"] == 64
        assert "OUTPUT_RASTER" not in params  # outputs keep the dialog's defaults
        layer = QgsProject.instance().mapLayer(params["AREA"])
        assert layer is not None and temporary_layers() == [layer]
        assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:32618")
        assert layer.featureCount() == 1
        got = ring(next(layer.getFeatures()).geometry())
        for g, (x, y) in zip(got, SQUARE):
            e = map_point(canvas, x, y)
            assert g.x() == pytest.approx(e.x(), abs=1e-6) and g.y() == pytest.approx(e.y(), abs=1e-6)
        # The status bar showed the estimate at the last-used cell size while drawing.
        assert "cells of 6,000 m" in "\n".join(str(c) for c in qgis_iface.statusBarIface().showMessage.call_args_list)

    def test_canvas_crs_other_than_the_raster_reprojects_onto_it(self, gui, set_canvas, bahamas, recorder):
        from siamese_analog_plugin.engine.grid import build_grid
        from siamese_analog_plugin.engine.imagery import describe_raster

        canvas = set_canvas("EPSG:3857", mercator_view_of_bahamas())
        gui.draw_action.trigger()
        draw(gui.tool, canvas, [(200, 100), (400, 100), (420, 300), (200, 300)])  # around the centre
        params = recorder.last
        layer = QgsProject.instance().mapLayer(params["AREA"])
        assert layer.crs() == QgsCoordinateReferenceSystem("EPSG:3857")  # kept in the canvas CRS

        # Where the drawn polygon lies in the raster's CRS, by QGIS's own transform (edges densified:
        # a straight Mercator edge is a curve in UTM).
        drawn_utm = next(layer.getFeatures()).geometry().densifyByCount(200)
        drawn_utm.transform(QgsCoordinateTransform(layer.crs(), bahamas.crs(), QgsProject.instance()))
        expected = shapely_wkt.loads(drawn_utm.asWkt())
        info = describe_raster(BAHAMAS)
        assert box(*info.bounds).contains(expected)  # drawn inside the imagery

        grid = build_grid(info, 6000.0, area_as_the_algorithm_reads_it(params["AREA"]))
        assert grid.area.symmetric_difference(expected).area < 1e-4 * expected.area
        assert len(grid) > 100
        cx, cy = grid.centres()
        assert ((cx > info.bounds[0]) & (cx < info.bounds[2]) & (cy > info.bounds[1]) & (cy < info.bounds[3])).all()

    def test_remembers_the_settings_of_a_run(self, gui, set_canvas, bahamas, recorder):
        from siamese_analog_plugin.gui.settings import load_last_used

        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        gui.draw_action.trigger()
        # The user picks two HiRISE references and 9 km cells, and runs.
        recorder.returns = lambda p: {**p, "REFERENCE": [str(h) for h in HIRISE], "CELL_SIZE": 9000.0,
                                      "OUTPUT_RASTER": "/tmp/x.tif"}
        draw(gui.tool, canvas, SQUARE)
        assert "REFERENCE" not in recorder.last  # nothing remembered yet
        assert load_last_used() == {"REFERENCE": [str(h) for h in HIRISE], "CELL_SIZE": 9000.0}
        assert gui.tool.cell_size_m == 9000.0  # the status estimate follows

        recorder.returns = None  # closed without running: nothing new remembered
        draw(gui.tool, canvas, SQUARE)
        assert recorder.last["REFERENCE"] == [str(h) for h in HIRISE]
        assert recorder.last["CELL_SIZE"] == 9000.0
        assert load_last_used()["CELL_SIZE"] == 9000.0

    def test_next_drawing_replaces_the_area_layer(self, gui, set_canvas, bahamas, recorder):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)
        first = recorder.last["AREA"]
        draw(gui.tool, canvas, [(50, 50), (150, 50), (100, 150)])
        second = recorder.last["AREA"]
        assert first != second
        assert QgsProject.instance().mapLayer(first) is None
        assert [lyr.id() for lyr in temporary_layers()] == [second]

    def test_no_raster_says_so_and_still_opens(self, gui, set_canvas, recorder, qgis_iface):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        qgis_iface.messageBar().clear_messages()
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)
        assert "INPUT" not in recorder.last and "AREA" in recorder.last
        assert any("No raster layer" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Info))

    def test_a_failing_dialog_is_reported_not_raised(self, gui, set_canvas, bahamas, recorder, qgis_iface):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        qgis_iface.messageBar().clear_messages()
        recorder.raises = RuntimeError("The Processing algorithm 'siameseanalog:findanalogs' is not available")
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)
        assert any("not available" in m for m in qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Critical))
        assert canvas.mapTool() is gui.tool  # still usable


class TestSelectedPolygons:
    @pytest.fixture
    def polygons(self, project):
        layer = QgsVectorLayer("Polygon?crs=EPSG:4326", "sites", "memory")
        feats = []
        for x0 in (-78.5, -77.5):
            f = QgsFeature()
            f.setGeometry(QgsGeometry.fromRect(QgsRectangle(x0, 24.0, x0 + 0.5, 24.5)))
            feats.append(f)
        layer.dataProvider().addFeatures(feats)
        project.addMapLayer(layer)
        return layer

    def test_selected_features_become_the_area(self, gui, polygons, bahamas, recorder, qgis_iface):
        from siamese_analog_plugin.engine.grid import build_grid
        from siamese_analog_plugin.engine.imagery import describe_raster

        first = next(polygons.getFeatures())
        polygons.selectByIds([first.id()])
        qgis_iface.setActiveLayer(polygons)
        gui.selection_action.trigger()
        params = recorder.last
        area = params["AREA"]
        assert isinstance(area, QgsProcessingFeatureSourceDefinition)
        assert area.source.staticValue() == polygons.id() and area.selectedFeaturesOnly
        assert params["INPUT"] == bahamas.id()  # the active layer is the polygons: first raster is used
        engine_area = area_as_the_algorithm_reads_it(area)
        grid = build_grid(describe_raster(BAHAMAS), 3000.0, engine_area)
        # Only the selected square (lon -78.5..-78.0) is searched.
        assert grid.lon.max() < -77.99 and grid.lon.min() > -78.51
        assert temporary_layers() == []  # no temporary layer for a selection

    def test_nothing_selected_is_a_clear_message(self, gui, polygons, recorder, qgis_iface):
        qgis_iface.messageBar().clear_messages()
        qgis_iface.setActiveLayer(polygons)
        gui.selection_action.trigger()
        assert recorder.calls == []
        warnings = qgis_iface.messageBar().get_messages(Qgis.MessageLevel.Warning)
        assert any("No polygon is selected in 'sites'" in m and "Select Features" in m for m in warnings)

    def test_selection_of_another_polygon_layer_is_found(self, gui, polygons, bahamas, recorder, qgis_iface):
        polygons.selectAll()
        qgis_iface.setActiveLayer(bahamas)  # active layer is the raster
        gui.selection_action.trigger()
        assert recorder.last["AREA"].source.staticValue() == polygons.id()
        assert recorder.last["INPUT"] == bahamas.id()


class TestCleanUp:
    def test_deactivating_the_tool_removes_band_and_layer(self, gui, set_canvas, bahamas, recorder):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)
        move(gui.tool, canvas, 10, 10)
        assert temporary_layers() and gui.tool.rubber_band in rubber_bands(canvas)
        band = gui.tool.rubber_band
        canvas.unsetMapTool(gui.tool)
        assert temporary_layers() == []
        assert band not in rubber_bands(canvas)

    def test_area_layer_outlives_a_tool_switch_while_the_dialog_is_open(self, gui, set_canvas, bahamas, recorder):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        seen = []
        # A dialog widget that borrows the canvas deactivates the tool; the search still reads the area.
        recorder.on_open = lambda p: (canvas.unsetMapTool(gui.tool),
                                      seen.append(QgsProject.instance().mapLayer(p["AREA"]) is not None))
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)
        assert seen == [True]
        assert temporary_layers() == []  # removed once the dialog closed

    def test_unload_leaves_nothing_behind(self, gui, set_canvas, bahamas, recorder):
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        toolbar = gui.plugin.toolbar
        gui.draw_action.trigger()
        draw(gui.tool, canvas, SQUARE)
        for x, y in SQUARE[:2]:
            move(gui.tool, canvas, x, y)
        band = gui.tool.rubber_band
        assert band in rubber_bands(canvas) and temporary_layers()
        gui.unload()
        assert canvas.mapTool() is None
        assert band not in rubber_bands(canvas)
        assert temporary_layers() == []
        assert toolbar.actions() == [] and gui.actions == []
