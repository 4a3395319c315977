"""The shipped graphical model: QGIS's Buffer chained with ``findanalogs``."""

from __future__ import annotations

import math

from ..conftest import PROVIDER_ID, ROOT, SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import UTM18

MODEL_FILE = ROOT / "resources" / "models" / "find_analogs_example.model3"
SITES = [(160000.0, 2760000.0), (280000.0, 2660000.0)]  # two candidate sites over the sample
RADIUS = 30000.0
CELL = 10000.0


def point_layer(points, crs=UTM18):
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY, QgsVectorLayer

    layer = QgsVectorLayer(f"Point?crs={crs}", "sites", "memory")
    feats = []
    for x, y in points:
        f = QgsFeature()
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
        feats.append(f)
    layer.dataProvider().addFeatures(feats)
    return layer


def test_example_model_runs_buffer_then_search(analog_provider, tiny_model_path, tmp_path):
    import processing
    from qgis.core import QgsProcessingModelAlgorithm, QgsVectorLayer

    model = QgsProcessingModelAlgorithm()
    assert model.fromFile(str(MODEL_FILE))
    algs = [model.childAlgorithm(c).algorithmId() for c in model.childAlgorithms()]
    assert sorted(algs) == ["native:buffer", f"{PROVIDER_ID}:findanalogs"]
    res = processing.run(model, {
        "sites": point_layer(SITES), "radius": RADIUS, "imagery": str(SAMPLE_RASTER),
        "reference": [str(SAMPLE_REFERENCE)], "cell_size": CELL, "model": tiny_model_path,
        "findanalogs:Dissimilarity": str(tmp_path / "d.tif"), "findanalogs:Analog cells": str(tmp_path / "c.gpkg"),
    })
    assert res["findanalogs:Dissimilarity"] == str(tmp_path / "d.tif")
    cells = QgsVectorLayer(f"{tmp_path / 'c.gpkg'}|layername=cells", "cells", "ogr")
    assert cells.isValid() and cells.crs().authid() == "EPSG:32618"
    # Cells only around the two sites: each cell centre within the radius (+ half a cell diagonal).
    per_site = [0, 0]
    for f in cells.getFeatures():
        c = f.geometry().centroid().asPoint()
        d = [math.hypot(c.x() - x, c.y() - y) for x, y in SITES]
        assert min(d) <= RADIUS + CELL * math.sqrt(2) / 2
        per_site[d.index(min(d))] += 1
    # A 30 km disc holds ~28 cells of 10 km; both sites are searched.
    assert all(15 <= n <= 40 for n in per_site), per_site


def test_example_model_is_in_the_toolbox(qgis_iface, qgis_processing):
    """Loaded through the plugin, the example model is listed with its outputs."""
    from qgis.core import QgsApplication

    import siamese_analog_plugin

    plugin = siamese_analog_plugin.classFactory(qgis_iface)
    plugin.initGui()
    try:
        models = [a for a in plugin.provider.algorithms() if a.name().endswith("(example model)")]
        assert len(models) == 1
        alg = QgsApplication.processingRegistry().createAlgorithmById(models[0].id())
        assert {p.name() for p in alg.destinationParameterDefinitions()} == {
            "findanalogs:Dissimilarity", "findanalogs:Analog cells"}
        assert "Buffer" in alg.shortHelpString()  # the help text stored in the model file
    finally:
        plugin.unload()
