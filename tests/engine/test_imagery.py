"""Windowed grey reads and references."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from siamese_analog_plugin.engine.errors import InputError
from siamese_analog_plugin.engine.imagery import GreyReader, describe_raster, load_references

from .conftest import SAMPLE_HIRISE, SAMPLE_REFERENCE, write_raster


@pytest.fixture()
def red_raster(tmp_path):
    rgb = np.zeros((3, 50, 80), np.uint8)
    rgb[0] = 255  # pure red
    rgb[1, :, 40:] = 255  # right half: yellow
    return write_raster(tmp_path / "red.tif", rgb, "EPSG:32633", Affine(2, 0, 0, 0, -2, 100))


def test_luminance_of_rgb(red_raster):
    with GreyReader(red_raster) as r:
        patch, valid = r.read_window(0, 0, 40, 40, 20)
        assert valid == 1.0 and np.allclose(patch, 0.299, atol=1e-6)
        patch, _ = r.read_window(40, 0, 40, 40, 10)
        assert np.allclose(patch, 0.299 + 0.587, atol=1e-6)


def test_chosen_band(red_raster):
    with GreyReader(red_raster, band=2) as r:
        patch, _ = r.read_window(0, 0, 80, 40, 8)
        assert np.allclose(patch[:, :4], 0) and np.allclose(patch[:, 4:], 1)
    with pytest.raises(InputError, match="Band 5 .* has 3 band"):
        GreyReader(red_raster, band=5)


def test_read_bounds_resamples_by_averaging(tmp_path):
    data = np.kron(np.array([[0, 255], [255, 0]], np.uint8), np.ones((50, 50), np.uint8))
    path = write_raster(tmp_path / "chk.tif", data, "EPSG:32633", Affine(1, 0, 0, 0, -1, 100))
    with GreyReader(path) as r:
        patch, valid = r.read_bounds((0, 0, 100, 100), 2)
    assert valid == 1.0 and np.allclose(patch, [[0, 1], [1, 0]])


def test_window_partly_outside_the_raster_is_partly_invalid(tmp_path):
    path = write_raster(tmp_path / "g.tif", np.full((10, 10), 128, np.uint8), "EPSG:32633", Affine(1, 0, 0, 0, -1, 10))
    with GreyReader(path) as r:
        patch, valid = r.read_window(5, 0, 10, 10, 10)
    assert valid == pytest.approx(0.5)
    assert np.allclose(patch[:, :5], 128 / 255)


def test_invalid_pixels_take_the_valid_mean_so_no_edge_is_drawn(tmp_path):
    # Texture in the left half, nodata (0) in the right half of the window.
    rng = np.random.default_rng(0)
    data = rng.integers(60, 200, (20, 20)).astype(np.uint8)
    data[:, 10:] = 0
    path = write_raster(tmp_path / "t.tif", data, "EPSG:32633", Affine(1, 0, 0, 0, -1, 20), nodata=0)
    with GreyReader(path) as r:
        patch, valid = r.read_window(0, 0, 20, 20, 20)
        outside, valid_out = r.read_window(10, 0, 20, 20, 20)  # half beyond the raster's edge too
    assert valid == pytest.approx(0.5) and valid_out == 0.0
    assert np.allclose(patch[:, 10:], patch[:, :10].mean(), atol=1e-6)
    # After per-patch normalisation the filled half is at 0: no step at the border of the data.
    from siamese_analog_plugin.engine.encoder import normalise_patches

    assert np.allclose(normalise_patches(patch[None], {"mode": "per_patch"})[0][:, 10:], 0.0, atol=1e-5)
    assert np.all(outside == 0.5)  # nothing valid: mid grey


def test_alpha_band_masks_pixels(tmp_path):
    rgba = np.full((4, 20, 20), 200, np.uint8)
    rgba[3, :, :15] = 0  # transparent left 3/4
    import rasterio

    path = tmp_path / "rgba.tif"
    with rasterio.open(path, "w", driver="GTiff", width=20, height=20, count=4, dtype="uint8", crs="EPSG:4326",
                       transform=Affine(0.001, 0, 0, 0, -0.001, 0), photometric="RGB", alpha="YES") as dst:
        dst.write(rgba)
    with GreyReader(path) as r:
        assert r.bands == [1, 2, 3]
        _, valid = r.read_window(0, 0, 20, 20, 20)
    assert valid == pytest.approx(0.25)


def test_sixteen_bit_is_stretched(tmp_path):
    data = np.linspace(1000, 5000, 100 * 100).reshape(100, 100).astype(np.uint16)
    path = write_raster(tmp_path / "u16.tif", data, "EPSG:32633", Affine(1, 0, 0, 0, -1, 100))
    with GreyReader(path) as r:
        patch, _ = r.read_window(0, 0, 100, 100, 50)
    assert 0.0 <= patch.min() < 0.05 and 0.95 < patch.max() <= 1.0


def test_mars_reference_ground_size():
    ref = load_references(str(SAMPLE_REFERENCE), 100)[0]
    assert ref.patch.shape == (100, 100) and 0 <= ref.patch.min() and ref.patch.max() <= 1
    assert ref.ground_size_m == pytest.approx(287 * 7)
    info = describe_raster(SAMPLE_REFERENCE)
    assert "Sinusoidal" in info.crs_wkt and info.georeferenced


def test_plain_jpeg_reference_has_no_ground_size_unless_given():
    assert load_references([str(SAMPLE_HIRISE[0])], 100)[0].ground_size_m is None
    ref = load_references([str(SAMPLE_HIRISE[0])], 100, resolution_m=0.25)[0]
    assert ref.ground_size_m == pytest.approx(227 * 0.25)


def test_no_reference():
    with pytest.raises(InputError, match="No Mars reference"):
        load_references([], 100)
