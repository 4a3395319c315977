"""Helpers for the Processing tests: run an algorithm with a recording feedback, build layers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from ..conftest import SAMPLE_RASTER

# A 100 km square inside the Bahamas sample (UTM 18N): 5 x 5 cells of 20 km.
UTM18 = "EPSG:32618"
AREA_BOX = (180000.0, 2680000.0, 280000.0, 2780000.0)
FAST_CELL_M = 20000.0  # 11 x 10 = 110 cells over the whole sample


class RecordingFeedback:
    """Builds a QgsProcessingFeedback that records the log and can cancel after N progress calls."""

    @staticmethod
    def make(cancel_after_progress: int | None = None):
        from qgis.core import QgsProcessingFeedback

        class _Feedback(QgsProcessingFeedback):
            def __init__(self) -> None:
                super().__init__()
                self.infos: list[str] = []
                self.progress_values: list[float] = []

            def pushInfo(self, info: str) -> None:
                self.infos.append(info)
                super().pushInfo(info)

            def pushWarning(self, warning: str) -> None:
                self.infos.append(warning)
                super().pushWarning(warning)

            def setProgressText(self, text: str) -> None:
                self.infos.append(text)
                super().setProgressText(text)

            def setProgress(self, value: float) -> None:
                self.progress_values.append(value)
                super().setProgress(value)
                if cancel_after_progress is not None and len(self.progress_values) >= cancel_after_progress:
                    self.cancel()

            @property
            def log(self) -> str:
                return "\n".join(self.infos)

        return _Feedback()


@pytest.fixture
def feedback():
    return RecordingFeedback.make()


@pytest.fixture
def run_alg(analog_provider, feedback):
    """``run_alg(alg_id, params, feedback=None, context=None)`` -> results (``processing.run``)."""
    import processing

    def _run(alg_id: str, params: dict, fb=None, context=None):
        return processing.run(alg_id, params, feedback=fb or feedback, context=context)

    return _run


def polygon_layer(polygons_wkt: list[str], crs: str = UTM18, name: str = "area"):
    """A memory polygon layer with one feature per WKT (and an ``id`` field)."""
    from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

    layer = QgsVectorLayer(f"Polygon?crs={crs}&field=id:integer", name, "memory")
    feats = []
    for i, wkt in enumerate(polygons_wkt, start=1):
        f = QgsFeature(layer.fields())
        f.setAttribute("id", i)
        f.setGeometry(QgsGeometry.fromWkt(wkt))
        feats.append(f)
    assert layer.dataProvider().addFeatures(feats)[0]
    layer.updateExtents()
    return layer


def box_wkt(minx: float, miny: float, maxx: float, maxy: float) -> str:
    return f"POLYGON(({minx} {miny},{maxx} {miny},{maxx} {maxy},{minx} {maxy},{minx} {miny}))"


def raster_info(path: str):
    """(crs_authid, extent QgsRectangle, width, height, values ndarray with NaN for nodata) of a GeoTIFF."""
    import numpy as np
    import rasterio
    from qgis.core import QgsRasterLayer

    layer = QgsRasterLayer(path, "out")
    assert layer.isValid(), path
    with rasterio.open(path) as ds:
        data = ds.read(1, masked=True).astype("float64").filled(np.nan)
    return layer.crs().authid(), layer.extent(), layer.width(), layer.height(), data


def leftovers(folder: Path) -> list[str]:
    """Files left in a folder (partial outputs included)."""
    return sorted(p.name for p in Path(folder).iterdir())


# -- a file-based XYZ tile set made from the sample raster ---------------------------------------
WEB_MERCATOR_HALF = 20037508.342789244


def _tile_bounds(x: int, y: int, z: int) -> tuple[float, float, float, float]:
    size = 2 * WEB_MERCATOR_HALF / 2 ** z
    minx = -WEB_MERCATOR_HALF + x * size
    maxy = WEB_MERCATOR_HALF - y * size
    return minx, maxy - size, minx + size, maxy


def make_xyz_tiles(folder: Path, bounds_3857: tuple[float, float, float, float], zoom: int) -> int:
    """Warp the sample raster into 256 px PNG tiles ``folder/{z}/{x}/{y}.png`` covering ``bounds_3857``."""
    from osgeo import gdal

    gdal.UseExceptions()
    size = 2 * WEB_MERCATOR_HALF / 2 ** zoom
    x0 = int(math.floor((bounds_3857[0] + WEB_MERCATOR_HALF) / size))
    x1 = int(math.floor((bounds_3857[2] + WEB_MERCATOR_HALF) / size))
    y0 = int(math.floor((WEB_MERCATOR_HALF - bounds_3857[3]) / size))
    y1 = int(math.floor((WEB_MERCATOR_HALF - bounds_3857[1]) / size))
    count = 0
    for x in range(x0, x1 + 1):
        for y in range(y0, y1 + 1):
            out = folder / str(zoom) / str(x) / f"{y}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            mem = gdal.Warp("", str(SAMPLE_RASTER), format="MEM", dstSRS="EPSG:3857",
                            outputBounds=_tile_bounds(x, y, zoom), width=256, height=256, dstAlpha=True,
                            resampleAlg="bilinear")
            gdal.Translate(str(out), mem, format="PNG")
            count += 1
    return count
