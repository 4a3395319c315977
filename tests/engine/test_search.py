"""The search end to end: real rasters, a real (tiny) model, real GeoTIFF/GeoPackage outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from osgeo import ogr
from PIL import Image

from siamese_analog_plugin.engine.errors import InputError, OutputError, SearchCancelled
from siamese_analog_plugin.engine.feedback import Feedback
from siamese_analog_plugin.engine.outputs import NODATA, atomic_outputs
from siamese_analog_plugin.engine.search import SearchParams, rank_scores, run_search, score_embeddings

from .conftest import SAMPLE_HIRISE, SAMPLE_RASTER, SAMPLE_REFERENCE, smooth_noise, write_raster

PLANT_ROW, PLANT_COL = 1, 2


def stripes(size=100, period=9):
    x = np.arange(size)
    return ((np.sin(2 * np.pi * (x[None, :] + 0.6 * x[:, None]) / period) + 1) * 120).astype(np.uint8)


@pytest.fixture()
def planted(tmp_path):
    """UTM raster of smooth noise, 10 m pixels, with a stripe texture planted in cell (1, 2) of a
    1 km grid (exactly 100 x 100 px, so the read needs no resampling); and that texture as a PNG."""
    grey = smooth_noise((400, 600), seed=3)
    patch = stripes()
    grey[PLANT_ROW * 100:(PLANT_ROW + 1) * 100, PLANT_COL * 100:(PLANT_COL + 1) * 100] = patch
    raster = write_raster(tmp_path / "planted.tif", np.stack([grey] * 3), "EPSG:32618",
                          Affine(10, 0, 600000, 0, -10, 2700000))
    ref = tmp_path / "refs" / "stripes.png"
    ref.parent.mkdir()
    Image.fromarray(patch).save(ref)
    return raster, str(ref)


def read_cells(path):
    ds = ogr.Open(path)
    layer = ds.GetLayerByName("cells")
    rows = []
    for f in layer:
        item = {k: f.GetField(k) for k in ("id", "row", "col", "dissimilarity", "rank", "percentile", "lon", "lat",
                                           "status")}
        item["centroid"] = f.GetGeometryRef().Centroid().GetPoints()[0]
        rows.append(item)
    return rows, layer.GetSpatialRef().ExportToWkt(), [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]


class TestPlantedPatch:
    def test_planted_patch_is_the_best_cell(self, planted, tiny_model, tmp_path):
        raster, ref = planted
        params = SearchParams(raster, ref, cell_size_m=1000, model=tiny_model, device="cpu", batch_size=7)
        result = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
        best = result.best(2)
        assert (best[0]["row"], best[0]["col"]) == (PLANT_ROW, PLANT_COL)
        assert best[0]["dissimilarity"] < 1e-3 < best[1]["dissimilarity"]
        assert best[0]["rank"] == 1 and best[0]["percentile"] == 0.0
        assert len(result.grid) == 24 and result.scored.all()

    def test_outputs_line_up_with_the_grid(self, planted, tiny_model, tmp_path):
        raster, ref = planted
        params = SearchParams(raster, ref, cell_size_m=1000, model=tiny_model, device="cpu")
        result = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
        with rasterio.open(tmp_path / "d.tif") as ds, rasterio.open(raster) as src:
            assert ds.crs == src.crs
            assert ds.transform == Affine(1000, 0, 600000, 0, -1000, 2700000)
            assert (ds.width, ds.height) == (6, 4)
            assert ds.dtypes[0] == "float32" and ds.nodata == NODATA
            values = ds.read(1)
        cells, wkt, layers = read_cells(str(tmp_path / "c.gpkg"))
        assert layers == ["cells", "analog_sites"]
        assert rasterio.crs.CRS.from_wkt(wkt) == rasterio.crs.CRS.from_epsg(32618)
        assert len(cells) == len(result.grid) == 24
        inverse = ~Affine(1000, 0, 600000, 0, -1000, 2700000)
        for c in cells:
            col, row = (int(v) for v in inverse * c["centroid"])
            assert (row, col) == (c["row"], c["col"])
            assert values[row, col] == pytest.approx(c["dissimilarity"], abs=1e-6)
        assert sorted(c["rank"] for c in cells) == list(range(1, 25))
        best = min(cells, key=lambda c: c["rank"])
        assert (best["row"], best["col"]) == (PLANT_ROW, PLANT_COL)
        assert best["lon"] == pytest.approx(result.grid.lon[best["id"] - 1])


class TestNodata:
    def test_mostly_nodata_cells_are_skipped_and_marked(self, tmp_path, tiny_model, planted):
        grey = np.maximum(smooth_noise((200, 400), seed=4), 1)  # 0 is the nodata value
        grey[:, :150] = 0  # left 1.5 km is nodata
        raster = write_raster(tmp_path / "nd.tif", grey, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000),
                              nodata=0)
        params = SearchParams(raster, planted[1], cell_size_m=1000, model=tiny_model, device="cpu")
        result = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
        # Columns 0 (all nodata) and 1 (half nodata: 50 % valid, at the 0.5 limit: kept) ...
        status = dict(zip(zip(result.grid.rows.tolist(), result.grid.cols.tolist()), result.status()))
        assert status[(0, 0)] == "nodata" and status[(1, 0)] == "nodata"
        assert status[(0, 1)] == "scored" and status[(0, 3)] == "scored"
        cells, _, _ = read_cells(str(tmp_path / "c.gpkg"))
        skipped = [c for c in cells if c["status"] == "nodata"]
        assert len(skipped) == 2 and all(c["dissimilarity"] is None and c["rank"] is None
                                         and c["percentile"] is None for c in skipped)
        with rasterio.open(tmp_path / "d.tif") as ds:
            assert (ds.read(1)[:, 0] == NODATA).all()

    def test_all_nodata_area_is_an_error(self, tmp_path, tiny_model, planted):
        raster = write_raster(tmp_path / "empty.tif", np.zeros((200, 200), np.uint8), "EPSG:32618",
                              Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)
        params = SearchParams(raster, planted[1], cell_size_m=1000, model=tiny_model, device="cpu")
        with pytest.raises(InputError, match="mostly nodata"):
            run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
        assert not (tmp_path / "d.tif").exists()


class TestReferences:
    def test_several_references_nearest_and_mean(self, planted, tiny_model, tmp_path):
        raster, ref = planted
        Image.fromarray(smooth_noise((100, 100), seed=9)).save(Path(ref).parent / "blobs.png")
        folder = str(Path(ref).parent)
        near = run_search(SearchParams(raster, folder, cell_size_m=1000, model=tiny_model, device="cpu"))
        assert len(near.references) == 2
        i = near.best(1)[0]["id"] - 1
        assert near.best(1)[0]["reference"] == "stripes.png"
        assert near.dissimilarity[i] < 1e-3
        mean = run_search(SearchParams(raster, folder, cell_size_m=1000, model=tiny_model, device="cpu",
                                       aggregate="mean"))
        assert mean.dissimilarity[i] > 1e-3  # the mean embedding is no longer the planted patch
        assert np.all(mean.nearest_reference[mean.scored] == 0)

    def test_empty_reference_folder(self, planted, tiny_model, tmp_path):
        (tmp_path / "empty").mkdir()
        with pytest.raises(InputError, match="holds no images"):
            run_search(SearchParams(planted[0], str(tmp_path / "empty"), cell_size_m=1000, model=tiny_model))

    def test_missing_reference(self, planted, tiny_model, tmp_path):
        with pytest.raises(InputError, match="reference image .* does not exist"):
            run_search(SearchParams(planted[0], str(tmp_path / "nope.png"), cell_size_m=1000, model=tiny_model))

    def test_default_cell_size_is_the_reference_ground_size_but_at_least_32_pixels(self, tiny_model, tmp_path):
        # Ganges Chasma CTX: 573 x 287 px at 7 m, Mars Sinusoidal -> a 287 px square = 2009 m,
        # only 6.7 pixels of the 300 m Landsat: the default keeps 32 pixels (9.6 km) instead.
        params = SearchParams(str(SAMPLE_RASTER), str(SAMPLE_REFERENCE), model=tiny_model, device="cpu",
                              max_nodata=0.99)
        result = run_search(params)
        assert result.references[0].ground_size_m == pytest.approx(287 * 7)
        assert result.grid.cell_size_m == pytest.approx(32 * 300.04, rel=1e-3)

    def test_reference_resolution_parameter_for_plain_images(self, planted, tiny_model):
        raster, ref = planted  # the PNG is 100 px; at 10 m/px it covers 1000 m
        result = run_search(SearchParams(raster, ref, model=tiny_model, reference_resolution_m=10))
        assert result.grid.cell_size_m == pytest.approx(1000)
        assert (result.best(1)[0]["row"], result.best(1)[0]["col"]) == (PLANT_ROW, PLANT_COL)


class TestBadInputAndOutputs:
    def test_missing_raster(self, planted, tiny_model, tmp_path):
        with pytest.raises(InputError, match="raster .* does not exist"):
            run_search(SearchParams(str(tmp_path / "nope.tif"), planted[1], cell_size_m=1000, model=tiny_model))

    def test_unreadable_raster(self, planted, tiny_model, tmp_path):
        bad = tmp_path / "bad.tif"
        bad.write_text("this is not a GeoTIFF")
        with pytest.raises(InputError, match="cannot be read as an image"):
            run_search(SearchParams(str(bad), planted[1], cell_size_m=1000, model=tiny_model))

    def test_corrupt_model(self, planted, tmp_path):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(b"\x00" * 100)
        from siamese_analog_plugin.engine.errors import ModelError

        with pytest.raises(ModelError, match="not a Siamese Analog Finder model"):
            run_search(SearchParams(planted[0], planted[1], cell_size_m=1000, model=str(bad)))

    def test_destination_folder_missing(self, planted, tiny_model, tmp_path):
        with pytest.raises(OutputError, match="does not exist"):
            run_search(SearchParams(planted[0], planted[1], cell_size_m=1000, model=tiny_model),
                       str(tmp_path / "no" / "d.tif"), str(tmp_path / "c.gpkg"))

    def test_destination_is_a_folder(self, planted, tiny_model, tmp_path):
        (tmp_path / "out.gpkg").mkdir()
        with pytest.raises(OutputError, match="is a folder"):
            run_search(SearchParams(planted[0], planted[1], cell_size_m=1000, model=tiny_model),
                       str(tmp_path / "d.tif"), str(tmp_path / "out.gpkg"))

    def test_cancel_leaves_nothing_and_keeps_old_results(self, planted, tiny_model, tmp_path):
        class CancelHalfway(Feedback):
            def __init__(self):
                self.seen = 0

            def progress(self, fraction, message=""):
                self.seen = fraction

            def cancelled(self):
                return self.seen >= 0.4

        old = tmp_path / "d.tif"
        old.write_bytes(b"previous result")
        params = SearchParams(planted[0], planted[1], cell_size_m=1000, model=tiny_model, batch_size=4)
        with pytest.raises(SearchCancelled):
            run_search(params, str(old), str(tmp_path / "c.gpkg"), CancelHalfway())
        assert old.read_bytes() == b"previous result"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.tif", "planted.tif", "refs"]

    def test_atomic_outputs_remove_everything_on_failure(self, tmp_path):
        keep = tmp_path / "b.gpkg"
        keep.write_text("old")
        with pytest.raises(RuntimeError):
            with atomic_outputs({"a": tmp_path / "a.tif", "b": keep}) as tmp:
                Path(tmp["a"]).write_text("half")
                raise RuntimeError("writer died")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b.gpkg"]
        assert keep.read_text() == "old"


class TestScoring:
    def test_euclidean_distance_to_nearest_and_mean(self):
        refs = np.array([[0.0, 0.0], [10.0, 0.0]], np.float32)
        emb = np.array([[3.0, 4.0], [9.0, 0.0]], np.float32)
        d, near = score_embeddings(emb, refs, "nearest")
        assert d.tolist() == pytest.approx([5.0, 1.0]) and near.tolist() == [0, 1]
        d, _ = score_embeddings(emb, refs, "mean")
        assert d.tolist() == pytest.approx([np.hypot(2, 4), 4.0])

    def test_rank_and_percentile(self):
        rank, pct = rank_scores(np.array([0.5, np.nan, 0.1, 0.9], np.float32))
        assert rank.tolist() == [2, 0, 1, 3]
        assert pct[[2, 0, 3]].tolist() == pytest.approx([0, 50, 100]) and np.isnan(pct[1])


@pytest.mark.slow
def test_real_sample_data(tiny_model, tmp_path):
    """The shipped Earth sample against a real HiRISE crop; outputs cover the input."""
    params = SearchParams(str(SAMPLE_RASTER), str(SAMPLE_HIRISE[0]), cell_size_m=12000, model=tiny_model,
                          device="cpu")
    result = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
    with rasterio.open(tmp_path / "d.tif") as out, rasterio.open(SAMPLE_RASTER) as src:
        assert out.crs == src.crs
        assert out.bounds.left == pytest.approx(src.bounds.left) and out.bounds.top == pytest.approx(src.bounds.top)
        assert out.bounds.right <= src.bounds.right + 1e-6 and out.bounds.bottom >= src.bounds.bottom - 1e-6
        assert (out.width, out.height) == (int(src.width * 300 // 12000), int(src.height * 300 // 12000))
    assert result.scored.sum() > 50
    assert -80 < result.grid.lon.min() < result.grid.lon.max() < -75  # the Bahamas
    assert 23 < result.grid.lat.min() < result.grid.lat.max() < 26


class TestDefaultCellSize:
    """The shipped pair: a 2 km CTX reference against 300 m Landsat (6.7 pixels a cell)."""

    def test_keeps_at_least_32_imagery_pixels_and_warns(self):
        from siamese_analog_plugin.engine.imagery import describe_raster, load_references
        from siamese_analog_plugin.engine.search import MIN_CELL_PIXELS, default_cell_size_m, scale_warnings

        root = Path(__file__).resolve().parents[2] / "resources"
        info = describe_raster(str(root / "earth" / "landsat_bahamas_rgb_300m.tif"))
        refs = load_references([str(root / "mars" / "ganges_chasma_dunes_ctx_7m.tif")], 100)
        assert refs[0].ground_size_m < 10 * 300  # the reference alone would give cells of ~7 pixels
        size, why = default_cell_size_m(info, refs)
        assert size == pytest.approx(MIN_CELL_PIXELS * 300.04, rel=1e-3) and "32 imagery pixels" in why
        assert not [w for w in scale_warnings(info, size, refs) if "pixels of the imagery" in w]
        few = scale_warnings(info, refs[0].ground_size_m, refs)
        assert any("spans only 6.7 pixels" in w for w in few)
        assert any("times coarser than the Mars reference" in w for w in few)
