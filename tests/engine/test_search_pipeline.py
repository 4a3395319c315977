"""The streaming pipeline's internals: block reads, reader threads, torch threads, fast writers.

Every test runs the real reader on real GeoTIFFs and a real (tiny) model.
"""

from __future__ import annotations

import sqlite3
import threading
import time

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from osgeo import ogr, osr
from rasterio.windows import from_bounds

from siamese_analog_plugin.engine import outputs
from siamese_analog_plugin.engine.embeddings import quantise
from siamese_analog_plugin.engine.encoder import load_model
from siamese_analog_plugin.engine.feedback import Feedback
from siamese_analog_plugin.engine.grid import Area
from siamese_analog_plugin.engine.imagery import GreyReader
from siamese_analog_plugin.engine.search import SearchParams, iter_patch_batches, plan_grid, plan_reads, run_search

from .conftest import SAMPLE_RASTER, SAMPLE_REFERENCE, smooth_noise, write_raster


@pytest.fixture()
def area_raster(tmp_path):
    """600 x 400 px RGB, 10 m pixels, UTM 18N, with a nodata corner: 1 km cells are 100 px."""
    grey = smooth_noise((400, 600), seed=5)
    grey[:120, :150] = 0
    rgb = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)])
    return write_raster(tmp_path / "area.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)


def _box_average(grey, ok, col, row, width, height, size):
    """The box (area) average of the window ``(col, row, width, height)`` of ``grey`` down to
    ``size`` x ``size``, pixels where ``ok`` is false left out, by its definition; and which
    output pixels' centres fall on a valid pixel."""
    def weights(offset, span, n):
        edges = np.arange(n, dtype=np.float64)
        lo = offset + np.arange(size) * span / size
        cover = np.minimum(lo[:, None] + span / size, edges + 1) - np.maximum(lo[:, None], edges)
        return np.clip(cover, 0, None)

    wy, wx = weights(row, height, grey.shape[0]), weights(col, width, grey.shape[1])
    total = wy @ (grey * ok) @ wx.T
    share = wy @ ok.astype(np.float64) @ wx.T
    cy = np.floor(row + (np.arange(size) + 0.5) * height / size).astype(int)
    cx = np.floor(col + (np.arange(size) + 0.5) * width / size).astype(int)
    return total / np.maximum(share, 1e-12), ok[np.ix_(cy, cx)]


class Log(Feedback):
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)


def batches(raster, grid, size, **kw):
    out = list(iter_patch_batches(raster, grid, size, 16, **kw))
    idx = np.concatenate([b[0] for b in out])
    return idx, np.concatenate([b[1] for b in out]), np.concatenate([b[2] for b in out])


class TestReads:
    @pytest.mark.parametrize("stride", [None, 500.0])
    def test_block_reads_equal_cell_reads(self, area_raster, stride):
        params = SearchParams(area_raster, None, cell_size_m=1000, stride_m=stride)
        info, grid = plan_grid(params)
        assert plan_reads(info, grid, 100).block
        i1, p1, v1 = batches(area_raster, grid, 100, block_reads=True)
        i2, p2, v2 = batches(area_raster, grid, 100, block_reads=False, threads=1)
        assert np.array_equal(i1, np.arange(len(grid))) and np.array_equal(i1, i2)
        assert np.array_equal(p1, p2) and np.array_equal(v1, v2)
        assert v1.min() == 0.0 and v1.max() == 1.0  # the nodata corner is seen by both

    @pytest.mark.parametrize("cell_m, stride_m", [(1500, None), (1234, None), (2000, 1300)])
    def test_cells_to_shrink_are_averaged_down_from_rows_read_once(self, area_raster, cell_m, stride_m):
        """Cells larger than the encoder's patch are read a grid row at a time at full resolution
        and averaged down with exact area weights: each patch is the box average of its own
        window (computed here from the pixels, in float64), nodata pixels left out; validity as
        GDAL's nearest-neighbour mask gives it."""
        info, grid = plan_grid(SearchParams(area_raster, None, cell_size_m=cell_m, stride_m=stride_m))
        plan = plan_reads(info, grid, 100)
        assert plan.mode == "rows"
        _, patches, valid = batches(area_raster, grid, 100)
        with rasterio.open(area_raster) as ds:
            pixels = ds.read().astype(np.float64)
            inverse = ~ds.transform
        grey = 0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]
        ok = (pixels != 0).all(axis=0)
        checked = 0
        for i in range(len(grid)):
            x0, y1, x1, y0 = grid.bounds(i)[0], grid.bounds(i)[3], grid.bounds(i)[2], grid.bounds(i)[1]
            c0, r0 = inverse * (x0, y1)
            c1, r1 = inverse * (x1, y0)
            expected, mask = _box_average(grey, ok, c0, r0, c1 - c0, r1 - r0, 100)
            assert valid[i] == pytest.approx(mask.mean(), abs=1e-6)
            if mask.any():  # pixels not filled with the cell's mean
                assert np.allclose(patches[i][mask], np.clip(expected[mask] / 255.0, 0, 1), atol=2e-6)
                checked += 1
        assert checked == len(grid) and (valid < 1).any() and len(grid) >= 8

    def test_averaged_down_cells_agree_with_gdal_reading_each_cell(self, tmp_path):
        """GDAL averages each band and rounds it to a whole grey level before the grey mix:
        at 1.5 px a patch pixel, the two agree to within that half a level, validity exactly
        (nodata in every band at once, as in imagery; GDAL leaves each band's own out)."""
        grey = np.maximum(smooth_noise((400, 600), seed=6), 2)
        grey[:130, :170] = 0
        rgb = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)])
        raster = write_raster(tmp_path / "r.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)
        info, grid = plan_grid(SearchParams(raster, None, cell_size_m=1500))
        assert plan_reads(info, grid, 100).mode == "rows"
        _, rows, v1 = batches(raster, grid, 100)
        _, cells, v2 = batches(raster, grid, 100, block_reads=False)
        assert np.array_equal(v1, v2) and (v1 < 1).any() and (v1 > 0).all()
        full = v1 == 1
        assert np.abs(rows[full] - cells[full]).max() <= 0.5 / 255 + 1e-6

    def test_nan_nodata_of_float_rasters_stays_out_of_averaged_cells(self, tmp_path):
        """A float raster whose nodata is NaN: cells averaged down from rows are finite, the NaN
        pixels left out and counted invalid, as GDAL's per-cell reads count them."""
        data = smooth_noise((300, 450), seed=9).astype(np.float32) * 3.5 + 100
        data[40:90, 60:200] = np.nan
        raster = write_raster(tmp_path / "f.tif", data, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000),
                              nodata=float("nan"))
        info, grid = plan_grid(SearchParams(raster, None, cell_size_m=1500))
        assert plan_reads(info, grid, 100).mode == "rows"
        _, patches, valid = batches(raster, grid, 100)
        _, _, gdal_valid = batches(raster, grid, 100, block_reads=False)
        assert np.isfinite(patches).all() and (valid < 1).any()
        assert np.array_equal(valid, gdal_valid)

    def test_rows_reads_are_split_into_strips_of_bounded_width(self, tmp_path, monkeypatch):
        """A strip spans at most ROWS_READ_PIXELS worth of grid columns, kept cells or not (an
        area with a gap in the middle of its rows): the same patches, fewer pixels held."""
        from shapely.geometry import box

        from siamese_analog_plugin.engine import reads

        grey = np.maximum(smooth_noise((300, 900), seed=4), 2)
        raster = write_raster(tmp_path / "w.tif", grey, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000))
        area = Area(box(600000, 2697000, 601500, 2700000).union(box(607500, 2697000, 609000, 2700000)), "EPSG:32618")
        info, grid = plan_grid(SearchParams(raster, None, area=area, cell_size_m=1500, stride_m=750))
        assert plan_reads(info, grid, 100).mode == "rows" and np.ptp(grid.cols) > 8
        widths = []
        read = GreyReader.read_row_resampled

        def spy(self, col_off, row_off, cell_w, cell_h, step, count, *rest):
            widths.append(count)
            return read(self, col_off, row_off, cell_w, cell_h, step, count, *rest)

        monkeypatch.setattr(GreyReader, "read_row_resampled", spy)
        whole = batches(raster, grid, 100, threads=1)
        assert max(widths) > 4  # a strip across the gap
        widths.clear()
        monkeypatch.setattr(reads, "ROWS_READ_PIXELS", 150 * 75 * 4)  # 4 grid columns a strip
        split = batches(raster, grid, 100, threads=1)
        assert max(widths) <= 4
        for x, y in zip(whole, split):
            assert np.array_equal(x, y)

    def test_cells_too_large_for_a_strip_read_are_read_by_gdal(self, area_raster, monkeypatch):
        from siamese_analog_plugin.engine import reads

        info, grid = plan_grid(SearchParams(area_raster, None, cell_size_m=1500))
        assert plan_reads(info, grid, 100).mode == "rows"
        monkeypatch.setattr(reads, "ROWS_READ_PIXELS", 150 * 150 - 1)
        assert plan_reads(info, grid, 100).mode == "cell"

    def test_cells_leaving_the_raster_are_read_one_by_one(self, area_raster):
        """Cells that leave the raster (1200.2 m: five fit in the 6 km wide raster but for 1 m)
        are read and resampled by GDAL cell by cell, the part outside invalid."""
        info, grid = plan_grid(SearchParams(area_raster, None, cell_size_m=1200.2))
        assert plan_reads(info, grid, 100).mode == "cell"
        _, patches, valid = batches(area_raster, grid, 100)
        with GreyReader(area_raster) as reader:
            expected = reader.read_bounds(grid.bounds(len(grid) - 1), 100)
        assert np.array_equal(patches[-1], expected[0])
        assert valid[-1] == np.float32(expected[1])

    @pytest.mark.parametrize("cell_m", [730, 500])
    def test_cells_to_enlarge_are_interpolated_from_rows_read_once(self, tmp_path, cell_m):
        """Cells smaller than the patch are interpolated up from the row's strip (bilinear, as
        GDAL's reads of each cell: within half a grey level, the same validity), edge cells too."""
        grey = np.maximum(smooth_noise((400, 600), seed=8), 2)
        grey[:130, :170] = 0
        rgb = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)])
        raster = write_raster(tmp_path / "r.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)
        info, grid = plan_grid(SearchParams(raster, None, cell_size_m=cell_m))
        assert plan_reads(info, grid, 100).mode == "rows"
        _, rows, v1 = batches(raster, grid, 100)
        _, cells, v2 = batches(raster, grid, 100, block_reads=False)
        assert np.array_equal(v1, v2) and (v1 < 1).any() and (v1 == 1).any()
        full = v1 == 1
        assert np.abs(rows[full] - cells[full]).max() <= 0.5 / 255 + 1e-6

    def test_window_is_rasterio_from_bounds(self):
        info, grid = plan_grid(SearchParams(str(SAMPLE_RASTER), None, cell_size_m=4321.7, stride_m=3000))
        with GreyReader(SAMPLE_RASTER) as reader:
            for b in grid.bounds_array()[:200]:
                w = from_bounds(*b, transform=reader.ds.transform)
                assert reader.window_of(tuple(b)) == (w.col_off, w.row_off, w.width, w.height)

    @pytest.mark.parametrize("held", [1, 3])
    def test_reused_buffers_give_the_same_batches(self, area_raster, held):
        """With ``reuse`` the batches come in a few buffers made once, read into again only
        after the consumer has asked for ``held`` more batches (the encoder threads hold that
        many at once)."""
        _, grid = plan_grid(SearchParams(area_raster, None, cell_size_m=1000, stride_m=250))
        fresh = list(iter_patch_batches(area_raster, grid, 100, 8, threads=2, prefetch=1))
        seen, buffers, holding = [], set(), []
        gen = iter_patch_batches(area_raster, grid, 100, 8, threads=2, prefetch=1, reuse=True, held=held)
        for idx, patches, valid in gen:
            seen.append((idx, patches.copy(), valid))
            buffers.add(patches.__array_interface__["data"][0])
            holding = (holding + [(len(seen) - 1, patches)])[-held:]
            time.sleep(0.005)  # the readers run on meanwhile: the batches held are still intact
            for k, kept in holding:
                assert np.array_equal(kept, fresh[k][1])
        assert len(seen) == len(fresh) > 8
        for (i1, p1, v1), (i2, p2, v2) in zip(fresh, seen):
            assert np.array_equal(i1, i2) and np.array_equal(p1, p2) and np.array_equal(v1, v2)
        assert len(buffers) <= 2 + 1 + held  # threads + prefetch + the consumer's

    def test_readers_stop_when_the_consumer_stops(self, area_raster):
        _, grid = plan_grid(SearchParams(area_raster, None, cell_size_m=1000, stride_m=250))
        before = threading.active_count()
        gen = iter_patch_batches(area_raster, grid, 100, 4, threads=3)
        next(gen)
        gen.close()
        assert threading.active_count() == before


@pytest.mark.parametrize("cores, cpu, gpu", [(1, 1, 2), (2, 1, 2), (4, 2, 2), (8, 4, 4), (32, 8, 8)])
def test_reader_threads_follow_the_cores(monkeypatch, cores, cpu, gpu):
    """Half the cores up to 8: one reader on two cores (a second only contends with the encoder
    there), at least two to feed a GPU."""
    from siamese_analog_plugin.engine import search

    monkeypatch.setattr(search.os, "cpu_count", lambda: cores)
    assert (search.default_reader_threads("cpu"), search.default_reader_threads("cuda")) == (cpu, gpu)


class TestRunSearch:
    def test_same_result_whatever_the_threads_and_read_mode(self, area_raster, tiny_model):
        params = SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, stride_m=500, model=tiny_model,
                              device="cpu", batch_size=8)
        params.torch_threads = 1
        a = run_search(params)
        params.reader_threads, params.torch_threads = 3, 3  # three batches encoded at once
        b = run_search(params)
        params.block_reads = False
        c = run_search(params)
        assert a.extra["read_mode"] == "block" and c.extra["read_mode"] == "cell"
        assert a.extra["encoder_threads"] == 1 and a.extra["torch_threads"] == 1
        assert b.extra["reader_threads"] == 3 and b.extra["encoder_threads"] == 3 and b.extra["torch_threads"] == 1
        for other in (b, c):
            assert np.array_equal(a.dissimilarity, other.dissimilarity, equal_nan=True)
            assert np.array_equal(a.rank, other.rank)
        # Skipped cells (the nodata corner) are still skipped.
        assert np.isnan(a.dissimilarity).any() and (a.rank > 0).sum() == np.isfinite(a.dissimilarity).sum()

    def test_cells_averaged_down_by_rows_score_as_when_gdal_reads_each(self, area_raster, tiny_model):
        """The rows reads change pixels by under half a grey level: the scores barely move and
        the ranking stays."""
        params = SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1500, stride_m=700, model=tiny_model,
                              device="cpu", batch_size=8)
        rows = run_search(params)
        params.block_reads = False
        cells = run_search(params)
        assert (rows.extra["read_mode"], cells.extra["read_mode"]) == ("rows", "cell")
        ok = rows.scored
        assert np.array_equal(ok, cells.scored) and ok.sum() > 20
        gap = np.abs(rows.dissimilarity[ok] - cells.dissimilarity[ok])
        spread = np.ptp(cells.dissimilarity[ok])
        assert gap.max() < 0.05 * spread
        assert np.corrcoef(rows.rank[ok], cells.rank[ok])[0, 1] > 0.98

    def test_matches_the_encoder_on_each_cell(self, area_raster, tiny_model):
        enc = load_model(tiny_model, "cpu")
        params = SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, model=tiny_model, device="cpu")
        result = run_search(params, encoder=enc)
        # The search scores embeddings rounded to half precision, as an embedding raster keeps them.
        ref = quantise(enc.embed(np.stack([r.patch for r in result.references])))
        with GreyReader(area_raster) as reader:
            for i in np.nonzero(result.scored)[0][:5]:
                patch, _ = reader.read_bounds(result.grid.bounds(int(i)), 100)
                d = np.linalg.norm(quantise(enc.embed(patch[None])) - ref, axis=1).min()
                assert result.dissimilarity[i] == pytest.approx(d, abs=1e-5)
                exact = np.linalg.norm(enc.embed(patch[None]) - enc.embed(np.stack([r.patch for r in
                                                                                  result.references])), axis=1).min()
                assert abs(result.dissimilarity[i] - exact) < 2e-3  # the rounding's whole effect

    def test_torch_threads_are_restored_and_the_device_logged(self, area_raster, tiny_model):
        before = torch.get_num_threads()
        log = Log()
        result = run_search(SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, stride_m=250,
                                         model=tiny_model, device="cpu", batch_size=16), feedback=log)
        assert torch.get_num_threads() == before
        # One encoder thread per core (up to 4), the cores shared out between them.
        workers = result.extra["encoder_threads"]
        assert workers == min(before, 4) and result.extra["torch_threads"] == max(1, before // workers)
        assert any("encoding with" in line for line in log.lines)
        assert any(line.startswith("Device: cpu (") for line in log.lines)
        assert any("block reads" in line for line in log.lines)

    def test_amp_is_ignored_on_cpu(self, area_raster, tiny_model):
        params = SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, model=tiny_model, device="cpu")
        plain = run_search(params)
        params.amp = True
        amp = run_search(params)
        assert amp.extra["precision"] == "fp32"
        assert np.array_equal(plain.dissimilarity, amp.dissimilarity, equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CPU-vs-GPU parity needs a CUDA GPU")
def test_gpu_matches_cpu_within_tolerance(area_raster, tiny_model):
    """float32 on CUDA within 5e-3 of the CPU (TF32 convolutions); amp within 3e-2, same best cells."""
    params = SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, stride_m=250, model=tiny_model,
                          device="cpu")
    cpu = run_search(params)
    params.device = "cuda"
    gpu = run_search(params)
    params.amp = True
    amp = run_search(params)
    assert gpu.device.startswith("cuda") and amp.extra["precision"].startswith("amp-")
    ok = cpu.scored
    assert np.array_equal(ok, gpu.scored) and np.array_equal(ok, amp.scored)
    assert np.abs(cpu.dissimilarity[ok] - gpu.dissimilarity[ok]).max() < 5e-3
    assert np.abs(cpu.dissimilarity[ok] - amp.dissimilarity[ok]).max() < 3e-2
    best = {c["id"] for c in cpu.best(5)}
    assert len(best & {c["id"] for c in amp.best(10)}) >= 4


def _ogr_cell_layer(path, grid, fields, cols, sites):
    """The cell layer written the plain OGR way: a feature at a time, each field set by name,
    a WKT polygon, OGR's own spatial index and extent; the best cells as points."""
    srs = osr.SpatialReference()
    srs.ImportFromWkt(grid.crs_wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    kinds = {"int": ogr.OFTInteger, "int64": ogr.OFTInteger64, "real": ogr.OFTReal, "str": ogr.OFTString}
    ds = ogr.GetDriverByName("GPKG").CreateDataSource(path)
    values = {**outputs._grid_columns(grid, slice(None)), **cols}
    for name, geom, index in (("cells", ogr.wkbPolygon, np.arange(len(grid))), ("analog_sites", ogr.wkbPoint, sites)):
        layer = ds.CreateLayer(name, srs, geom, options=["FID=fid"])
        for field, kind in fields:
            layer.CreateField(ogr.FieldDefn(field, kinds[kind]))
        layer.StartTransaction()
        for i in index:
            f = ogr.Feature(layer.GetLayerDefn())
            if geom == ogr.wkbPolygon:
                f.SetFID(int(grid.ids[i]))
            for field, _ in fields:
                outputs.set_field(f, field, values[field][i])
            x0, y0, x1, y1 = grid.bounds(int(i))
            wkt = (f"POLYGON(({x0!r} {y0!r},{x1!r} {y0!r},{x1!r} {y1!r},{x0!r} {y1!r},{x0!r} {y0!r}))"
                   if geom == ogr.wkbPolygon else f"POINT({(x0 + x1) / 2!r} {(y0 + y1) / 2!r})")
            f.SetGeometryDirectly(ogr.CreateGeometryFromWkt(wkt))
            layer.CreateFeature(f)
        layer.CommitTransaction()
    ds = None


def _sqlite_dump(path):
    """What a reader of the file finds: rows with their geometry bytes, the metadata tables, the
    R-tree, triggers and table definitions (the timestamps aside)."""
    con = sqlite3.connect(path)
    try:
        out = {t: sorted(con.execute(f'SELECT * FROM "{t}"')) for t in
               ("cells", "analog_sites", "rtree_cells_geom", "gpkg_ogr_contents", "gpkg_geometry_columns",
                "gpkg_extensions", "gpkg_spatial_ref_sys")}
        out["contents"] = sorted(con.execute("SELECT table_name, data_type, identifier, min_x, min_y, max_x, max_y, "
                                             "srs_id FROM gpkg_contents"))
        out["schema"] = sorted(con.execute("SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
    finally:
        con.close()
    return out


@pytest.mark.parametrize("index_with_layer", [True, False])
def test_sql_cell_writer_writes_the_file_ogr_writes(tmp_path, monkeypatch, index_with_layer):
    """Cells inserted with SQLite (geometry blobs built with NumPy) give the file OGR gives when
    it writes them a feature at a time: the same rows and geometry bytes, extent, feature count,
    spatial index and schema; NaN and None are NULL. Also when GDAL makes no R-tree with the
    layer (the index is then made at the end)."""
    if not index_with_layer:
        monkeypatch.setattr(outputs.CellLayerWriter, "LAYER_OPTIONS", ["FID=fid", "SPATIAL_INDEX=NO"])
    info, grid = plan_grid(SearchParams(str(SAMPLE_RASTER), None, cell_size_m=20000))
    n = len(grid)
    d = np.linspace(0, 1, n, dtype=np.float32)
    d[::3] = np.nan
    cols = {"dissimilarity": d, "rank": np.arange(n, dtype=np.int32), "percentile": d * 100,
            "status": np.where(np.isfinite(d), "scored", "nodata"), "valid_fraction": np.ones(n, np.float32),
            "reference": np.array(["a.png", None, ""] * n, dtype=object)[:n]}
    ours, theirs = str(tmp_path / "ours.gpkg"), str(tmp_path / "ogr.gpkg")
    outputs.write_cells_gpkg(ours, grid, cols, top_k=3)
    _ogr_cell_layer(theirs, grid, outputs.CELL_FIELDS, cols, outputs.best_cells(cols["rank"], 3))
    a, b = _sqlite_dump(ours), _sqlite_dump(theirs)
    assert len(a["cells"]) == n > 20 and len(a["rtree_cells_geom"]) == n and len(a["analog_sites"]) == 3
    assert any(v is None for row in a["cells"] for v in row)  # NULLs were written
    for key in a:
        assert a[key] == b[key], key


@pytest.mark.parametrize("normalisation", [{"mode": "per_patch"}, {"mode": "global", "mean": 0.41, "std": 0.2}])
def test_in_place_normalisation_is_the_encoders_to_the_bit(normalisation):
    """The pipeline normalises each batch in its own array; the values are normalise_patches' own."""
    from siamese_analog_plugin.engine.encoder import normalise_patches
    from siamese_analog_plugin.engine.search import normalise_in_place

    rng = np.random.default_rng(0)
    for n in (1, 7, 8, 9, 130):
        x = (rng.random((n, 100, 100)) ** rng.uniform(0.2, 5)).astype(np.float32) * rng.uniform(0.1, 3)
        x[0] = 0.5  # a flat patch: its standard deviation is floored
        expected = normalise_patches(x, normalisation)
        got = normalise_in_place(x, normalisation)
        assert got is x and np.array_equal(got, expected)
