"""Fixtures for the canvas face: a known canvas, the sample raster, the GUI with a recorded dialog.

Plugin modules are imported inside fixtures, never at the top: importing them before
pytest-qgis patches ``qgis.utils.iface`` would bind the real (``None``) iface.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BAHAMAS = ROOT / "resources" / "earth" / "landsat_bahamas_rgb_300m.tif"  # WGS 84 / UTM 18N, 300 m
GANGES = ROOT / "resources" / "mars" / "ganges_chasma_dunes_ctx_7m.tif"
HIRISE = sorted((ROOT / "resources" / "mars").glob("hirise_*.jpg"))
CANVAS_W, CANVAS_H = 600, 400


class DialogRecorder:
    """Stands in for the Processing dialog: records what it was opened with and answers as a
    user would (``returns``: the parameters of a run, or ``None`` for "closed without running")."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.returns = None
        self.raises: Exception | None = None
        self.on_open = None  # callable(params) run while the "dialog" is open

    def __call__(self, algorithm_id: str, parameters: dict):
        self.calls.append((algorithm_id, parameters))
        if self.on_open is not None:
            self.on_open(parameters)
        if self.raises is not None:
            raise self.raises
        return self.returns(parameters) if callable(self.returns) else self.returns

    @property
    def last(self) -> dict:
        assert self.calls, "the dialog was never opened"
        return self.calls[-1][1]


class HostPlugin:
    """The two things AnalogGui takes from the plugin: its menu name and its toolbar."""

    MENU = "&Siamese Analog Finder"

    def __init__(self) -> None:
        from qgis.PyQt.QtWidgets import QToolBar

        self.toolbar = QToolBar("Siamese Analog Finder")


@pytest.fixture
def clean_settings(qgis_app):
    """No remembered reference/settings before or after the test."""
    from siamese_analog_plugin.gui.settings import clear_last_used

    clear_last_used()
    yield
    clear_last_used()


@pytest.fixture
def project(qgis_new_project):
    """An empty project, emptied again afterwards."""
    yield qgis_new_project
    qgis_new_project.removeAllMapLayers()


@pytest.fixture
def set_canvas(qgis_canvas, qgis_parent):
    """``set_canvas(crs, extent)``: a ~600x400 canvas showing ``extent`` in ``crs``; the map
    tool is unset afterwards so no rubber band outlives the test."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsRectangle
    from qgis.PyQt.QtCore import QCoreApplication, QSize

    def _set(crs: str, extent: tuple[float, float, float, float]):
        # A hidden canvas never learns its size (the offscreen platform shows nothing anyway).
        qgis_canvas.resize(QSize(CANVAS_W, CANVAS_H))
        qgis_parent.show()
        QCoreApplication.processEvents()
        qgis_canvas.setDestinationCrs(QgsCoordinateReferenceSystem(crs))
        qgis_canvas.setExtent(QgsRectangle(*extent))
        assert qgis_canvas.mapSettings().outputSize().width() > CANVAS_W - 10
        return qgis_canvas

    try:
        yield _set
    finally:
        tool = qgis_canvas.mapTool()
        if tool is not None:
            qgis_canvas.unsetMapTool(tool)
        qgis_parent.hide()


@pytest.fixture
def bahamas(project):
    """The sample Landsat raster (UTM 18N), in the project."""
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(str(BAHAMAS), "bahamas")
    assert layer.isValid()
    project.addMapLayer(layer)
    return layer


@pytest.fixture
def recorder():
    return DialogRecorder()


@pytest.fixture
def gui(qgis_iface, recorder, clean_settings, project):
    """AnalogGui set up as the plugin does it, with the dialog recorded; unloaded afterwards."""
    from siamese_analog_plugin.gui.actions import AnalogGui

    plugin = HostPlugin()
    g = AnalogGui(qgis_iface, plugin, opener=recorder)
    g.initGui()
    try:
        yield g
    finally:
        if g.tool is not None:
            g.unload()
