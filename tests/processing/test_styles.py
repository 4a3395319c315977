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
    from qgis.core import QgsRasterLayer

    imagery = QgsRasterLayer(str(SAMPLE_RASTER), "imagery")
    qgis_new_project.addMapLayer(imagery)
    res = processing.runAndLoadResults("siameseanalog:findanalogs", {
        "INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": FAST_CELL_M,
        "MODEL": tiny_model_path, "DEVICE": "cpu", "OUTPUT_RASTER": "TEMPORARY_OUTPUT",
        "OUTPUT_CELLS": "TEMPORARY_OUTPUT", "TOP_K": 5})
    layers = {layer.name(): layer for layer in qgis_new_project.mapLayers().values()}
    yield res, layers
    qgis_new_project.removeAllMapLayers()


def test_results_load_styled(loaded_results, qgis_new_project):
    from qgis.core import QgsRuleBasedRenderer, QgsSingleBandPseudoColorRenderer

    from siamese_analog_plugin.styles import CELLS_LAYER_NAME, RASTER_LAYER_NAME, SITES_LAYER_NAME, is_result_layer

    res, layers = loaded_results
    assert set(layers) == {RASTER_LAYER_NAME, CELLS_LAYER_NAME, SITES_LAYER_NAME, "imagery"}

    raster = layers[RASTER_LAYER_NAME]
    renderer = raster.renderer()
    assert isinstance(renderer, QgsSingleBandPseudoColorRenderer)
    ramp = renderer.shader().rasterShaderFunction()
    items = ramp.colorRampItemList()
    assert _is_red(items[0].color) and _is_blue(items[-1].color)  # low = red (hot), high = blue
    assert items[0].value < items[-1].value
    # Continuous and see-through where less Mars-like: the imagery shows under most of the map.
    assert ramp.colorRampType() == ramp.Interpolated
    alphas = [item.color.alpha() for item in items]
    assert alphas == sorted(alphas, reverse=True) and alphas[0] > 200 and alphas[-1] < 100
    assert "more Mars-like" in ramp.legendSettings().minimumLabel()
    assert "more Mars-like" in raster.name()

    # Cells: outlines only (the raster shows the values); the best cells stand out.
    cells = layers[CELLS_LAYER_NAME]
    rules = cells.renderer()
    assert isinstance(rules, QgsRuleBasedRenderer)
    best_rule, rest_rule = rules.rootRule().children()
    assert "rank" in best_rule.filterExpression() and best_rule.symbol().symbolLayer(0).brushStyle() == 0
    assert _is_red(best_rule.symbol().symbolLayer(0).strokeColor())
    assert rest_rule.symbol().symbolLayer(0).brushStyle() == 0  # Qt.NoBrush: no fill hides the imagery

    sites = layers[SITES_LAYER_NAME]
    assert sites.featureCount() == 5
    labels = sites.labeling().settings()
    assert sites.labelsEnabled() and labels.isExpression and "rank" in labels.fieldName
    assert not labels.displayAll  # labels never overlap ("1" and "9" read as "19")

    # Fixed order, top to bottom: sites, cells, raster, then the user's imagery; reordering
    # keeps every layer in the project (QGIS drops a layer that leaves the tree, even briefly).
    from qgis.PyQt.QtCore import QCoreApplication

    for _ in range(5):
        QCoreApplication.processEvents()
    assert len(qgis_new_project.mapLayers()) == 4
    order = [node.layer().name() for node in qgis_new_project.layerTreeRoot().findLayers()]
    assert order == [SITES_LAYER_NAME, CELLS_LAYER_NAME, RASTER_LAYER_NAME, "imagery"]
    assert all(is_result_layer(layers[n]) for n in order[:3]) and not is_result_layer(layers["imagery"])


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


def test_arranging_keeps_every_layer_in_the_project(qgis_new_project):
    """Results loaded in any order end up sites > cells > raster > imagery, and none is lost:
    QGIS removes a layer from the project when it leaves the layer tree, even for a moment."""
    from qgis.core import QgsRasterLayer, QgsVectorLayer
    from qgis.PyQt.QtCore import QCoreApplication

    from siamese_analog_plugin.styles import arrange_result_layers, mark_result_layer

    imagery = QgsRasterLayer(str(SAMPLE_RASTER), "imagery")
    qgis_new_project.addMapLayer(imagery)
    layers = {}
    for kind in ("sites", "cells", "raster"):  # each added on top: raster ends up first
        layer = QgsVectorLayer("Point?crs=EPSG:32618", kind, "memory") if kind != "raster" \
            else QgsRasterLayer(str(SAMPLE_RASTER), kind)
        mark_result_layer(layer, kind, "run1")
        qgis_new_project.addMapLayer(layer)
        layers[kind] = layer
    try:
        before = [n.layer().name() for n in qgis_new_project.layerTreeRoot().findLayers()]
        assert before == ["raster", "cells", "sites", "imagery"]
        arrange_result_layers(qgis_new_project, "run1")
        for _ in range(5):
            QCoreApplication.processEvents()
        assert len(qgis_new_project.mapLayers()) == 4
        after = [n.layer().name() for n in qgis_new_project.layerTreeRoot().findLayers()]
        assert after == ["sites", "cells", "raster", "imagery"]
    finally:
        qgis_new_project.removeAllMapLayers()
