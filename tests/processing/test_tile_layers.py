"""INPUT as an XYZ tile layer (the basemaps people use in place of Google Earth), read through QGIS."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest

from ..conftest import SAMPLE_REFERENCE
from .conftest import AREA_BOX, UTM18, box_wkt, leftovers, make_xyz_tiles, polygon_layer, raster_info

ALG = "siameseanalog:findanalogs"
ZOOM = 9  # ~305 m a pixel in Web Mercator, like the 300 m sample


@pytest.fixture
def xyz_layer(tmp_path):
    """A file-based XYZ layer (``wms`` provider, ``type=xyz``) whose PNG tiles are cut from the sample."""
    from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsProject, QgsRasterLayer, QgsRectangle

    tiles = tmp_path / "tiles"
    to_merc = QgsCoordinateTransform(QgsCoordinateReferenceSystem(UTM18), QgsCoordinateReferenceSystem("EPSG:3857"),
                                     QgsProject.instance())
    rect = to_merc.transformBoundingBox(QgsRectangle(*AREA_BOX))
    rect.grow(30000)
    assert make_xyz_tiles(tiles, (rect.xMinimum(), rect.yMinimum(), rect.xMaximum(), rect.yMaximum()), ZOOM) >= 4
    url = tiles.as_uri() + "/{z}/{x}/{y}.png"
    layer = QgsRasterLayer(f"type=xyz&url={url}&zmin=0&zmax={ZOOM}", "local xyz", "wms")
    assert layer.isValid(), layer.error().summary()
    assert layer.providerType() == "wms"
    return layer


def test_xyz_layer_is_rendered_through_qgis(run_alg, tiny_model_path, xyz_layer, tmp_path, feedback, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(work))  # where the rendered imagery goes, to check it is removed
    area = polygon_layer([box_wkt(*AREA_BOX)])
    res = run_alg(ALG, {"INPUT": xyz_layer, "AREA": area, "REFERENCE": [str(SAMPLE_REFERENCE)],
                        "CELL_SIZE": 20000, "MODEL": tiny_model_path, "DEVICE": "cpu",
                        "OUTPUT_RASTER": str(tmp_path / "d.tif"), "OUTPUT_CELLS": str(tmp_path / "c.gpkg")})
    assert "Rendering 'local xyz' (wms provider) through QGIS" in feedback.log
    assert "200 m per pixel" in feedback.log  # 20 km cells / 100 px encoder input
    crs, extent, width, height, data = raster_info(res["OUTPUT_RASTER"])
    assert crs == "EPSG:3857"  # the tile layer's CRS
    # The UTM square is ~100 km on the ground but ~110 km in Web Mercator units at 25 N.
    assert 5 <= width <= 6 and 5 <= height <= 6
    assert res["CELL_COUNT"] >= 25
    # Every cell over the tiles was read (transparent = nodata would leave cells unscored).
    assert res["SCORED_COUNT"] == res["CELL_COUNT"]
    assert float(np.nanstd(data)) > 0  # real imagery, not a blank render: cells differ
    assert leftovers(work) == []  # the rendered GeoTIFF is gone


def test_whole_world_tile_layer_needs_an_area(run_alg, tiny_model_path, xyz_layer, tmp_path):
    from qgis.core import QgsProcessingException

    with pytest.raises(QgsProcessingException, match="Choose a smaller area"):
        run_alg(ALG, {"INPUT": xyz_layer, "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": 20000,
                      "MODEL": tiny_model_path, "OUTPUT_RASTER": str(tmp_path / "d.tif"),
                      "OUTPUT_CELLS": str(tmp_path / "c.gpkg")})
    assert not (tmp_path / "d.tif").exists()
