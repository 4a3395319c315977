"""The canvas face with the real Processing algorithm and the real plugin.

The Processing dialog is never shown: a real dialog is built (not executed) to check that it
takes the prefilled values, and a "user pressing Run" is played by running the algorithm with
those values, loading the styled results as the dialog does.
"""

from __future__ import annotations

import pytest
from qgis.core import (
    QgsApplication,
    QgsProcessingContext,
    QgsProcessingFeedback,
    QgsProject,
    QgsRasterLayer,
    QgsRuleBasedRenderer,
    QgsSingleBandPseudoColorRenderer,
    QgsVectorLayer,
)

from .conftest import BAHAMAS, GANGES
from .helpers import draw, move, rubber_bands

pytestmark = pytest.mark.qgis

UTM_EXTENT = (100000, 2600000, 340000, 2830000)
SQUARE = [(100, 100), (300, 100), (300, 300), (100, 300)]


def test_real_dialog_takes_the_prefilled_parameters(gui, analog_provider, set_canvas, bahamas, recorder,
                                                    qgis_iface, monkeypatch):
    import processing
    from qgis.gui import QgsBrowserGuiModel

    # The dialog's panel asks QGIS for its browser model; the pytest-qgis iface has none.
    browser = QgsBrowserGuiModel()
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: browser, raising=False)

    from siamese_analog_plugin.gui.parameters import ALGORITHM_ID
    from siamese_analog_plugin.gui.settings import save_last_used

    save_last_used({"REFERENCE": [str(GANGES)], "CELL_SIZE": 6000.0, "DEVICE": "cpu", "BATCH_SIZE": 16,
                    "MIN_COVERAGE": 0.25})
    canvas = set_canvas("EPSG:32618", UTM_EXTENT)
    qgis_iface.setActiveLayer(bahamas)
    gui.draw_action.trigger()
    draw(gui.tool, canvas, SQUARE)
    params = recorder.last

    dialog = processing.createAlgorithmDialog(ALGORITHM_ID, params)  # built, never shown
    try:
        values = dialog.createProcessingParameters()
    finally:
        dialog.close()
        dialog.deleteLater()
    context = QgsProcessingContext()
    context.setProject(QgsProject.instance())
    algorithm = QgsApplication.processingRegistry().createAlgorithmById(ALGORITHM_ID)
    assert algorithm.parameterAsRasterLayer(values, "INPUT", context).id() == bahamas.id()
    assert algorithm.parameterAsVectorLayer(values, "AREA", context).id() == params["AREA"]
    assert [lyr.source() for lyr in algorithm.parameterAsLayerList(values, "REFERENCE", context)] == [str(GANGES)]
    assert algorithm.parameterAsDouble(values, "CELL_SIZE", context) == 6000.0
    assert algorithm.parameterAsDouble(values, "MIN_COVERAGE", context) == 0.25
    assert algorithm.parameterAsString(values, "DEVICE", context) == "cpu"
    assert algorithm.parameterAsInt(values, "BATCH_SIZE", context) == 16
    ok, message = algorithm.checkParameterValues(values, context)
    assert ok, message


def test_drawn_area_search_runs_and_loads_styled_results(gui, analog_provider, set_canvas, bahamas, recorder,
                                                         tiny_model_path, tmp_path, qgis_iface):
    """Draw over the imagery in Web Mercator, "press Run", get styled cells over exactly that area."""
    import processing

    from siamese_analog_plugin.engine.grid import build_grid
    from siamese_analog_plugin.engine.imagery import describe_raster
    from siamese_analog_plugin.gui.settings import load_last_used, save_last_used
    from siamese_analog_plugin.processing.layers import area_from_source

    from .test_actions import mercator_view_of_bahamas

    save_last_used({"REFERENCE": [str(GANGES)], "CELL_SIZE": 6000.0, "DEVICE": "cpu", "MODEL": tiny_model_path})
    canvas = set_canvas("EPSG:3857", mercator_view_of_bahamas())
    qgis_iface.setActiveLayer(bahamas)
    outcome = {}

    def user_presses_run(params):
        run = {**params, "OUTPUT_RASTER": str(tmp_path / "dissimilarity.tif"),
               "OUTPUT_CELLS": str(tmp_path / "cells.gpkg")}
        context = QgsProcessingContext()
        context.setProject(QgsProject.instance())
        algorithm = QgsApplication.processingRegistry().createAlgorithmById("siameseanalog:findanalogs")
        outcome["area"] = area_from_source(algorithm.parameterAsSource(run, "AREA", context))
        outcome["results"] = processing.runAndLoadResults("siameseanalog:findanalogs", run,
                                                          feedback=QgsProcessingFeedback())
        return run

    recorder.returns = user_presses_run
    gui.draw_action.trigger()
    draw(gui.tool, canvas, [(200, 100), (400, 100), (420, 300), (200, 300)])

    grid = build_grid(describe_raster(BAHAMAS), 6000.0, outcome["area"])
    assert outcome["results"]["CELL_COUNT"] == len(grid) > 100
    layers = list(QgsProject.instance().mapLayers().values())
    rasters = [lyr for lyr in layers if lyr.source() == str(tmp_path / "dissimilarity.tif")]
    cells = [lyr for lyr in layers if lyr.source().startswith(str(tmp_path / "cells.gpkg"))
             and "analog_sites" not in lyr.source()]
    assert len(rasters) == 1 and isinstance(rasters[0].renderer(), QgsSingleBandPseudoColorRenderer)
    assert len(cells) == 1 and isinstance(cells[0].renderer(), QgsRuleBasedRenderer)
    assert cells[0].featureCount() == len(grid)
    # What the user ran with is remembered for next time.
    assert load_last_used()["MODEL"] == tiny_model_path and load_last_used()["CELL_SIZE"] == 6000.0


def test_plugin_init_gui_and_unload(qgis_iface, set_canvas, project, clean_settings):
    from qgis.gui import QgsMapToolPan

    from siamese_analog_plugin.gui.actions import AnalogGui
    from siamese_analog_plugin.gui.area_layer import TEMPORARY_PROPERTY
    from siamese_analog_plugin.plugin import MENU, SiameseAnalogPlugin

    plugin = SiameseAnalogPlugin(qgis_iface)
    plugin.initGui()
    try:
        assert isinstance(plugin.gui, AnalogGui)
        gui = plugin.gui
        assert gui.menu == MENU
        toolbar = plugin.toolbar
        assert gui.draw_action in toolbar.actions()
        opened = []
        gui.open_dialog = lambda alg, params: opened.append(params)  # the dialog is not shown in tests
        canvas = set_canvas("EPSG:32618", UTM_EXTENT)
        gui.draw_action.trigger()
        assert canvas.mapTool() is gui.tool
        draw(gui.tool, canvas, SQUARE)
        move(gui.tool, canvas, 20, 20)
        assert opened and QgsProject.instance().mapLayer(opened[0]["AREA"]) is not None
        band = gui.tool.rubber_band
        assert band in rubber_bands(canvas)
    finally:
        plugin.unload()
    assert plugin.gui is None
    assert canvas.mapTool() is None and band not in rubber_bands(canvas)
    assert not [lyr for lyr in QgsProject.instance().mapLayers().values() if lyr.customProperty(TEMPORARY_PROPERTY)]
    assert gui.actions == [] and gui.tool is None
    canvas.setMapTool(QgsMapToolPan(canvas))  # the canvas still works after unload
    canvas.unsetMapTool(canvas.mapTool())


def test_production_dialog_runs_the_search_and_remembers_it(qgis_iface, analog_provider, set_canvas, bahamas,
                                                            clean_settings, tiny_model_path, monkeypatch):
    """The real Processing dialog, executed: a timer presses Run as a user would, the search runs
    in a QGIS task, the styled results load, and what was run is remembered."""
    from qgis.gui import QgsBrowserGuiModel, QgsProcessingAlgorithmDialogBase
    from qgis.PyQt.QtCore import QElapsedTimer, QTimer
    from qgis.PyQt.QtWidgets import QApplication

    from siamese_analog_plugin.gui.actions import AnalogGui, open_processing_dialog
    from siamese_analog_plugin.gui.settings import load_last_used, save_last_used

    browser = QgsBrowserGuiModel()
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: browser, raising=False)
    save_last_used({"REFERENCE": [str(GANGES)], "CELL_SIZE": 9000.0, "DEVICE": "cpu", "MODEL": tiny_model_path})
    canvas = set_canvas("EPSG:32618", UTM_EXTENT)
    qgis_iface.setActiveLayer(bahamas)
    gui = AnalogGui(qgis_iface, None)  # no plugin toolbar: the QGIS plugins toolbar is used
    assert gui.open_dialog is open_processing_dialog
    gui.initGui()
    clock = QElapsedTimer()
    clock.start()
    state = {"pressed": False}

    def user():
        dialogs = [w for w in QApplication.topLevelWidgets()
                   if isinstance(w, QgsProcessingAlgorithmDialogBase) and w.isVisible()]
        if dialogs:
            dialog = dialogs[0]
            if not state["pressed"]:
                state["pressed"] = True
                # QGIS 3.22's reference widget itself resolves the files once when the dialog is
                # filled (C++, not ours); from Run on, nothing may open the reference with OGR.
                messages.clear()
                dialog.runAlgorithm()  # the Run button
            elif dialog.wasExecuted() or clock.elapsed() > 120_000:
                dialog.close()  # the dialog stays open when "keep dialog open" is set
        if clock.elapsed() < 150_000 and (not state["pressed"] or dialogs):
            QTimer.singleShot(100, user)

    messages = []

    def record(message, tag, level):
        messages.append(f"[{tag}] {message}")

    QgsApplication.messageLog().messageReceived.connect(record)
    try:
        gui.draw_action.trigger()
        QTimer.singleShot(100, user)
        draw(gui.tool, canvas, SQUARE)  # finishing opens the dialog (modal) until the user is done
        assert state["pressed"]
        # Checking the values, logging the command and running never open the reference image
        # as a vector ("[OGR] Cannot open <reference>.tif" in the log).
        assert not [m for m in messages if "Cannot open" in m and GANGES.name in m], messages
        remembered = load_last_used()
        assert remembered["CELL_SIZE"] == 9000.0 and remembered["MODEL"] == tiny_model_path
        assert remembered["REFERENCE"] == [str(GANGES)]
        layers = list(QgsProject.instance().mapLayers().values())
        assert any(isinstance(lyr.renderer(), QgsSingleBandPseudoColorRenderer) for lyr in layers
                   if isinstance(lyr, QgsRasterLayer) and lyr.id() != bahamas.id())
        assert any(isinstance(lyr.renderer(), QgsRuleBasedRenderer) for lyr in layers
                   if isinstance(lyr, QgsVectorLayer))
        assert canvas.mapTool() is gui.tool  # the tool is still there for the next area
        QgsApplication.messageLog().messageReceived.disconnect(record)
    finally:
        gui.unload()


def test_production_opener_says_when_the_algorithm_is_missing(qgis_processing):
    from siamese_analog_plugin.gui.actions import open_processing_dialog

    with pytest.raises(RuntimeError, match="'siameseanalog:nosuchalgorithm' is not available.*Enable the Processing"):
        open_processing_dialog("siameseanalog:nosuchalgorithm", {})
