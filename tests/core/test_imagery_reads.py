"""The reader's fast paths give what GDAL gives: validity computed from the pixels read, and
regions read into the reader's own buffers."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from siamese_analog_plugin.core.imagery import GreyReader

from .conftest import write_raster

UTM = "EPSG:32633"


def gdal_validity(path, bands, window):
    """Validity as GDAL's own masks say (every band valid)."""
    with rasterio.open(path) as ds:
        return ds.read_masks(bands, window=window).min(axis=0) > 0


@pytest.mark.parametrize("dtype, nodata, fast", [
    ("uint8", 0, True), ("int16", -32768, True), ("uint16", 7, True),
    ("int16", 5, True),  # a value that occurs here and there
    ("uint8", 0.5, False),  # not a whole number: GDAL's own masks are read
    ("float32", 0.0, False),
])
def test_validity_from_pixels_equals_gdal_masks(tmp_path, dtype, nodata, fast):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 12, (3, 60, 90)).astype(dtype)
    data[:, :20, :30] = 0  # a corner of zeros in every band
    data[1, 40:, 50:] = 7 if dtype == "uint16" else data[1, 40:, 50:]  # one band's nodata elsewhere
    path = write_raster(tmp_path / "r.tif", data, UTM, Affine(10, 0, 0, 0, -10, 600), nodata=nodata)
    with GreyReader(path) as reader:
        assert (reader._nodata is not None) == fast
        grey, ok = reader.read_region(10, 5, 70, 50, 70, 50)
        expected = gdal_validity(path, reader.bands, Window(10, 5, 70, 50))
    if expected.all():
        assert ok is None or ok.all()
    else:
        assert np.array_equal(ok, expected)
        # Invalid pixels hold the mean of the valid ones (no fixed grey edge along nodata).
        assert np.allclose(grey[~expected], grey[expected].mean(), atol=1e-5)


def test_resampled_reads_still_use_gdal_masks(tmp_path):
    data = np.full((40, 40), 100, np.uint8)
    data[:, :10] = 0
    path = write_raster(tmp_path / "r.tif", data, UTM, Affine(10, 0, 0, 0, -10, 400), nodata=0)
    with GreyReader(path) as reader:
        _, ok = reader.read_region(0, 0, 40, 40, 20, 20)  # halved: GDAL's nearest-neighbour mask
        with rasterio.open(path) as ds:
            expected = ds.read_masks(1, out_shape=(20, 20)) > 0
    assert np.array_equal(ok, expected) and ok[:, :5].sum() == 0


def test_reused_buffers_hold_the_same_values_and_are_reused(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(1, 255, (3, 100, 300)).astype(np.uint8)
    rgb[:, :, :40] = 0
    path = write_raster(tmp_path / "rgb.tif", rgb, UTM, Affine(10, 0, 0, 0, -10, 1000), nodata=0)
    with GreyReader(path) as reader:
        fresh = [tuple(a.copy() for a in reader.read_region(c, 0, 100, 100, 100, 100)) for c in (0, 100, 200)]
        reused = []
        for c in (0, 100, 200):
            grey, ok = reader.read_region(c, 0, 100, 100, 100, 100, reuse=True)
            reused.append((grey, ok))
            assert np.array_equal(grey, fresh[len(reused) - 1][0]) and np.array_equal(ok, fresh[len(reused) - 1][1])
        # Documented: a reused read overwrites the previous one's arrays.
        assert np.shares_memory(reused[0][0], reused[2][0]) and np.array_equal(reused[0][0], fresh[2][0])
        # The per-cell read of the same square gives the same patch.
        patch, valid = reader.read_window(0, 0, 100, 100, 100)
    assert np.array_equal(patch, fresh[0][0]) and valid == pytest.approx(0.6)
