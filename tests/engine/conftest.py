"""Fixtures for the engine's tests: tiny rasters made in the test, a tiny real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import siamese_analog_plugin.engine  # noqa: F401  (sets PROJ_DATA before pyproj loads in tests)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_RASTER = REPO / "resources" / "earth" / "landsat_bahamas_rgb_300m.tif"
SAMPLE_REFERENCE = REPO / "resources" / "mars" / "ganges_chasma_dunes_ctx_7m.tif"
SAMPLE_HIRISE = sorted((REPO / "resources" / "mars").glob("hirise_*.jpg"))


def write_raster(path, data, crs, transform, nodata=None, dtype=None):
    """Write a GeoTIFF (bands first) and return its path as str."""
    import rasterio

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=dtype or data.dtype.name, crs=crs, transform=transform)
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data.astype(profile["dtype"]))
    return str(path)


def smooth_noise(shape, seed=0, scale=8):
    """A smooth random texture in [0, 255] (uint8)."""
    rng = np.random.default_rng(seed)
    small = rng.random((shape[0] // scale + 2, shape[1] // scale + 2))
    big = np.kron(small, np.ones((scale, scale)))[: shape[0], : shape[1]]
    return (big * 200 + rng.random(shape) * 55).astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """A real (untrained, seeded) compact encoder saved in the model format (``tests/conftest.py``)."""
    return tiny_model_path


@pytest.fixture()
def utm_raster(tmp_path):
    """300 x 200 px, 10 m, UTM 33N, top-left at (499000, 10000): 3 km x 2 km; RGB uint8."""
    from affine import Affine

    grey = smooth_noise((200, 300), seed=1)
    rgb = np.stack([grey, grey, grey])
    return write_raster(tmp_path / "utm.tif", rgb, "EPSG:32633", Affine(10, 0, 499000, 0, -10, 10000))


@pytest.fixture()
def geographic_raster(tmp_path):
    """EPSG:4326, 0.0001 deg pixels (~11 m x 8 m at 45 N), 400 x 300 px, near (10 E, 45 N)."""
    from affine import Affine

    grey = smooth_noise((300, 400), seed=2)
    return write_raster(tmp_path / "geo.tif", grey, "EPSG:4326", Affine(0.0001, 0, 10.0, 0, -0.0001, 45.03))
