"""The plugin object QGIS loads: provider, toolbar, menu, and what happens without torch."""

from __future__ import annotations

import sys

import pytest

from ..conftest import PROVIDER_ID, SAMPLE_RASTER, SAMPLE_REFERENCE

ALGORITHMS = {"findanalogs", "trainencoder", "embedimages"}


@pytest.fixture
def registry(qgis_processing):
    from qgis.core import QgsApplication

    reg = QgsApplication.processingRegistry()
    assert reg.providerById(PROVIDER_ID) is None, "a previous test left the provider registered"
    return reg


def test_load_and_unload(qgis_iface, registry):
    import siamese_analog_plugin
    from siamese_analog_plugin.plugin import MENU

    plugin = siamese_analog_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        provider = registry.providerById(PROVIDER_ID)
        assert provider is not None
        ids = {alg.name() for alg in provider.algorithms()}
        assert ALGORITHMS <= ids
        assert plugin.toolbar is not None and plugin.toolbar.windowTitle() == "Siamese Analog Finder"
        assert MENU == "&Siamese Analog Finder" == plugin.MENU
        assert plugin.missing == []
        # The map-tool face is created with (iface, plugin) when its module exists.
        try:
            import siamese_analog_plugin.gui.actions  # noqa: F401
        except ModuleNotFoundError:
            assert plugin.gui is None
        else:
            assert plugin.gui is not None
    finally:
        plugin.unload()
    assert registry.providerById(PROVIDER_ID) is None
    assert plugin.toolbar is None and plugin.gui is None and plugin.provider is None


def test_loads_without_torch_and_says_what_to_install(qgis_iface, registry, monkeypatch, tmp_path):
    """With torch and ONNX Runtime missing the plugin still loads, the message bar names the install
    command and the algorithms refuse to run with that same message."""
    import processing
    from qgis.core import QgsProcessingException

    import siamese_analog_plugin

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails as if not installed
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    qgis_iface.messageBar().clear_messages()
    plugin = siamese_analog_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert plugin.missing == ["torch"]
        # The message bar offers the installer for ONNX Runtime (a button), the log has the command.
        item = plugin.install_message
        assert item is not None and "onnxruntime" in item.text()
        assert item._install_button.text() == "Install…"
        item._install_button.click()
        assert item._installer_dialog.names == ["onnxruntime"]
        item._installer_dialog.close()
        alg = registry.algorithmById(f"{PROVIDER_ID}:findanalogs")
        assert alg is not None
        ok, message = alg.canExecute()
        assert not ok and "pip install --target" in message and '"onnxruntime>=' in message
        assert "numpy" not in message
        with pytest.raises(QgsProcessingException, match="pip install --target"):
            processing.run(alg.id(), {"INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)],
                                      "CELL_SIZE": 20000, "OUTPUT_RASTER": str(tmp_path / "d.tif"),
                                      "OUTPUT_CELLS": str(tmp_path / "c.gpkg")})
        assert list(tmp_path.iterdir()) == []
    finally:
        plugin.unload()
    assert registry.providerById(PROVIDER_ID) is None


def test_searches_without_torch_when_onnxruntime_is_there(qgis_iface, registry, monkeypatch, tmp_path):
    """Without torch (a stock QGIS plus onnxruntime) nothing is reported missing, the search runs
    on ONNX Runtime, and only training asks for torch."""
    import processing

    import siamese_analog_plugin

    monkeypatch.setitem(sys.modules, "torch", None)
    plugin = siamese_analog_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        assert plugin.missing == []
        ok, _ = registry.algorithmById(f"{PROVIDER_ID}:findanalogs").canExecute()
        assert ok
        ok, message = registry.algorithmById(f"{PROVIDER_ID}:trainencoder").canExecute()
        assert not ok and "pip install --target" in message and '"torch>=' in message
        result = processing.run(f"{PROVIDER_ID}:findanalogs", {
            "INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": 20000,
            "OUTPUT_RASTER": str(tmp_path / "d.tif"), "OUTPUT_CELLS": str(tmp_path / "c.gpkg")})
        assert result["CELL_COUNT"] > 0 and result["SCORED_COUNT"] > 0
        assert (tmp_path / "d.tif").exists() and (tmp_path / "c.gpkg").exists()
    finally:
        plugin.unload()


def test_second_copy_does_not_break_the_first(qgis_iface, registry):
    import siamese_analog_plugin

    first = siamese_analog_plugin.classFactory(qgis_iface)
    first.initGui()
    second = siamese_analog_plugin.classFactory(qgis_iface)
    try:
        second.initProcessing()
        assert second.provider is None
        assert registry.providerById(PROVIDER_ID) is first.provider
    finally:
        second.unload()
        first.unload()
    assert registry.providerById(PROVIDER_ID) is None
