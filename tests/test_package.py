"""The installable zip: build it, install it into a fresh QGIS profile, load it, run it, unload it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "siamese_analog_plugin"


def _load_package_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("package_script", ROOT / "scripts" / "package.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory) -> Path:
    return _load_package_script().build(tmp_path_factory.mktemp("dist"))


def test_zip_layout(plugin_zip):
    with zipfile.ZipFile(plugin_zip) as zf:
        names = set(zf.namelist())
        assert {n.split("/")[0] for n in names} == {PACKAGE}  # one plugin folder
        for required in ("__init__.py", "metadata.txt", "plugin.py", "processing/provider.py",
                         "resources/icon.svg", "resources/models/find_analogs_example.model3",
                         "resources/earth/landsat_bahamas_rgb_300m.tif"):
            assert f"{PACKAGE}/{required}" in names, required
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.endswith(".state.pt")]
        # Whatever models/ holds at build time travels inside the plugin folder.
        shipped = {p.name for p in (ROOT / "models").glob("*") if p.is_file() and not p.name.endswith(".state.pt")
                   and not p.name.startswith(".")} if (ROOT / "models").is_dir() else set()
        assert {f"{PACKAGE}/models/{n}" for n in shipped} <= names
        assert not any(n.startswith(f"{PACKAGE}/models/folds/") for n in names)  # evaluation-only models
        metadata = zf.read(f"{PACKAGE}/metadata.txt").decode()
    assert "hasProcessingProvider=yes" in metadata
    assert "qgisMinimumVersion=3.22" in metadata


def test_zip_is_reproducible(plugin_zip, tmp_path):
    again = _load_package_script().build(tmp_path)
    assert again.read_bytes() == plugin_zip.read_bytes()


INSTALLED_RUN = textwrap.dedent(r"""
    import json, os, sys
    plugins_dir, model, out_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    from qgis.core import QgsApplication
    app = QgsApplication([], True, os.path.dirname(os.path.dirname(plugins_dir)))
    app.initQgis()
    sys.path.append(os.path.join(QgsApplication.pkgDataPath(), "python", "plugins"))
    from processing.core.Processing import Processing
    Processing.initialize()
    import processing
    import qgis.utils
    from qgis.gui import QgsMapCanvas, QgsMessageBar
    from qgis.PyQt.QtWidgets import QMainWindow

    class Iface:  # the few QgisInterface calls a plugin makes, over a real window, canvas and message bar
        def __init__(self):
            self.window = QMainWindow()
            self.canvas = QgsMapCanvas(self.window)
            self.bar = QgsMessageBar(self.window)
        def mainWindow(self): return self.window
        def mapCanvas(self): return self.canvas
        def messageBar(self): return self.bar
        def addToolBar(self, name): return self.window.addToolBar(name)
        def activeLayer(self): return None
        def __getattr__(self, name): return lambda *args, **kwargs: None  # menus, icons: nothing to check here

    qgis.utils.iface = Iface()
    # What QGIS does for a plugin installed in the profile: find it, read metadata.txt, start it.
    qgis.utils.plugin_paths = [plugins_dir]
    sys.path.insert(0, plugins_dir)
    qgis.utils.updateAvailablePlugins()
    out = {"found": "siamese_analog_plugin" in qgis.utils.available_plugins,
           "name": qgis.utils.pluginMetadata("siamese_analog_plugin", "name")}
    out["loaded"] = qgis.utils.loadPlugin("siamese_analog_plugin")
    out["started"] = qgis.utils.startPlugin("siamese_analog_plugin")
    import siamese_analog_plugin
    out["module"] = siamese_analog_plugin.__file__
    registry = QgsApplication.processingRegistry()
    out["algorithms"] = sorted(a.id() for a in registry.providerById("siameseanalog").algorithms())
    params = {"INPUT": os.path.join(os.path.dirname(siamese_analog_plugin.__file__), "resources", "earth",
                                    "landsat_bahamas_rgb_300m.tif"),
              "REFERENCE": [os.path.join(os.path.dirname(siamese_analog_plugin.__file__), "resources", "mars",
                                         "ganges_chasma_dunes_ctx_7m.tif")],
              "CELL_SIZE": 20000, "DEVICE": "cpu", "MODEL": model,
              "OUTPUT_RASTER": os.path.join(out_dir, "d.tif"), "OUTPUT_CELLS": os.path.join(out_dir, "c.gpkg")}
    res = processing.run("siameseanalog:findanalogs", params)
    out["cells"] = res["CELL_COUNT"]
    out["unloaded"] = qgis.utils.unloadPlugin("siamese_analog_plugin")
    out["provider_after_unload"] = registry.providerById("siameseanalog") is not None
    print("RESULT " + json.dumps(out))
    app.exitQgis()
""")


def test_install_zip_into_fresh_profile_load_run_unload(plugin_zip, tiny_model_path, tmp_path):
    profile = tmp_path / "profiles" / "fresh"
    plugins_dir = profile / "python" / "plugins"
    plugins_dir.mkdir(parents=True)
    with zipfile.ZipFile(plugin_zip) as zf:
        zf.extractall(plugins_dir)
        has_default_model = f"{PACKAGE}/models/siamese_compact.pt" in zf.namelist()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = tmp_path / "run_installed.py"
    script.write_text(INSTALLED_RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QGIS_CUSTOM_CONFIG_PATH")}
    env["QT_QPA_PLATFORM"] = "offscreen"
    model = "" if has_default_model else tiny_model_path  # the shipped model when the zip holds it
    proc = subprocess.run([sys.executable, str(script), str(plugins_dir), model, str(out_dir)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["found"] and out["name"] == "Siamese Analog Finder"
    assert out["loaded"] and out["started"]
    assert Path(out["module"]).resolve().is_relative_to(plugins_dir.resolve())  # the installed copy ran
    assert {"siameseanalog:findanalogs", "siameseanalog:trainencoder", "siameseanalog:embedimages"} <= set(
        out["algorithms"])
    assert out["cells"] == 110
    assert (out_dir / "d.tif").exists() and (out_dir / "c.gpkg").exists()
    assert out["unloaded"] and not out["provider_after_unload"]
