"""Embed once, query many: the embedding raster and the queries over it (search, similar,
fewshot-map, compare), each checked against the plain pipeline or an independent NumPy sum."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import rasterio
from affine import Affine

from siamese_analog_plugin.cli import main
from siamese_analog_plugin.engine.embed import EmbedParams, run_embed_area
from siamese_analog_plugin.engine.embeddings import (
    BLOCK,
    EmbeddingRaster,
    EmbeddingRasterWriter,
    embedding_facts,
    quantise,
)
from siamese_analog_plugin.engine.encoder import load_model
from siamese_analog_plugin.engine.errors import InputError, OutputError
from siamese_analog_plugin.engine.imagery import GreyReader
from siamese_analog_plugin.engine.queries import reference_columns
from siamese_analog_plugin.engine.search import SearchParams, run_search
from siamese_analog_plugin.engine.similar import SimilarParams, run_similar

from .conftest import SAMPLE_HIRISE, SAMPLE_REFERENCE, smooth_noise, write_raster


@pytest.fixture()
def area(tmp_path):
    """600 x 400 px RGB, 10 m, a nodata corner: 24 cells of 1 km (77 with a 500 m stride)."""
    grey = smooth_noise((400, 600), seed=5)
    grey[:150, :150] = 0
    rgb = np.stack([grey, grey, (grey * 0.8).astype(np.uint8)])
    return write_raster(tmp_path / "area.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)


@pytest.fixture()
def embedded(area, tiny_model, tmp_path):
    out = tmp_path / "emb.tif"
    run_embed_area(EmbedParams(area, cell_size_m=1000, stride_m=500, model=tiny_model, device="cpu", batch_size=8),
                   str(out))
    return str(out)


def read_layer(path, layer="cells"):
    from osgeo import ogr

    ds = ogr.Open(str(path))
    lyr = ds.GetLayerByName(layer)
    names = [lyr.GetLayerDefn().GetFieldDefn(i).GetName() for i in range(lyr.GetLayerDefn().GetFieldCount())]
    rows = [{n: f.GetField(n) for n in names} | {"wkt": f.GetGeometryRef().ExportToWkt()} for f in lyr]
    return rows


def test_half_precision_rounding_moves_a_dissimilarity_by_at_most_1e_3():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(2000, 32)).astype(np.float32)
    e /= np.linalg.norm(e, axis=1, keepdims=True)  # the encoder's embeddings are unit vectors
    q = quantise(e)
    assert np.all(np.abs(q - e) <= np.abs(e) * 2.0 ** -11 + 6e-8)  # half precision: 11 significant bits
    d = np.linalg.norm(e[:1000] - e[1000:], axis=1)
    dq = np.linalg.norm(q[:1000] - q[1000:], axis=1)
    assert np.abs(d - dq).max() < 1e-3
    assert np.array_equal(quantise(q), q)  # stored values round-trip exactly


class TestEmbeddingRaster:
    def test_lines_up_with_the_dissimilarity_raster(self, area, embedded, tiny_model, tmp_path):
        run_search(SearchParams(area, str(SAMPLE_REFERENCE), cell_size_m=1000, stride_m=500, model=tiny_model,
                                device="cpu", batch_size=8), str(tmp_path / "d.tif"), None)
        with rasterio.open(embedded) as e, rasterio.open(tmp_path / "d.tif") as d:
            assert e.transform == d.transform and e.crs == d.crs and e.shape == d.shape
            assert e.count == 8 + 1 and e.descriptions[-1] == "valid_fraction"
            assert e.profile["blockxsize"] == BLOCK and e.profile["tiled"]
        from osgeo import gdal

        ds = gdal.Open(embedded)
        assert ds.GetRasterBand(1).GetMetadataItem("NBITS", "IMAGE_STRUCTURE") == "16"  # half precision

    def test_holds_each_cells_embedding_and_metadata(self, area, embedded, tiny_model):
        emb = EmbeddingRaster.open(embedded)
        enc = load_model(tiny_model, "cpu")
        assert emb.facts.input_size == 100 and emb.facts.embedding_dim == 8 and emb.facts.band is None
        assert emb.facts.cell_size_m == 1000 and emb.facts.stride_m == 500 and emb.facts.min_valid == 0.5
        assert emb.facts.model.startswith("file:") and emb.facts.normalisation == enc.metadata.normalisation
        valid, e = emb.read_all()
        assert len(emb.grid) == 77 and e.shape == (77, 8)
        encoded = np.isfinite(e).all(1)
        assert 0 < encoded.sum() < 77  # the nodata corner is not encoded
        # Shares are kept to half precision: one just under 0.5 may read back as 0.5.
        assert (valid[encoded] >= 0.5).all() and (valid[~encoded] <= 0.5).all()
        with GreyReader(area) as reader:
            for i in np.nonzero(encoded)[0][:6]:
                patch, v = reader.read_bounds(emb.grid.bounds(int(i)), 100)
                assert np.allclose(e[i], quantise(enc.embed(patch[None]))[0], atol=1e-6)
                assert valid[i] == pytest.approx(v, abs=1e-3)

    def test_bad_inputs_are_named(self, area, embedded, tiny_model, tmp_path):
        with pytest.raises(InputError, match="not an embedding raster"):
            EmbeddingRaster.open(area)
        with pytest.raises(InputError, match="does not exist"):
            EmbeddingRaster.open(tmp_path / "none.tif")
        other = write_raster(tmp_path / "other.tif", smooth_noise((400, 600), seed=9), "EPSG:32618",
                             Affine(10, 0, 600000, 0, -10, 2700000))
        base = dict(references=str(SAMPLE_REFERENCE), embeddings=embedded, device="cpu")
        with pytest.raises(InputError, match="made from .*not"):
            run_search(SearchParams(other, **base))
        with pytest.raises(InputError, match="cell size of 1000 m, not 2000 m"):
            run_search(SearchParams(None, cell_size_m=2000, **base))
        with pytest.raises(InputError, match="made from the luminance of RGB .*, not band 2"):
            run_search(SearchParams(None, band=2, **base))
        from siamese_analog_plugin.engine.encoder import ModelMetadata, build_network, save_model

        net = build_network("compact", 100, embedding_dim=8, widths=(4, 8), pooling="meanstd")
        save_model(tmp_path / "other.pt", net, ModelMetadata("compact", 100, 8, {"widths": [4, 8],
                                                                                  "pooling": "meanstd"}))
        with pytest.raises(InputError, match="another model"):
            run_search(SearchParams(None, model=str(tmp_path / "other.pt"), **base))
        with pytest.raises(InputError, match="outside the embedding raster"):
            run_similar(SimilarParams(embedded, points=[(0.0, 0.0)], device="cpu"))
        with pytest.raises(InputError, match="not encoded"):
            run_similar(SimilarParams(embedded, cells=[1], device="cpu"))  # the nodata corner
        with pytest.raises(InputError, match="ids 1 to 77"):
            run_similar(SimilarParams(embedded, cells=[78], device="cpu"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["area.tif", "emb.tif", "other.pt", "other.tif"]

    def test_writer_needs_cells_in_grid_order(self, embedded, tmp_path):
        emb = EmbeddingRaster.open(embedded)
        w = EmbeddingRasterWriter(tmp_path / "w.tif", emb.grid, emb.facts)
        w.store(np.arange(0, 5), np.ones(5, np.float32), np.ones(5, bool), np.zeros((5, 8), np.float32))
        with pytest.raises(OutputError, match="out of order"):
            w.store(np.arange(7, 9), np.ones(2, np.float32), np.ones(2, bool), np.zeros((2, 8), np.float32))
        w.abort()


class TestQueries:
    def test_search_from_the_embeddings_equals_the_search_that_encodes(self, area, embedded, tiny_model, tmp_path):
        refs = [str(SAMPLE_REFERENCE), str(SAMPLE_HIRISE[0])]
        plain = run_search(SearchParams(area, refs, cell_size_m=1000, stride_m=500, model=tiny_model, device="cpu",
                                        batch_size=8), str(tmp_path / "a.tif"), str(tmp_path / "a.gpkg"))
        again = run_search(SearchParams(None, refs, embeddings=embedded, device="cpu"),
                           str(tmp_path / "b.tif"), str(tmp_path / "b.gpkg"))
        for name in ("dissimilarity", "valid_fraction", "nearest_reference", "rank", "percentile", "per_reference"):
            assert np.array_equal(getattr(plain, name), getattr(again, name), equal_nan=True), name
        with rasterio.open(tmp_path / "a.tif") as a, rasterio.open(tmp_path / "b.tif") as b:
            assert np.array_equal(a.read(), b.read())
        rows_a, rows_b = read_layer(tmp_path / "a.gpkg"), read_layer(tmp_path / "b.gpkg")
        assert rows_a == rows_b and "d_ganges_chasma_dunes_ctx_7m" in rows_a[0]

    def test_per_reference_columns_equal_numpy_distances(self, embedded, tiny_model, tmp_path):
        refs = [str(SAMPLE_REFERENCE), str(SAMPLE_HIRISE[0]), str(SAMPLE_HIRISE[1])]
        result = run_search(SearchParams(None, refs, embeddings=embedded, device="cpu"), None,
                            str(tmp_path / "c.gpkg"))
        _, e = EmbeddingRaster.open(embedded).read_all()
        enc = load_model(tiny_model, "cpu")
        r = quantise(enc.embed(np.stack([x.patch for x in result.references])))
        d = np.sqrt(((e[:, None, :].astype(np.float64) - r[None]) ** 2).sum(-1))
        assert np.allclose(result.per_reference, d, atol=1e-6, equal_nan=True)
        ok = np.isfinite(d).all(1)
        assert np.allclose(result.dissimilarity[ok], d[ok].min(1), atol=1e-6)
        assert np.isnan(result.dissimilarity[~ok]).all()
        rows = read_layer(tmp_path / "c.gpkg")
        cols = [c for c in rows[0] if c.startswith("d_")]
        assert len(cols) == 3

    def test_similar_to_a_cell_is_its_distance_in_numpy(self, embedded, tmp_path, capsys):
        src = EmbeddingRaster.open(embedded)
        _, e = src.read_all()
        target = int(np.nonzero(np.isfinite(e).all(1))[0][10])
        x, y = src.grid.centres([target])
        code = main(["similar", "--embeddings", embedded, "--point", str(x[0]), str(y[0]), "--quiet", "--top", "3",
                     "--out-raster", str(tmp_path / "s.tif"), "--out-cells", str(tmp_path / "s.gpkg")])
        assert code == 0 and f"cell {target + 1}" in capsys.readouterr().out
        d = np.linalg.norm(e.astype(np.float64) - e[target], axis=1)
        rows = {r["id"]: r for r in read_layer(tmp_path / "s.gpkg")}
        for i in range(len(src.grid)):
            got = rows[i + 1]["dissimilarity"]
            assert (got is None) == (not np.isfinite(d[i]))
            if got is not None:
                assert got == pytest.approx(d[i], abs=1e-6)
        assert rows[target + 1]["rank"] == 1 and rows[target + 1]["dissimilarity"] == 0
        # the same by id and in another CRS (lon/lat)
        by_id = run_similar(SimilarParams(embedded, cells=[target + 1], device="cpu"))
        from pyproj import Transformer

        lon, lat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True).transform(x[0], y[0])
        by_lonlat = run_similar(SimilarParams(embedded, points=[(lon, lat)], crs="EPSG:4326", device="cpu"))
        assert np.array_equal(by_id.dissimilarity, by_lonlat.dissimilarity, equal_nan=True)

    def test_fewshot_map_from_the_embeddings_equals_the_one_that_encodes(self, area, embedded, tiny_model, tmp_path):
        from siamese_analog_plugin.engine.landforms import FewShotParams, run_fewshot_map

        from .test_fewshot import make_class_folder

        make_class_folder(tmp_path / "support", {"stripes": 3, "speckle": 3}, seed=1)
        kw = dict(model=tiny_model, device="cpu", batch_size=8)
        plain = run_fewshot_map(FewShotParams(area, cell_size_m=1000, stride_m=500, **kw), str(tmp_path / "support"))
        again = run_fewshot_map(FewShotParams(area, embeddings=embedded, **kw), str(tmp_path / "support"),
                                str(tmp_path / "k.tif"), str(tmp_path / "k.gpkg"))
        for name in ("class_index", "cosine", "confidence", "margin", "valid_fraction"):
            assert np.array_equal(getattr(plain, name), getattr(again, name), equal_nan=True), name
        assert again.classified.sum() > 10

    def test_cache_entries_are_embedding_rasters(self, area, tiny_model, tmp_path):
        p = SearchParams(area, str(SAMPLE_REFERENCE), cell_size_m=1000, model=tiny_model, device="cpu",
                         cache_dir=str(tmp_path / "cache"))
        first = run_search(p)
        [entry] = list((tmp_path / "cache").iterdir())
        emb = EmbeddingRaster.open(entry)
        assert emb.facts.key() == entry.name.split(".")[0]
        second = run_search(p)
        assert (first.extra["cache"], second.extra["cache"]) == ("miss", "hit")
        assert np.array_equal(first.dissimilarity, second.dissimilarity, equal_nan=True)
        facts = embedding_facts(load_model(tiny_model, "cpu"), area, emb.grid, None, 0.5, 0.5)
        assert facts.key() == emb.facts.key()  # the grid rebuilt from the raster keys the same entry


class TestCompare:
    @pytest.fixture()
    def regions(self, tmp_path):
        """Three regions over the area (one in lon/lat) and one name on two polygons."""
        from pyproj import Transformer

        t = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)

        def ring(x0, y0, x1, y1):
            return [list(t.transform(x, y)) for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))]

        feats = [("west", ring(600000, 2696000, 602600, 2700000)), ("east", ring(603000, 2696000, 606000, 2699000)),
                 ("south", ring(600500, 2696000, 601500, 2697000)), ("south", ring(604000, 2696000, 605000, 2697000))]
        path = tmp_path / "regions.geojson"
        path.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"name": n}, "geometry": {"type": "Polygon", "coordinates": [r]}}
            for n, r in feats]}))
        return str(path)

    def test_csv_equals_the_regions_statistics_of_a_plain_search(self, area, regions, tiny_model, tmp_path):
        from shapely import wkt

        from siamese_analog_plugin.engine.compare import read_regions
        from siamese_analog_plugin.engine.geo import reproject_geometry

        refs = [str(SAMPLE_REFERENCE), str(SAMPLE_HIRISE[0])]
        code = main(["compare", "--raster", area, "--regions", regions, "--name-field", "name", "--reference", *refs,
                     "--cell-size", "500", "--model", tiny_model, "--device", "cpu", "--quiet",
                     "--out-csv", str(tmp_path / "m.csv"), "--out-html", str(tmp_path / "m.html")])
        assert code == 0
        table = list(csv.DictReader(open(tmp_path / "m.csv")))
        assert [r["region"] for r in table] == ["west", "west", "east", "east", "south", "south"]
        # The independent way: a plain search over the whole raster at the same cells, its cell layer
        # read back, each region's cells picked by their centre.
        run_search(SearchParams(area, refs, cell_size_m=500, model=tiny_model, device="cpu"), None,
                   str(tmp_path / "all.gpkg"))
        cells = read_layer(tmp_path / "all.gpkg")
        found, crs = read_regions(regions, "name")
        for region in found:
            geom = reproject_geometry(region.geometry, crs, "EPSG:32618")
            inside = [c for c in cells if geom.contains(wkt.loads(c["wkt"]).centroid)]
            for ref, col in zip(refs, reference_columns([r.rsplit("/", 1)[-1] for r in refs])):
                row = next(r for r in table if r["region"] == region.name and r["reference"].startswith(
                    ref.rsplit("/", 1)[-1]))
                v = np.array([c[col] for c in inside if c[col] is not None])
                assert int(row["cells"]) == v.size > 0
                q = np.percentile(v, [0, 25, 50, 75, 100])
                got = [float(row[k]) for k in ("min", "q1", "median", "q3", "max")]
                assert got == pytest.approx(q, abs=2e-6)
                best = inside[int(np.argmin([c[col] if c[col] is not None else np.inf for c in inside]))]
                assert float(row["best_lon"]) == pytest.approx(best["lon"], abs=1e-6)
        page = (tmp_path / "m.html").read_text()
        assert "data:image/png;base64," in page and "<td>west</td>" in page

    def test_from_an_embedding_raster_gives_the_same_table(self, area, regions, tiny_model, embedded, tmp_path):
        run_embed_area(EmbedParams(area, cell_size_m=500, model=tiny_model, device="cpu"), str(tmp_path / "e5.tif"))
        args = ["compare", "--regions", regions, "--name-field", "name", "--reference", str(SAMPLE_REFERENCE),
                "--quiet"]
        assert main(args + ["--embeddings", str(tmp_path / "e5.tif"), "--out-csv", str(tmp_path / "a.csv")]) == 0
        assert main(args + ["--raster", area, "--cell-size", "500", "--model", tiny_model, "--device", "cpu",
                            "--out-csv", str(tmp_path / "b.csv")]) == 0
        a = list(csv.DictReader(open(tmp_path / "a.csv")))
        b = list(csv.DictReader(open(tmp_path / "b.csv")))
        # The embedding raster covers the whole raster; the plain run only the regions: same cells
        # where their grids agree (same origin here), so the same numbers.
        assert [r["region"] for r in a] == [r["region"] for r in b]
        for ra, rb in zip(a, b):
            assert float(ra["min"]) == pytest.approx(float(rb["min"]), abs=1e-6)

    def test_bad_regions_are_named_and_nothing_is_written(self, area, regions, tiny_model, tmp_path, capsys):
        base = ["compare", "--raster", area, "--regions", regions, "--reference", str(SAMPLE_REFERENCE),
                "--cell-size", "500", "--model", tiny_model, "--device", "cpu", "--out-csv", str(tmp_path / "x.csv")]
        assert main(base + ["--name-field", "title"]) == 1
        err = capsys.readouterr().err
        assert "no field 'title'" in err and "name" in err and err.count("\n") == 1
        far = tmp_path / "far.geojson"
        sahara = {"type": "Polygon", "coordinates": [[[5, 20], [6, 20], [6, 21], [5, 20]]]}
        far.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "properties": {"name": "Sahara"}, "geometry": sahara}]}))
        assert main(base[:4] + [str(far)] + base[5:] + ["--name-field", "name"]) == 1
        assert "'Sahara' does not overlap" in capsys.readouterr().err
        assert not (tmp_path / "x.csv").exists() and not list(tmp_path.glob(".*partial*"))


class TestReopening:
    """Embedding rasters reopen wherever and however they were made (review findings)."""

    def test_a_geographic_raster_and_an_irregular_area_reopen_with_their_grid(self, geographic_raster, utm_raster,
                                                                           tiny_model, tmp_path):
        from shapely.geometry import Polygon

        from siamese_analog_plugin.engine.grid import Area

        made = run_embed_area(EmbedParams(geographic_raster, cell_size_m=300, stride_m=170, model=tiny_model,
                                          device="cpu"), str(tmp_path / "geo.tif"))
        again = EmbeddingRaster.open(tmp_path / "geo.tif").grid
        assert (again.n_rows, again.n_cols, len(again)) == (made.grid.n_rows, made.grid.n_cols, len(made.grid))
        assert np.array_equal(again.lon, made.grid.lon) and again.cell_w == made.grid.cell_w
        # A quadrilateral whose left corner lies in the margin no cell reaches.
        quad = Area(Polygon([(499000, 8500), (501500, 9950), (501900, 8100), (500100, 8050)]), "EPSG:32633")
        made = run_embed_area(EmbedParams(utm_raster, area=quad, cell_size_m=150, model=tiny_model, device="cpu"),
                              str(tmp_path / "quad.tif"))
        again = EmbeddingRaster.open(tmp_path / "quad.tif").grid
        assert len(again) == len(made.grid) and (again.origin_x, again.origin_y) == (made.grid.origin_x,
                                                                                     made.grid.origin_y)
        assert np.array_equal(again.coverage, made.grid.coverage)

    def test_a_relative_model_path_is_kept_whole(self, area, tiny_model, tmp_path, monkeypatch):
        import shutil

        shutil.copy(tiny_model, tmp_path / "tiny.pt")
        monkeypatch.chdir(tmp_path)
        run_embed_area(EmbedParams(area, cell_size_m=1000, model="tiny.pt", device="cpu"), "emb.tif")
        assert EmbeddingRaster.open("emb.tif").facts.model_path == str(tmp_path / "tiny.pt")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        monkeypatch.chdir(elsewhere)
        result = run_similar(SimilarParams(str(tmp_path / "emb.tif"), cells=[10], device="cpu"))
        assert result.scored.sum() > 5

    def test_mixed_precision_is_in_the_key_not_in_the_model(self, embedded):
        from dataclasses import replace

        facts = EmbeddingRaster.open(embedded).facts
        amp = replace(facts, precision="amp-bfloat16")
        assert amp.key() != facts.key() and amp.model == facts.model  # a query's model check still passes

    def test_a_looser_nodata_limit_than_the_embeddings_is_refused(self, embedded):
        with pytest.raises(InputError, match="at most 50% nodata, not 80%"):
            run_search(SearchParams(None, str(SAMPLE_REFERENCE), embeddings=embedded, max_nodata=0.8, device="cpu"))
        with pytest.raises(InputError, match="at most 50% nodata"):
            run_similar(SimilarParams(embedded, cells=[40], max_nodata=0.8, device="cpu"))

    def test_similar_checks_its_output_formats(self, embedded, tmp_path, capsys):
        code = main(["similar", "--embeddings", embedded, "--cells", "40", "--out-raster", str(tmp_path / "s.tif"),
                     "--out-cells", str(tmp_path / "s.shp")])
        err = capsys.readouterr().err
        assert code == 1 and "GeoPackage" in err and err.count("\n") == 1
        assert not (tmp_path / "s.shp").exists() and not (tmp_path / "s.tif").exists()
