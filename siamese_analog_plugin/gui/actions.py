"""Toolbar and menu actions of the canvas face: draw an area, or use selected polygons.

:class:`AnalogGui` is created by the plugin's ``initGui`` and torn down by its ``unload``.
The Processing dialog is opened through :attr:`AnalogGui.open_dialog`, a plain callable
(``(algorithm_id, parameters) -> parameters of a successful run | None``) that tests replace
to check the parameters without showing a dialog.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from qgis.core import (
    Qgis,
    QgsApplication,
    QgsProcessingFeatureSourceDefinition,
    QgsProject,
    QgsRasterLayer,
    QgsVectorLayer,
)
from qgis.PyQt.QtWidgets import QAction

from .area_layer import TemporaryAreaLayer
from .map_tool import _POLYGON, AreaMapTool, DrawnArea
from .parameters import ALGORITHM_ID, build_dialog_parameters, estimate_cell_size
from .settings import load_last_used, save_last_used

__all__ = ["AnalogGui", "DialogOpener", "open_processing_dialog", "DEFAULT_MENU"]

DEFAULT_MENU = "&Siamese Analog Finder"
MESSAGE_TITLE = "Siamese Analog Finder"

DialogOpener = Callable[[str, dict], "dict | None"]


def open_processing_dialog(algorithm_id: str, parameters: dict) -> dict | None:
    """Show the Processing dialog of ``algorithm_id`` prefilled with ``parameters``.

    Returns:
        The parameters of the last successful run in the dialog, or ``None`` when the user
        closed it without running (what :class:`AnalogGui` remembers as "last used").

    Raises:
        RuntimeError: the algorithm is not registered (Processing disabled, provider failed).
    """
    import processing  # QGIS's Processing plugin; imported here so the module loads without it
    from qgis.utils import iface

    dialog = processing.createAlgorithmDialog(algorithm_id, parameters)
    if dialog is None:
        raise RuntimeError(f"The Processing algorithm '{algorithm_id}' is not available. Enable the Processing "
                           "plugin (Plugins > Manage and Install Plugins) and reload Siamese Analog Finder")
    used: dict = {}

    def remember(successful: bool, _results=None) -> None:
        if not successful:
            return
        try:  # the values in the dialog when the run started (what the user actually ran)
            used.clear()
            used.update(dialog.createProcessingParameters())
        except Exception:  # an invalid widget value: keep what the dialog was opened with
            used.update(parameters)

    if hasattr(dialog, "algorithmFinished"):
        dialog.algorithmFinished.connect(remember)
    # As processing.execAlgorithmDialog: widgets may borrow the canvas; give the tool back.
    canvas = iface.mapCanvas() if iface is not None else None
    previous_tool = canvas.mapTool() if canvas is not None else None
    dialog.show()
    (getattr(dialog, "exec", None) or dialog.exec_)()
    if canvas is not None and canvas.mapTool() != previous_tool:
        canvas.setMapTool(previous_tool)
    if not used and dialog.results():
        remember(True)
    dialog.close()
    return dict(used) or None


def _is_polygon_layer(layer) -> bool:
    return isinstance(layer, QgsVectorLayer) and layer.isValid() and layer.geometryType() == _POLYGON


def _reference_takes_list() -> bool:
    """Whether the algorithm's REFERENCE takes a list of files (multiple layers) or one string."""
    algorithm = QgsApplication.processingRegistry().algorithmById(ALGORITHM_ID)
    if algorithm is None:
        return True
    definition = algorithm.parameterDefinition("REFERENCE")
    return definition is None or definition.type() == "multilayer"


class AnalogGui:
    """The plugin's canvas actions: the area-drawing tool and "search the selected polygons".

    Args:
        iface: the QGIS interface.
        plugin: the plugin object (its ``MENU`` and ``toolbar`` are used when it has them).
        opener: replaces :func:`open_processing_dialog` (tests).
    """

    def __init__(self, iface, plugin=None, opener: DialogOpener | None = None) -> None:
        self.iface = iface
        self.plugin = plugin
        self.open_dialog: DialogOpener = opener or open_processing_dialog
        self.canvas = iface.mapCanvas()
        self.tool: AreaMapTool | None = None
        self.area_layer = TemporaryAreaLayer()
        self.draw_action: QAction | None = None
        self.selection_action: QAction | None = None
        self.actions: list[QAction] = []
        self.similar = None  # the Find similar cells tool and its action (gui.similar_tool.SimilarCellsFace)
        self.last_parameters: dict | None = None  # what the last dialog was opened with
        self.last_status = ""
        self._dialog_open = False
        self._remove_area_after_dialog = False

    # -- set-up and tear-down ----------------------------------------------------------
    @property
    def menu(self) -> str:
        """The plugin's menu name (``MENU`` of the plugin or its module)."""
        menu = getattr(self.plugin, "MENU", None)
        if not menu and self.plugin is not None:
            menu = getattr(sys.modules.get(type(self.plugin).__module__), "MENU", None)
        return menu or DEFAULT_MENU

    @property
    def toolbar(self):
        return getattr(self.plugin, "toolbar", None)

    def initGui(self) -> None:  # noqa: N802 - QGIS plugin convention
        """Create the tool and the actions; put them in the plugin's menu and toolbar."""
        parent = self.iface.mainWindow()
        self.tool = AreaMapTool(self.canvas)
        self.tool.areaFinished.connect(self._on_area_finished)
        self.tool.statusChanged.connect(self.show_status)
        self.tool.deactivated.connect(self._on_tool_deactivated)

        self.draw_action = QAction(QgsApplication.getThemeIcon("/mActionCapturePolygon.svg"),
                                   "Draw an Area and Find Mars Analog Sites…", parent)
        self.draw_action.setObjectName("siameseAnalogDrawArea")
        self.draw_action.setCheckable(True)
        self.draw_action.setToolTip("Draw the area to search on the map: left-click the corners; right-click or "
                                    "Enter to finish, Backspace to undo, Esc to cancel. Then Find Mars analog "
                                    "sites opens.")  # no brackets: QGIS strips them as a shortcut
        self.draw_action.triggered.connect(self.activate_tool)
        self.tool.setAction(self.draw_action)  # the button stays checked while the tool is active

        self.selection_action = QAction(QgsApplication.getThemeIcon("/mIconPolygonLayer.svg"),
                                        "Find Mars Analog Sites in Selected Polygons…", parent)
        self.selection_action.setObjectName("siameseAnalogSelectedPolygons")
        self.selection_action.setToolTip("Search the selected features of the active polygon layer")
        self.selection_action.triggered.connect(lambda _checked=False: self.run_on_selection())

        self.actions = [self.draw_action, self.selection_action]
        for action in self.actions:
            self.iface.addPluginToMenu(self.menu, action)
        if self.toolbar is not None:
            self.toolbar.addAction(self.draw_action)
        else:
            self.iface.addToolBarIcon(self.draw_action)
        from .similar_tool import SimilarCellsFace

        self.similar = SimilarCellsFace(self.iface, self.menu, self.toolbar)

    def unload(self) -> None:
        """Remove the actions, unset the tool, remove the rubber band and the area layer."""
        if self.tool is not None:
            if self.canvas.mapTool() is self.tool:
                self.canvas.unsetMapTool(self.tool)  # deactivates: rubber band goes
            self.tool.reset()
            self.tool._remove_items()
            for signal, slot in ((self.tool.areaFinished, self._on_area_finished),
                                 (self.tool.statusChanged, self.show_status),
                                 (self.tool.deactivated, self._on_tool_deactivated)):
                try:
                    signal.disconnect(slot)
                except (TypeError, RuntimeError):
                    pass
            self.tool.setAction(None)
        self.area_layer.remove()
        if self.similar is not None:
            self.similar.unload()
            self.similar = None
        for action in self.actions:
            self.iface.removePluginMenu(self.menu, action)
            if self.toolbar is not None:
                self.toolbar.removeAction(action)
            else:
                self.iface.removeToolBarIcon(action)
            action.deleteLater()
        self.actions = []
        self.draw_action = self.selection_action = None
        if self.tool is not None:
            self.tool.deleteLater()
            self.tool = None

    # -- the drawing tool --------------------------------------------------------------
    def activate_tool(self, _checked: bool = False) -> None:
        """Make the area tool the canvas's tool, with a fresh cell-size estimate."""
        if self.tool is None:
            return
        self.refresh_estimate()
        if self.canvas.mapTool() is not self.tool:
            self.canvas.setMapTool(self.tool)
        elif self.draw_action is not None:
            self.draw_action.setChecked(True)  # a second click keeps the tool, not toggles it off

    def refresh_estimate(self) -> None:
        """Give the tool the cell size the next search would use (for the status estimate)."""
        if self.tool is None:
            return
        last = load_last_used()
        raster = self.input_raster()
        path = raster.source() if raster is not None and raster.providerType() == "gdal" else None
        self.tool.cell_size_m, self.tool.cell_size_why = estimate_cell_size(last, path)
        self.tool.stride_m = last.get("STRIDE")
        self.tool.raster_extent = (raster.extent(), raster.crs()) if raster is not None else None

    def _on_area_finished(self, drawn: DrawnArea) -> None:
        layer = self.area_layer.replace(drawn)
        self.open_search_dialog(area=layer.id())

    def _on_tool_deactivated(self) -> None:
        self.show_status("")
        if self._dialog_open:
            # The dialog (or its running search) still reads the area layer: remove it after.
            self._remove_area_after_dialog = True
        else:
            self.area_layer.remove()

    # -- selected polygons -------------------------------------------------------------
    def selected_polygon_layer(self) -> QgsVectorLayer | None:
        """The active layer if it is a polygon layer with a selection, else the first such
        layer of the project."""
        active = self.iface.activeLayer()
        if _is_polygon_layer(active) and active.selectedFeatureCount() > 0:
            return active
        for layer in QgsProject.instance().mapLayers().values():
            if _is_polygon_layer(layer) and layer.selectedFeatureCount() > 0:
                return layer
        return None

    def run_on_selection(self, layer: QgsVectorLayer | None = None) -> dict | None:
        """Open the dialog with AREA = the selected features of ``layer`` (default: see
        :meth:`selected_polygon_layer`); a message says what to do when nothing is selected."""
        if layer is None:
            layer = self.selected_polygon_layer()
        elif not _is_polygon_layer(layer) or layer.selectedFeatureCount() == 0:
            layer = None
        if layer is None:
            active = self.iface.activeLayer()
            where = f" in '{active.name()}'" if _is_polygon_layer(active) else ""
            self.message(f"No polygon is selected{where}. Select the polygons to search in a polygon layer "
                         "(Select Features tool) and try again, or draw the area with the "
                         "'Draw an Area' tool.", Qgis.MessageLevel.Warning)
            return None
        area = QgsProcessingFeatureSourceDefinition(layer.id(), True)
        return self.open_search_dialog(area=area)

    # -- the dialog --------------------------------------------------------------------
    def input_raster(self) -> QgsRasterLayer | None:
        """The active raster layer, else the first raster shown on the canvas, else in the project;
        never one of the plugin's own results (a dissimilarity or class raster is no imagery)."""
        from ..embedding_layers import embeddings_of_layer
        from ..styles import is_result_layer

        def usable(layer) -> bool:  # embedding rasters and what is computed from them are no imagery either
            return isinstance(layer, QgsRasterLayer) and layer.isValid() and not is_result_layer(layer) \
                and embeddings_of_layer(layer) is None

        active = self.iface.activeLayer()
        if usable(active):
            return active
        candidates = list(self.canvas.layers()) + list(QgsProject.instance().mapLayers().values())
        for layer in candidates:
            if usable(layer):
                return layer
        return None

    def dialog_parameters(self, area) -> dict:
        """The dialog's initial parameters: the input raster, ``area``, the last-used rest."""
        raster = self.input_raster()
        return build_dialog_parameters(raster.id() if raster is not None else None, area, load_last_used(),
                                       _reference_takes_list())

    def open_search_dialog(self, area) -> dict | None:
        """Open Find Mars analog sites on ``area``; remember the settings of a successful run."""
        params = self.dialog_parameters(area)
        self.last_parameters = params
        if "INPUT" not in params:
            self.message("No raster layer is loaded: choose the Earth imagery to search in the dialog.",
                         Qgis.MessageLevel.Info)
        self._dialog_open = True
        try:
            used = self.open_dialog(ALGORITHM_ID, dict(params))
        except Exception as exc:  # a broken dialog must not take the tool down with it
            self.message(str(exc), Qgis.MessageLevel.Critical)
            used = None
        finally:
            self._dialog_open = False
        if used:
            save_last_used(used)
            self.refresh_estimate()
        if self._remove_area_after_dialog:
            self._remove_area_after_dialog = False
            if self.tool is None or self.canvas.mapTool() is not self.tool:
                self.area_layer.remove()
        return used

    # -- messages ----------------------------------------------------------------------
    def show_status(self, text: str) -> None:
        """Show ``text`` in the QGIS status bar (clears it when empty)."""
        self.last_status = text
        bar = None
        status_iface = getattr(self.iface, "statusBarIface", None)
        if callable(status_iface):
            bar = status_iface()
        if bar is None:
            bar = self.iface.mainWindow().statusBar()
        if text:
            bar.showMessage(text, 0)
        else:
            bar.clearMessage()

    def message(self, text: str, level=Qgis.MessageLevel.Info) -> None:
        """A message in the QGIS message bar."""
        self.iface.messageBar().pushMessage(MESSAGE_TITLE, text, level=level, duration=10)
