"""Outputs written while the search runs: the same files as writing a finished result at once,
written batch by batch, and nothing left behind when a search is cancelled or fails.

Real rasters, a real (tiny) model, real GeoTIFF / GeoPackage files read back with GDAL.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from osgeo import ogr
from PIL import Image
from shapely.geometry import Polygon

from siamese_analog_plugin.engine.errors import SearchCancelled
from siamese_analog_plugin.engine.feedback import Feedback
from siamese_analog_plugin.engine.grid import Area
from siamese_analog_plugin.engine.outputs import NODATA, RasterStream, ResultStream, atomic_outputs
from siamese_analog_plugin.engine.search import SearchParams, plan_grid, run_search, write_outputs

from .conftest import smooth_noise, write_raster

ogr.UseExceptions()
UTM = "EPSG:32618"
ORIGIN = Affine(10, 0, 600000, 0, -10, 2700000)


@pytest.fixture()
def scene(tmp_path):
    """800 x 500 px RGB, 10 m, a nodata band on the left; an L-shaped area (some grid positions
    dropped); two references, each one of its cells."""
    grey = np.maximum(smooth_noise((500, 800), seed=7), 1)
    grey[:, :60] = 0
    rgb = np.stack([grey, (grey * 0.7).astype(np.uint8), (grey * 0.5).astype(np.uint8)])
    raster = write_raster(tmp_path / "scene.tif", rgb, UTM, ORIGIN, nodata=0)
    refs = tmp_path / "refs"
    refs.mkdir()
    Image.fromarray(grey[200:225, 400:425]).save(refs / "crop.png")  # one 250 m cell
    Image.fromarray(grey[400:425, 700:725]).save(refs / "other.png")  # another one
    area = Area(Polygon([(600000, 2700000), (608000, 2700000), (608000, 2697500), (603000, 2697500),
                         (603000, 2695000), (600000, 2695000)]), UTM)
    return raster, str(refs), area


def raster_content(path):
    with rasterio.open(path) as ds:
        return {"data": ds.read(1), "crs": ds.crs, "transform": ds.transform, "nodata": ds.nodata,
                "dtype": ds.dtypes[0], "blocks": ds.block_shapes, "compress": ds.compression,
                "tags": {k: v for k, v in ds.tags().items() if k != "run_id"},  # one per run
                "description": ds.descriptions, "size": (ds.width, ds.height)}


def gpkg_content(path):
    """Every layer with its fields, SRS, features (fid, values, geometry) and spatial index."""
    ds = ogr.Open(path)
    out = {}
    for i in range(ds.GetLayerCount()):
        layer = ds.GetLayer(i)
        defn = layer.GetLayerDefn()
        count = defn.GetFieldCount()
        fields = [(defn.GetFieldDefn(k).GetName(), defn.GetFieldDefn(k).GetTypeName()) for k in range(count)]
        features = [(f.GetFID(), tuple(f.GetField(k) for k in range(count)),
                     f.GetGeometryRef().ExportToWkb()) for f in layer]
        out[layer.GetName()] = {"fields": fields, "features": features, "srs": layer.GetSpatialRef().ExportToWkt(),
                                "geometry": layer.GetGeomType(), "fid": layer.GetFIDColumn()}
    ds = None
    con = sqlite3.connect(path)
    try:
        out["extensions"] = sorted(con.execute("SELECT table_name, column_name, extension_name FROM gpkg_extensions"))
        out["triggers"] = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'"))
        out["rtree"] = sorted(con.execute("SELECT * FROM rtree_cells_geom"))
        out["counts"] = sorted(con.execute("SELECT * FROM gpkg_ogr_contents"))
    finally:
        con.close()
    return out


def partial_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".partial-" in p.name)


class TestSameFilesAsWritingAtTheEnd:
    @pytest.mark.parametrize("batch_size", [5, 64])
    def test_streamed_outputs_equal_the_end_of_run_writer(self, scene, tiny_model, tmp_path, batch_size):
        raster, refs, area = scene
        params = SearchParams(raster, refs, area=area, cell_size_m=250, model=tiny_model, device="cpu",
                              batch_size=batch_size, top_k=7)
        result = run_search(params, str(tmp_path / "s.tif"), str(tmp_path / "s.gpkg"))
        write_outputs(result, str(tmp_path / "e.tif"), str(tmp_path / "e.gpkg"), params)
        # The case is not trivial: skipped cells, dropped grid positions, both references used.
        assert 0 < (~result.scored).sum() and len(result.grid) < result.grid.n_rows * result.grid.n_cols
        assert set(result.nearest_reference[result.scored]) == {0, 1}
        streamed, at_end = raster_content(tmp_path / "s.tif"), raster_content(tmp_path / "e.tif")
        assert np.array_equal(streamed.pop("data"), at_end.pop("data"))
        assert streamed == at_end
        streamed, at_end = gpkg_content(str(tmp_path / "s.gpkg")), gpkg_content(str(tmp_path / "e.gpkg"))
        assert list(streamed)[:2] == ["cells", "analog_sites"]
        assert streamed == at_end
        cells = streamed["cells"]
        names = [n for n, _ in cells["fields"]]
        ranks = [v[names.index("rank")] for _, v, _ in cells["features"]]
        assert ranks.count(None) == (~result.scored).sum()  # skipped cells: NULL, not a rank 0 before rank 1
        assert sorted(r for r in ranks if r is not None) == list(range(1, result.scored.sum() + 1))
        assert ranks and len(streamed["analog_sites"]["features"]) == 7
        assert len(streamed["rtree"]) == len(result.grid)

    def test_outputs_from_the_cache_equal_the_first_search(self, scene, tiny_model, tmp_path):
        raster, refs, area = scene
        params = SearchParams(raster, refs, area=area, cell_size_m=250, model=tiny_model, device="cpu",
                              cache_dir=str(tmp_path / "cache"))
        first = run_search(params, str(tmp_path / "a.tif"), str(tmp_path / "a.gpkg"))
        again = run_search(params, str(tmp_path / "b.tif"), str(tmp_path / "b.gpkg"))
        assert (first.extra["cache"], again.extra["cache"]) == ("miss", "hit")
        a, b = raster_content(tmp_path / "a.tif"), raster_content(tmp_path / "b.tif")
        assert np.array_equal(a.pop("data"), b.pop("data")) and a == b
        assert gpkg_content(str(tmp_path / "a.gpkg")) == gpkg_content(str(tmp_path / "b.gpkg"))


class TestRasterStream:
    @pytest.mark.parametrize("side_px, cell_px, tiled", [(900, 4.5, False), (520, 2, True)])
    def test_strips_written_in_any_batch_sizes_hold_every_cell(self, tmp_path, side_px, cell_px, tiled):
        """Stripped (many strips) and tiled (256 x 256) layouts, cells dropped by the area, NaNs."""
        raster = write_raster(tmp_path / "r.tif", np.ones((side_px, side_px), np.uint8), UTM, ORIGIN)
        side = side_px * 10.0
        area = Area(Polygon([(600000, 2700000), (600000 + side, 2700000 - side / 2), (600000, 2700000 - side)]), UTM)
        _, grid = plan_grid(SearchParams(raster, None, area=area, cell_size_m=10.0 * cell_px))
        assert len(grid) < grid.n_rows * grid.n_cols
        n = len(grid)
        values = np.random.default_rng(0).random(n).astype(np.float32)
        values[::7] = np.nan
        stream = RasterStream(str(tmp_path / "out.tif"), grid, {"k": "v"})
        rng = np.random.default_rng(1)
        start = 0
        while start < n:
            stop = min(n, start + int(rng.integers(1, 3000)))
            stream.write(start, stop, values[start:stop])
            start = stop
        stream.close()
        expected = np.full((grid.n_rows, grid.n_cols), NODATA, np.float32)
        ok = np.isfinite(values)
        expected[grid.rows[ok], grid.cols[ok]] = values[ok]
        with rasterio.open(tmp_path / "out.tif") as ds:
            assert np.array_equal(ds.read(1), expected)
            assert ds.transform == grid.output_transform and ds.tags()["k"] == "v"
            block = ds.block_shapes[0]
            assert block == (256, 256) if tiled else (block[1] == grid.n_cols and block[0] < grid.n_rows // 4)

    def test_cells_out_of_grid_order_are_refused(self, tmp_path):
        raster = write_raster(tmp_path / "r.tif", np.ones((300, 300), np.uint8), UTM, ORIGIN)
        _, grid = plan_grid(SearchParams(raster, None, cell_size_m=10))  # 300 x 300: 256-row tiles
        stream = RasterStream(str(tmp_path / "out.tif"), grid)
        stream.write(80000, 80100, np.zeros(100, np.float32))  # row 266: the first strip is written
        with pytest.raises(Exception, match="out of grid order"):
            stream.write(0, 10, np.zeros(10, np.float32))
        stream.abort()


class CancelWhenHalfWritten(Feedback):
    """Cancels once half the cells are scored, after looking at the files being written."""

    def __init__(self, folder, fail=False):
        self.folder, self.fail = Path(folder), fail
        self.fraction = 0.0
        self.seen_features = None

    def progress(self, fraction, message=""):
        self.fraction = fraction
        if fraction >= 0.5 and self.seen_features is None:
            import time

            gpkg = [p for p in self.folder.iterdir() if ".partial-" in p.name and p.suffix == ".gpkg"]
            for _ in range(100):  # the writer thread may be a batch or two behind
                self.seen_features = _count_rows(gpkg[0]) if gpkg else 0
                if self.seen_features:
                    break
                time.sleep(0.05)
            if self.fail:
                raise RuntimeError("the machine fell over")

    def cancelled(self):
        return self.fraction >= 0.5 and self.seen_features is not None


def _count_rows(path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM cells").fetchone()[0]
    except sqlite3.Error:
        return 0
    finally:
        con.close()


class TestCancelAndFailure:
    @pytest.mark.parametrize("fail", [False, True])
    def test_stopping_midway_leaves_no_file_and_keeps_old_results(self, scene, tiny_model, tmp_path, fail):
        raster, refs, area = scene
        out = tmp_path / "out"
        out.mkdir()
        (out / "d.tif").write_bytes(b"previous result")
        params = SearchParams(raster, refs, area=area, cell_size_m=250, model=tiny_model, device="cpu",
                              batch_size=16)
        feedback = CancelWhenHalfWritten(out, fail)
        with pytest.raises(RuntimeError if fail else SearchCancelled):
            run_search(params, str(out / "d.tif"), str(out / "c.gpkg"), feedback)
        # Cells were in the (temporary) GeoPackage while the search ran: it streams.
        assert feedback.seen_features and feedback.seen_features > 0
        assert sorted(p.name for p in out.iterdir()) == ["d.tif"]
        assert (out / "d.tif").read_bytes() == b"previous result"

    def test_a_writer_failure_stops_the_search_and_leaves_nothing(self, scene, tmp_path):
        raster, _, _ = scene
        _, grid = plan_grid(SearchParams(raster, None, cell_size_m=250))
        values = np.linspace(0, 1, len(grid), dtype=np.float32)

        def columns_of(index):
            if index.start >= 100:
                raise ValueError("no values for these cells")
            return {"dissimilarity": values[index]}

        with pytest.raises(ValueError, match="no values"):
            with atomic_outputs({"raster": tmp_path / "d.tif", "cells": tmp_path / "c.gpkg"}) as tmp:
                with ResultStream(tmp["raster"], tmp["cells"], grid, columns_of) as sink:
                    for start in range(0, len(grid), 50):
                        sink.put(start, min(start + 50, len(grid)))
                    sink.finish()
        assert not (tmp_path / "d.tif").exists() and not (tmp_path / "c.gpkg").exists()
        assert not partial_files(tmp_path)
