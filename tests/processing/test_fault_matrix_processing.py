"""Issue 16 through QGIS: ``siameseanalog:findanalogs`` refuses an output that is an input, and a
raster that fails while it is read, with a QgsProcessingException of one line; inputs intact."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from ..conftest import SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import AREA_BOX, FAST_CELL_M, box_wkt

ALG = "siameseanalog:findanalogs"


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture()
def inputs(tmp_path):
    """Copies of the sample raster and reference, an area GeoPackage and a truncated tiled GeoTIFF."""
    import rasterio
    from osgeo import ogr, osr

    shutil.copy(SAMPLE_RASTER, tmp_path / "earth.tif")
    shutil.copy(SAMPLE_REFERENCE, tmp_path / "mars.tif")
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32618)
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp_path / "area.gpkg"))
    lyr = ds.CreateLayer("area", srs, ogr.wkbPolygon)
    lyr.CreateField(ogr.FieldDefn("landform", ogr.OFTString))
    f = ogr.Feature(lyr.GetLayerDefn())
    f.SetField("landform", "banks")
    f.SetGeometry(ogr.CreateGeometryFromWkt(box_wkt(*AREA_BOX)))
    lyr.CreateFeature(f)
    ds = None
    with rasterio.open(SAMPLE_RASTER) as src:
        profile = {**src.profile, "tiled": True, "blockxsize": 64, "blockysize": 64, "compress": "deflate"}
        data = src.read()
    with rasterio.open(tmp_path / "tiled.tif", "w", **profile) as dst:
        dst.write(data)
    raw = (tmp_path / "tiled.tif").read_bytes()
    (tmp_path / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "tiled.tif").unlink()
    return tmp_path


def params(model: str, folder: Path, **extra) -> dict:
    p = {"INPUT": str(folder / "earth.tif"), "REFERENCE": [str(folder / "mars.tif")], "CELL_SIZE": FAST_CELL_M,
         "MODEL": model, "DEVICE": "cpu", "OUTPUT_RASTER": str(folder / "d.tif"),
         "OUTPUT_CELLS": str(folder / "c.gpkg")}
    p.update({k: (str(folder / v) if k != "REFERENCE" else [str(folder / v)]) for k, v in extra.items()})
    return p


@pytest.mark.parametrize("extra, words", [
    ({"OUTPUT_RASTER": "earth.tif"}, "is the input Earth imagery"),
    ({"OUTPUT_RASTER": "mars.tif"}, "is the input reference"),
    ({"AREA": "area.gpkg", "OUTPUT_CELLS": "area.gpkg"}, "is the input area"),
    ({"OUTPUT_RASTER": "./sub/../earth.tif"}, "is the input Earth imagery"),
])
def test_an_output_that_is_an_input_is_refused(run_alg, tiny_model_path, inputs, extra, words):
    from qgis.core import QgsProcessingException

    (inputs / "sub").mkdir()
    before = digest(inputs)
    p = params(tiny_model_path, inputs, **extra)
    p.update({k: str(inputs) + "/" + v for k, v in extra.items() if v.startswith("./")})
    with pytest.raises(QgsProcessingException) as err:
        run_alg(ALG, p)
    message = str(err.value)
    assert words in message and "\n" not in message and "Traceback" not in message
    assert digest(inputs) == before


@pytest.mark.parametrize("extra, words", [
    ({"INPUT": "truncated.tif"}, "The raster"),
    ({"REFERENCE": "truncated.tif"}, "The reference image"),
])
def test_a_raster_that_fails_while_read_is_one_line(run_alg, tiny_model_path, inputs, extra, words):
    from qgis.core import QgsProcessingException

    before = digest(inputs)
    with pytest.raises(QgsProcessingException) as err:
        run_alg(ALG, params(tiny_model_path, inputs, **extra))
    message = str(err.value)
    assert words in message and "truncated.tif' cannot be read" in message
    assert "\n" not in message and "Traceback" not in message
    assert digest(inputs) == before


@pytest.mark.parametrize("extra, words", [
    ({"OUTPUT_CELLS": "area.gpkg"}, "is the input examples"),
    ({"OUTPUT_RASTER": "earth.tif"}, "is the input imagery"),
])
def test_landform_map_outputs_that_are_inputs_are_refused(run_alg, tiny_model_path, inputs, extra, words):
    from qgis.core import QgsProcessingException

    before = digest(inputs)
    p = {"INPUT": str(inputs / "earth.tif"), "EXAMPLES": str(inputs / "area.gpkg"), "CLASS_FIELD": "landform",
         "CELL_SIZE": FAST_CELL_M, "MODEL": tiny_model_path, "DEVICE": "cpu",
         "OUTPUT_RASTER": str(inputs / "classes.tif"), "OUTPUT_CELLS": str(inputs / "cells.gpkg")}
    p.update({k: str(inputs / v) for k, v in extra.items()})
    with pytest.raises(QgsProcessingException) as err:
        run_alg("siameseanalog:fewshotlandforms", p)
    message = str(err.value)
    assert words in message and "\n" not in message
    assert digest(inputs) == before
