"""Grid geometry, checked against independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from pyproj import Geod, Transformer
from shapely.geometry import Point, box

from siamese_analog_plugin.engine.errors import InputError
from siamese_analog_plugin.engine.grid import Area, build_grid, estimate_cell_count
from siamese_analog_plugin.engine.imagery import describe_raster


class TestProjectedGrid:
    def test_cells_bounds_and_count_match_hand_computation(self, utm_raster):
        grid = build_grid(describe_raster(utm_raster), 250)
        # 3000 m x 2000 m area, 250 m cells: floor((3000-250)/250)+1 = 12 columns, 8 rows.
        assert (grid.n_rows, grid.n_cols) == (8, 12)
        assert len(grid) == 96
        assert grid.ids[0] == 1 and grid.ids[-1] == 96
        for i in (0, 13, 95):
            r, c = int(grid.rows[i]), int(grid.cols[i])
            expected = (499000 + 250 * c, 10000 - 250 * (r + 1), 499000 + 250 * (c + 1), 10000 - 250 * r)
            assert grid.bounds(i) == pytest.approx(expected)

    def test_output_transform_is_the_cell_grid(self, utm_raster):
        grid = build_grid(describe_raster(utm_raster), 250)
        t = grid.output_transform
        assert (t.a, t.b, t.c, t.d, t.e, t.f) == pytest.approx((250, 0, 499000, 0, -250, 10000))

    def test_centre_lon_lat(self, utm_raster):
        grid = build_grid(describe_raster(utm_raster), 1000)
        # Cells of 1 km from x=499000: the second column is centred on x=500500; UTM 33N's central
        # meridian (x=500000) is 15 E, so x=500500 at y~9500 m north lies just east of 15 E.
        i = int(np.nonzero((grid.rows == 0) & (grid.cols == 1))[0][0])
        lon, lat = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True).transform(500500, 9500)
        assert grid.lon[i] == pytest.approx(lon, abs=1e-9)
        assert grid.lat[i] == pytest.approx(lat, abs=1e-9)
        assert 15.0 < grid.lon[i] < 15.01 and 0.08 < grid.lat[i] < 0.09

    def test_stride_makes_overlapping_cells(self, utm_raster):
        grid = build_grid(describe_raster(utm_raster), 250, stride_m=125)
        assert (grid.n_rows, grid.n_cols) == (15, 23)
        b0, b1 = grid.bounds(0), grid.bounds(1)
        assert b1[0] - b0[0] == pytest.approx(125)
        assert b0[2] - b0[0] == pytest.approx(250)
        # Output pixels are centred on cell centres and are a stride wide.
        t = grid.output_transform
        assert t.a == pytest.approx(125)
        assert t.c + t.a / 2 == pytest.approx((b0[0] + b0[2]) / 2)

    def test_polygon_keeps_cells_by_coverage(self, utm_raster):
        info = describe_raster(utm_raster)
        poly = Point(500000, 9000).buffer(600)
        grid = build_grid(info, 250, Area(poly, "EPSG:32633"), min_coverage=0.5)
        bounds = grid.bounds_array()
        for b, cov in zip(bounds, grid.coverage):
            exact = box(*b).intersection(poly).area / (250 * 250)
            assert cov == pytest.approx(exact, abs=1e-5)
            assert exact >= 0.5
        # Independent lattice anchored at the polygon's bounding box (top-left): every cell of
        # it with at least half its area inside is kept, and no other.
        x0, _, _, y1 = poly.bounds
        lattice = [box(x0 + 250 * c, y1 - 250 * (r + 1), x0 + 250 * (c + 1), y1 - 250 * r)
                   for r in range(4) for c in range(4)]
        expected = {tuple(np.round(b.bounds, 6)) for b in lattice if b.intersection(poly).area >= 0.5 * 250 * 250}
        assert {tuple(np.round(b, 6)) for b in bounds} == expected
        assert 0 < len(expected) < len(lattice)  # the coverage filter really dropped cells

    def test_polygon_in_another_crs_is_reprojected(self, utm_raster):
        info = describe_raster(utm_raster)
        to_geo = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
        x0, y0 = to_geo.transform(499500, 8500)
        x1, y1 = to_geo.transform(501500, 9500)
        grid = build_grid(info, 250, Area(box(x0, y0, x1, y1), "EPSG:4326"), min_coverage=0.99)
        b = grid.bounds_array()
        assert b[:, 0].min() >= 499500 - 1 and b[:, 2].max() <= 501500 + 1
        assert b[:, 1].min() >= 8500 - 1 and b[:, 3].max() <= 9500 + 1
        assert len(grid) == 8 * 4


class TestGeographicGrid:
    def test_cells_are_square_on_the_ground(self, geographic_raster):
        grid = build_grid(describe_raster(geographic_raster), 500)
        geod = Geod(ellps="WGS84")
        i = len(grid) // 2
        x0, y0, x1, y1 = grid.bounds(i)
        ymid = (y0 + y1) / 2
        _, _, width_m = geod.inv(x0, ymid, x1, ymid)
        _, _, height_m = geod.inv(x0, y0, x0, y1)
        assert width_m == pytest.approx(500, rel=2e-3)
        assert height_m == pytest.approx(500, rel=2e-3)
        # Rough independent check: a degree of latitude is ~111.1 km, of longitude ~78.8 km at 45 N.
        assert grid.cell_h == pytest.approx(500 / 111_132, rel=3e-3)
        assert grid.cell_w == pytest.approx(500 / (111_320 * np.cos(np.radians(45.0))), rel=5e-3)

    def test_lon_lat_are_the_cell_centres(self, geographic_raster):
        grid = build_grid(describe_raster(geographic_raster), 500)
        cx, cy = grid.centres()
        assert np.allclose(grid.lon, cx) and np.allclose(grid.lat, cy)
        assert 10.0 < grid.lon.min() and grid.lon.max() < 10.04


class TestBadInput:
    def test_polygon_outside_raster(self, utm_raster):
        with pytest.raises(InputError, match="does not overlap the raster"):
            build_grid(describe_raster(utm_raster), 250, Area(box(0, 0, 100, 100), "EPSG:32633"))

    def test_cell_smaller_than_a_pixel(self, utm_raster):
        with pytest.raises(InputError, match="smaller than one pixel"):
            build_grid(describe_raster(utm_raster), 5)

    def test_cell_larger_than_area(self, utm_raster):
        with pytest.raises(InputError, match="larger than the area"):
            build_grid(describe_raster(utm_raster), 2500)

    def test_absurd_cell_count_is_refused_unless_forced(self, utm_raster):
        info = describe_raster(utm_raster)
        with pytest.raises(InputError, match="about 60,000 cells") as err:
            build_grid(info, 10, max_cells=1000)
        assert "--force" in str(err.value)
        assert len(build_grid(info, 10, max_cells=1000, force=True)) == 60_000

    def test_not_georeferenced(self, tmp_path):
        from PIL import Image

        p = tmp_path / "plain.png"
        Image.fromarray(np.zeros((50, 50), np.uint8)).save(p)
        with pytest.raises(InputError, match="not georeferenced"):
            build_grid(describe_raster(p), 10)

    def test_empty_polygon(self, utm_raster):
        with pytest.raises(InputError, match="empty"):
            build_grid(describe_raster(utm_raster), 250, Area(box(0, 0, 1, 1).buffer(-5), "EPSG:32633"))


def test_estimate_cell_count():
    assert estimate_cell_count(35_000e6, 1000) == 35_000
    assert estimate_cell_count(1e6, 100, 50) == 400
    assert estimate_cell_count(1e6, 0) == 0
