"""Loaded results are styled so analog sites stand out: low dissimilarity hot, "more Mars-like" legend."""

from __future__ import annotations

import pytest

from ..conftest import SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import FAST_CELL_M


def _is_red(color) -> bool:
    return color.red() > 150 and color.blue() < 100


def _is_blue(color) -> bool:
    return color.blue() > 150 and color.red() < 100


@pytest.fixture
def loaded_results(analog_provider, tiny_model_path, qgis_new_project):
    """Run the search as the toolbox does (results loaded into the project) and return the layers by name."""
    import processing

    res = processing.runAndLoadResults("siameseanalog:findanalogs", {
        "INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": FAST_CELL_M,
        "MODEL": tiny_model_path, "DEVICE": "cpu", "OUTPUT_RASTER": "TEMPORARY_OUTPUT",
        "OUTPUT_CELLS": "TEMPORARY_OUTPUT", "TOP_K": 5})
    layers = {layer.name(): layer for layer in qgis_new_project.mapLayers().values()}
    yield res, layers
    qgis_new_project.removeAllMapLayers()


def test_results_load_styled(loaded_results):
    from qgis.core import QgsGraduatedSymbolRenderer, QgsSingleBandPseudoColorRenderer

    from siamese_analog_plugin.styles import CELLS_LAYER_NAME, RASTER_LAYER_NAME, SITES_LAYER_NAME

    res, layers = loaded_results
    assert set(layers) == {RASTER_LAYER_NAME, CELLS_LAYER_NAME, SITES_LAYER_NAME}

    raster = layers[RASTER_LAYER_NAME]
    renderer = raster.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    ramp = renderer.shader().rasterShaderFunction()
    items = ramp.colorRampItemList()
    assert _is_red(items[0].color) and _is_blue(items[-1].color)  # low = red (hot), high = blue
    assert items[0].value < items[-1].value
    assert "more Mars-like" in ramp.legendSettings().minimumLabel()
    assert "more Mars-like" in raster.name()

    cells = layers[CELLS_LAYER_NAME]
    graduated = cells.renderer()
    assert isinstance(graduated, QgsGraduatedSymbolRenderer)
    assert graduated.classAttribute() == "dissimilarity"
    ranges = graduated.ranges()
    assert len(ranges) == 5
    assert _is_red(ranges[0].symbol().color()) and _is_blue(ranges[-1].symbol().color())
    assert "more Mars-like" in ranges[0].label()
    # The lowest class holds the best cell.
    assert ranges[0].lowerValue() <= res["BEST_DISSIMILARITY"] <= ranges[0].upperValue()

    sites = layers[SITES_LAYER_NAME]
    assert sites.featureCount() == 5
    assert sites.labelsEnabled() and sites.labeling().settings().fieldName == "rank"


def test_style_functions_on_a_layer(loaded_results):
    """The styling functions are reusable (the map tool calls them): restyling keeps the same result."""
    from qgis.core import QgsRasterLayer

    from siamese_analog_plugin.styles import style_dissimilarity_raster

    res, _ = loaded_results
    layer = QgsRasterLayer(res["OUTPUT_RASTER"], "plain")
    style_dissimilarity_raster(layer, name=None)
    assert layer.name() == "plain"
    legend = [item[0] for item in layer.renderer().legendSymbologyItems()]
    assert layer.renderer().classificationMin() < layer.renderer().classificationMax()
    assert legend  # a legend QGIS can draw
