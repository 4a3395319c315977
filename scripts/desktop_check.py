"""Run inside a real QGIS desktop by scripts/desktop_check.sh (``qgis --code``): click through the
plugin as a new user does and save screenshots and ``check.json`` in $QGIS_DESKTOP_CHECK_OUT.

Steps: the message bar's Install button -> the installer dialog really runs pip -> the packages
import without a restart -> the Find Mars analog sites dialog at its default size -> a search on
the shipped sample with the default cell size -> the result map -> the drawing tool with
simulated mouse clicks -> the dialog it opens (its imagery must be the user's raster).
The steps run from a timer, so QGIS's event loop (pip's QProcess, rendering) keeps running.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

from qgis.core import QgsApplication, QgsProject, QgsRasterLayer
from qgis.PyQt.QtCore import QPoint, Qt, QTimer
from qgis.PyQt.QtTest import QTest
from qgis.PyQt.QtWidgets import QApplication
from qgis.utils import iface, plugins

OUT = Path(os.environ.get("QGIS_DESKTOP_CHECK_OUT", "/tmp/desktop_check"))
ROOT = Path(os.environ["QGIS_DESKTOP_CHECK_ROOT"])  # run through exec(): no __file__
IMAGERY = ROOT / "resources" / "earth" / "landsat_bahamas_rgb_300m.tif"
REFERENCE = ROOT / "resources" / "mars" / "ganges_chasma_dunes_ctx_7m.tif"
PLUGIN = "siamese_analog_plugin"

steps: list[dict] = []
log_lines: list[str] = []
state: dict = {}


def record_log(message, tag, level) -> None:
    log_lines.append(f"[{tag}] {message}")


QgsApplication.messageLog().messageReceived.connect(record_log)


def save() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "check.json").write_text(json.dumps({"steps": steps, "state": state}, indent=1, default=str))
    (OUT / "qgis_message_log.txt").write_text("\n".join(log_lines))


def step(name: str, ok: bool, detail: str = "") -> None:
    steps.append({"name": name, "ok": bool(ok), "detail": detail, "t": round(time.time() - T0, 1)})
    save()


def shot(name: str) -> str:
    """The whole screen (main window and any dialog on it)."""
    screen = QApplication.primaryScreen()
    pixmap = screen.grabWindow(0)
    path = OUT / f"{name}.png"
    pixmap.save(str(path))
    return str(path)


def sleep(seconds: float):
    end = time.time() + seconds
    while time.time() < end:
        yield


def wait(condition, timeout_s: float):
    end = time.time() + timeout_s
    while not condition() and time.time() < end:
        yield
    return condition()


def scenario():
    window = iface.mainWindow()
    window.setGeometry(0, 0, 1440, 900)  # no window manager under Xvfb: maximising does nothing
    yield from sleep(4)
    plugin = plugins.get(PLUGIN)
    step("plugin loaded from the zip", plugin is not None, str(getattr(plugin, "__module__", "not loaded")))
    if plugin is None:
        return
    state["missing_at_start"] = list(plugin.missing)
    shot("01_start_message_bar")
    from siamese_analog_plugin.processing.base import missing_dependencies

    item = plugin.install_message
    step("message bar offers Install…", bool(plugin.missing) == (item is not None),
         f"missing: {plugin.missing}; message: {item.text() if item is not None else None}")
    if item is not None:
        item._install_button.click()
        yield from sleep(1)
        dialog = item._installer_dialog
        shot("02_installer_dialog")
        state["pip_command"] = " ".join(dialog.plan.command) if dialog.plan.requirements else ""
        t0 = time.time()
        dialog.install_button.click()
        yield from sleep(5)
        shot("03_installer_running")
        yield from wait(lambda: dialog.succeeded is not None, 1200)
        (OUT / "pip_log.txt").write_text(dialog.log.toPlainText())
        shot("04_installer_done")
        step("installer dialog ran pip into the plugin's folder", dialog.succeeded is True,
             f"{time.time() - t0:.0f} s into {dialog.target}; last lines: "
             + " | ".join(dialog.log.toPlainText().splitlines()[-3:]))
        dialog.close()
        missing = missing_dependencies()
        step("dependencies import without a restart", not missing, f"still missing: {missing}")
        if missing:
            return

    raster = QgsRasterLayer(str(IMAGERY), "Landsat Bahamas 300 m")
    QgsProject.instance().addMapLayer(raster)
    canvas = iface.mapCanvas()
    canvas.setExtent(raster.extent())
    canvas.refresh()
    yield from sleep(2)

    import processing

    dialog = processing.createAlgorithmDialog("siameseanalog:findanalogs",
                                              {"INPUT": raster.id(), "REFERENCE": [str(REFERENCE)]})
    dialog.show()
    yield from sleep(2)
    shot("05_find_dialog_default_size")
    state["dialog_size"] = [dialog.width(), dialog.height()]
    dialog.close()

    log_before = len(log_lines)
    t0 = time.time()
    try:
        result = processing.runAndLoadResults("siameseanalog:findanalogs", {
            "INPUT": raster.id(), "REFERENCE": [str(REFERENCE)], "OUTPUT_RASTER": "TEMPORARY_OUTPUT",
            "OUTPUT_CELLS": "TEMPORARY_OUTPUT", "OUTPUT_REPORT": str(OUT / "report.html")})
        state["search_results"] = {k: v for k, v in result.items() if not isinstance(v, QgsRasterLayer)}
        step("search on the sample with the default cell size", result.get("SCORED_COUNT", 0) > 0,
             f"{time.time() - t0:.0f} s; {result.get('CELL_COUNT')} cells, {result.get('SCORED_COUNT')} scored, "
             f"device {result.get('DEVICE_USED')}")
    except Exception:
        step("search on the sample with the default cell size", False, traceback.format_exc()[-800:])
        return
    run_log = log_lines[log_before:]
    ogr = [m for m in run_log if "Cannot open" in m and REFERENCE.name in m]
    step("no '[OGR] Cannot open <reference>' in the log", not ogr, "; ".join(ogr)[:300])
    order = [n.layer().name() for n in QgsProject.instance().layerTreeRoot().findLayers()]
    state["layer_order"] = order
    step("layer order: sites, cells, raster, imagery", order[-1] == raster.name() and len(order) == 4
         and "sites" in order[0].lower(), " > ".join(order))
    canvas.setExtent(raster.extent())
    canvas.refresh()
    yield from sleep(4)
    shot("06_result_map")

    # The drawing tool, with mouse clicks on the canvas.
    opened: dict = {}

    def opener(algorithm_id, parameters):
        opened.update(parameters)
        shown = processing.createAlgorithmDialog(algorithm_id, parameters)
        shown.show()
        opened["_dialog"] = shown
        return None

    gui = plugin.gui
    gui.open_dialog = opener
    iface.setActiveLayer([ly for ly in QgsProject.instance().mapLayers().values()
                          if ly.name().startswith("Dissimilarity")][0])  # as after a run: the result active
    toolbar_button = plugin.toolbar.widgetForAction(gui.draw_action)
    state["toolbar_tooltip"] = toolbar_button.toolTip()
    gui.draw_action.trigger()
    yield from sleep(1)
    viewport = canvas.viewport()
    w, h = viewport.width(), viewport.height()
    corners = [QPoint(int(w * x), int(h * y)) for x, y in ((0.25, 0.3), (0.55, 0.25), (0.6, 0.6), (0.3, 0.65))]
    for point in corners:
        QTest.mouseMove(viewport, point)
        yield from sleep(0.3)
        QTest.mouseClick(viewport, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, point)
        yield from sleep(0.3)
    QTest.mouseMove(viewport, QPoint(int(w * 0.35), int(h * 0.5)))
    yield from sleep(1)
    state["status_while_drawing"] = gui.last_status
    shot("07_drawing_tool")
    estimate = gui.tool.cell_size_m if gui.tool is not None else None
    QTest.mouseClick(viewport, Qt.MouseButton.RightButton, Qt.KeyboardModifier.NoModifier, corners[-1])
    yield from sleep(3)
    shot("08_dialog_from_the_tool")
    step("the tool's dialog searches the user's imagery, not a result", opened.get("INPUT") == raster.id(),
         f"INPUT={opened.get('INPUT')} (imagery {raster.id()}); REFERENCE={opened.get('REFERENCE')}")
    cells = state["search_results"].get("CELL_COUNT")
    step("the tool's estimate uses the run's default cell size", estimate is not None and "cells of" in
         state["status_while_drawing"], f"estimate {estimate} m; status: {state['status_while_drawing']}; "
         f"run: {cells} cells")
    if "_dialog" in opened:
        opened.pop("_dialog").close()


def drive(generator) -> None:
    """Advance the scenario a little every 100 ms; write the report and quit at the end."""
    try:
        next(generator)
        QTimer.singleShot(100, lambda: drive(generator))
        return
    except StopIteration:
        pass
    except Exception:
        step("scenario", False, traceback.format_exc()[-1500:])
    step("done", True, "")
    save()
    QgsProject.instance().setDirty(False)
    os._exit(0)


T0 = time.time()
QTimer.singleShot(500, lambda: drive(scenario()))
