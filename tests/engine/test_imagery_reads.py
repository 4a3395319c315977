"""The reader's fast paths give what GDAL gives: validity computed from the pixels read, and
rows of cells read straight into the caller's buffer."""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from siamese_analog_plugin.engine.imagery import GreyReader

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
        _, ok = reader._read_pixels(Window(10, 5, 70, 50), (50, 70))
        expected = gdal_validity(path, reader.bands, Window(10, 5, 70, 50))
    if expected.all():
        assert ok is None or ok.all()
    else:
        assert np.array_equal(ok, expected)


def test_resampled_reads_still_use_gdal_masks(tmp_path):
    data = np.full((40, 40), 100, np.uint8)
    data[:, :10] = 0
    path = write_raster(tmp_path / "r.tif", data, UTM, Affine(10, 0, 0, 0, -10, 400), nodata=0)
    with GreyReader(path) as reader:
        _, ok = reader._read_pixels(Window(0, 0, 40, 40), (20, 20))  # halved: GDAL's nearest-neighbour mask
        with rasterio.open(path) as ds:
            expected = ds.read_masks(1, out_shape=(20, 20)) > 0
    assert np.array_equal(ok, expected) and ok[:, :5].sum() == 0


@pytest.mark.parametrize("bands, nodata", [(3, 0), (1, 0), (1, None)])
@pytest.mark.parametrize("at", [slice(0, 5), np.array([0, 2, 3])])
def test_row_of_cells_equals_each_cell_read_alone(tmp_path, bands, nodata, at):
    """A row of cells read from one strip, straight into the caller's buffer, gives each cell's
    own read bit for bit: grey, stretch, its own nodata fill, its valid fraction."""
    rng = np.random.default_rng(2)
    data = rng.integers(1, 255, (bands, 100, 300)).astype(np.uint8)
    data[:, :, :40] = 0  # cell 0 is 40 % nodata, cell 1 10 %
    data[:, 60:, 130:150] = 0
    path = write_raster(tmp_path / "r.tif", data if bands > 1 else data[0], UTM, Affine(10, 0, 0, 0, -10, 1000),
                        nodata=nodata)
    with GreyReader(path) as reader:
        picked = np.arange(5)[at]
        out = np.full((len(picked), 60, 60), np.nan, np.float32)
        valid = reader.read_row_cells(0, 20, 300, 60, 60, at, out)
        alone = [reader.read_window(60 * c, 20, 60, 60, 60) for c in picked]
        again = reader.read_row_cells(0, 20, 300, 60, 60, at, np.empty_like(out))
    for j, (patch, fraction) in enumerate(alone):
        assert np.array_equal(out[j], patch)
        assert valid[j] == pytest.approx(fraction if nodata is not None else 1.0)
    assert np.array_equal(again, valid)  # the reader's buffers are reused, not stale
    if nodata is not None and 0 in picked:
        assert valid[0] == pytest.approx((60 - 40) / 60)
        # The cell's nodata holds the mean of its own valid pixels, not a fixed grey.
        assert np.allclose(out[0][:, :40], out[0][:, 40:].mean(), atol=1e-5)


def test_bands_without_their_nodata_value_are_not_compared(tmp_path):
    """Nodata 0 absent from a read: no pixel compared, all valid; one such pixel: it alone invalid."""
    data = np.full((3, 40, 60), 9, np.uint8)
    data[2, 30, 50] = 0  # one nodata pixel in the blue band
    path = write_raster(tmp_path / "r.tif", data, UTM, Affine(10, 0, 0, 0, -10, 400), nodata=0)
    with GreyReader(path) as reader:
        _, ok = reader._read_pixels(Window(0, 0, 40, 30), (30, 40))
        assert ok is None
        _, ok = reader._read_pixels(Window(20, 10, 40, 30), (30, 40))
        assert np.array_equal(ok, gdal_validity(path, reader.bands, Window(20, 10, 40, 30)))
        assert (~ok).sum() == 1 and not ok[20, 30]


@pytest.mark.parametrize("values", [(0.2, 0.9), (-3.0, 0.5), (0.1, 7.0), (-1.0, 9.0)])
def test_stretch_equals_numpy_clip_whether_or_not_values_leave_the_range(tmp_path, values):
    """The stretch skips a clip only when no value leaves [0, 1]: the result is np.clip's to the bit."""
    rng = np.random.default_rng(3)
    data = rng.uniform(0, 1, (50, 50)).astype(np.float32)
    path = write_raster(tmp_path / "f.tif", data, UTM, Affine(10, 0, 0, 0, -10, 500))
    with GreyReader(path, stretch=(0.0, 1.0)) as reader:
        assert not reader._never_below and not reader._never_above  # float pixels: clips are checked
        grey = rng.uniform(*values, (4, 30, 30)).astype(np.float32)
        expected = np.clip(grey, 0, 1)
        assert np.array_equal(reader._stretch_in_place(grey), expected)


def test_box_taps_are_the_exact_area_weights():
    """Each output pixel's taps are the share of its box each source pixel covers (random
    offsets, sizes and shrink factors), with the taps no pixel needs left out."""
    from siamese_analog_plugin.engine.imagery import _box_taps

    rng = np.random.default_rng(0)
    for _ in range(300):
        offset, size = rng.uniform(0, 1), int(rng.integers(5, 120))
        width = size * rng.uniform(1.0, 4.0)
        index, weight = _box_taps(offset, width, size)
        n = int(np.ceil(offset + width)) + 2
        got = np.zeros((size, n))
        np.add.at(got, (np.repeat(np.arange(size), index.shape[1]), index.ravel()), weight.ravel())
        lo = offset + np.arange(size) * width / size
        edges = np.arange(n)
        cover = np.clip(np.minimum(lo[:, None] + width / size, edges + 1) - np.maximum(lo[:, None], edges), 0, None)
        assert np.abs(got - cover / cover.sum(axis=1, keepdims=True)).max() < 1e-5
        assert index.shape[1] <= int(np.ceil(width / size)) + 1
    index, _ = _box_taps(0.0, 150.0, 100)
    assert index.shape[1] == 2  # a 1.5 px box touches two pixels, never three
