"""Embed once, query many in Processing: Embed area, EMBEDDINGS / KEEP_EMBEDDINGS, Compare regions."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from ..conftest import ROOT, SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import FAST_CELL_M, UTM18, box_wkt, polygon_layer, raster_info

REGIONS = ROOT / "resources" / "earth" / "bahamas_regions.geojson"
SECOND_REFERENCE = sorted((ROOT / "resources" / "mars").glob("hirise_*.jpg"))[0]
CSV_COLUMNS = ["region", "reference", "min", "q1", "median", "q3", "max", "best_lon", "best_lat", "cells"]


@pytest.fixture
def embedded(run_alg, tiny_model_path, tmp_path):
    """The sample raster embedded in 20 km cells (110 cells) with the tiny model."""
    out = str(tmp_path / "emb.tif")
    res = run_alg("siameseanalog:embedarea", {"INPUT": str(SAMPLE_RASTER), "CELL_SIZE": FAST_CELL_M,
                                              "MODEL": tiny_model_path, "DEVICE": "cpu", "OUTPUT": out})
    return res


def search_params(model: str, tmp_path, name: str, **extra) -> dict:
    params = {"INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": FAST_CELL_M,
              "MODEL": model, "DEVICE": "cpu", "OUTPUT_RASTER": str(tmp_path / f"{name}.tif"),
              "OUTPUT_CELLS": str(tmp_path / f"{name}.gpkg")}
    params.update(extra)
    return params


class TestEmbedArea:
    def test_writes_an_embedding_raster_on_the_cell_grid(self, embedded, tiny_model_path):
        from siamese_analog_plugin.embedding_layers import is_embedding_raster
        from siamese_analog_plugin.engine.embeddings import EmbeddingRaster

        assert embedded["CELL_COUNT"] == 110
        assert 50 < embedded["ENCODED_COUNT"] <= 110
        assert embedded["DEVICE_USED"] == "cpu"
        source = EmbeddingRaster.open(embedded["OUTPUT"])
        assert source.facts.embedding_dim == 8
        assert source.facts.cell_size_m == FAST_CELL_M
        assert (source.grid.n_rows, source.grid.n_cols) == (10, 11)
        assert is_embedding_raster(embedded["OUTPUT"])
        assert not is_embedding_raster(str(SAMPLE_RASTER))

    def test_area_limits_the_cells(self, run_alg, tiny_model_path, tmp_path):
        area = polygon_layer([box_wkt(180000.0, 2680000.0, 280000.0, 2780000.0)])
        res = run_alg("siameseanalog:embedarea", {"INPUT": str(SAMPLE_RASTER), "AREA": area, "CELL_SIZE": FAST_CELL_M,
                                                  "MODEL": tiny_model_path, "DEVICE": "cpu",
                                                  "OUTPUT": str(tmp_path / "a.tif")})
        assert res["CELL_COUNT"] == 25

    def test_loaded_layer_is_drawn_as_rgb_and_remembered(self, embedded, qgis_iface):
        from qgis.core import QgsMultiBandColorRenderer, QgsProcessingContext, QgsProject, QgsRasterLayer

        from siamese_analog_plugin.embedding_layers import forget_embeddings, last_embeddings
        from siamese_analog_plugin.processing.embed_area import EmbeddingsStyler

        forget_embeddings()
        layer = QgsRasterLayer(embedded["OUTPUT"], "emb")
        EmbeddingsStyler.create().postProcessLayer(layer, QgsProcessingContext(), None)
        renderer = layer.renderer()
        assert isinstance(renderer, QgsMultiBandColorRenderer)
        assert (renderer.redBand(), renderer.greenBand(), renderer.blueBand()) == (1, 2, 3)
        assert renderer.redContrastEnhancement().maximumValue() > renderer.redContrastEnhancement().minimumValue()
        assert layer.name() == "Cell embeddings"
        assert last_embeddings() == embedded["OUTPUT"]
        forget_embeddings()
        QgsProject.instance().removeAllMapLayers()


class TestFindAnalogsWithEmbeddings:
    def test_same_dissimilarity_raster_as_encoding(self, run_alg, embedded, tiny_model_path, tmp_path):
        plain = run_alg("siameseanalog:findanalogs", search_params(tiny_model_path, tmp_path, "plain"))
        # No MODEL: the embedding raster's own model is used.
        params = search_params(tiny_model_path, tmp_path, "from_emb", EMBEDDINGS=embedded["OUTPUT"])
        del params["MODEL"]
        from_emb = run_alg("siameseanalog:findanalogs", params)
        _, extent_a, w_a, h_a, a = raster_info(plain["OUTPUT_RASTER"])
        _, extent_b, w_b, h_b, b = raster_info(from_emb["OUTPUT_RASTER"])
        assert (w_a, h_a) == (w_b, h_b) == (11, 10)
        assert extent_a == extent_b
        assert np.array_equal(np.isnan(a), np.isnan(b))
        assert np.allclose(a[np.isfinite(a)], b[np.isfinite(b)], atol=1e-6)
        assert from_emb["SCORED_COUNT"] == plain["SCORED_COUNT"]

    def test_keep_embeddings_writes_the_same_embeddings(self, run_alg, embedded, tiny_model_path, tmp_path):
        from siamese_analog_plugin.engine.embeddings import EmbeddingRaster

        keep = str(tmp_path / "kept.tif")
        res = run_alg("siameseanalog:findanalogs", search_params(tiny_model_path, tmp_path, "k", KEEP_EMBEDDINGS=keep))
        assert res["KEEP_EMBEDDINGS"] == keep
        kept_valid, kept = EmbeddingRaster.open(keep).read_all()
        valid, emb = EmbeddingRaster.open(embedded["OUTPUT"]).read_all()
        assert np.array_equal(np.isnan(kept), np.isnan(emb))
        assert np.allclose(kept[np.isfinite(kept)], emb[np.isfinite(emb)], atol=1e-6)

    def test_embeddings_of_another_raster_are_refused(self, run_alg, embedded, tiny_model_path, tmp_path):
        from osgeo import gdal
        from qgis.core import QgsProcessingException

        other = str(tmp_path / "other.tif")
        gdal.Translate(other, str(SAMPLE_RASTER))
        params = search_params(tiny_model_path, tmp_path, "bad", EMBEDDINGS=embedded["OUTPUT"], INPUT=other)
        with pytest.raises(QgsProcessingException) as err:
            run_alg("siameseanalog:findanalogs", params)
        message = str(err.value)
        assert "was made from" in message and "other.tif" in message
        assert "\n" not in message
        assert not (tmp_path / "bad.tif").exists()

    def test_a_file_that_is_no_embedding_raster_is_refused(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        params = search_params(tiny_model_path, tmp_path, "bad", EMBEDDINGS=str(SAMPLE_RASTER))
        with pytest.raises(QgsProcessingException, match="is not an embedding raster"):
            run_alg("siameseanalog:findanalogs", params)


class TestFewShotWithEmbeddings:
    def test_same_classes_as_encoding(self, run_alg, embedded, tiny_model_path, tmp_path):
        from qgis.core import QgsFeature, QgsGeometry, QgsPointXY, QgsVectorLayer

        examples = QgsVectorLayer(f"Point?crs={UTM18}&field=landform:string", "examples", "memory")
        feats = []
        for name, (x, y) in (("bank", (160000.0, 2700000.0)), ("deep", (300000.0, 2780000.0)),
                             ("bank", (200000.0, 2640000.0))):
            f = QgsFeature(examples.fields())
            f.setAttribute("landform", name)
            f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
            feats.append(f)
        examples.dataProvider().addFeatures(feats)
        common = {"INPUT": str(SAMPLE_RASTER), "EXAMPLES": examples, "CLASS_FIELD": "landform",
                  "CELL_SIZE": FAST_CELL_M, "MODEL": tiny_model_path, "DEVICE": "cpu"}
        plain = run_alg("siameseanalog:fewshotlandforms", {**common, "OUTPUT_RASTER": str(tmp_path / "p.tif"),
                                                           "OUTPUT_CELLS": str(tmp_path / "p.gpkg")})
        from_emb = run_alg("siameseanalog:fewshotlandforms", {**common, "EMBEDDINGS": embedded["OUTPUT"],
                                                              "OUTPUT_RASTER": str(tmp_path / "e.tif"),
                                                              "OUTPUT_CELLS": str(tmp_path / "e.gpkg")})
        assert from_emb["CLASSIFIED_COUNT"] == plain["CLASSIFIED_COUNT"] > 0
        a, b = raster_info(plain["OUTPUT_RASTER"])[4], raster_info(from_emb["OUTPUT_RASTER"])[4]
        assert np.array_equal(np.nan_to_num(a, nan=-1), np.nan_to_num(b, nan=-1))


class TestCompareRegions:
    def _params(self, tmp_path, model, **extra):
        params = {"INPUT": str(SAMPLE_RASTER), "REGIONS": str(REGIONS), "NAME_FIELD": "name",
                  "REFERENCE": [str(SAMPLE_REFERENCE), str(SECOND_REFERENCE)], "CELL_SIZE": FAST_CELL_M,
                  "MODEL": model, "DEVICE": "cpu", "OUTPUT_CSV": str(tmp_path / "table.csv"),
                  "OUTPUT_HTML": str(tmp_path / "table.html")}
        params.update(extra)
        return params

    @staticmethod
    def _region_names() -> list[str]:
        import json

        return sorted({f["properties"]["name"] for f in json.loads(REGIONS.read_text())["features"]})

    def _rows(self, path):
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            return reader.fieldnames, list(reader)

    def test_csv_has_a_row_per_region_and_reference(self, run_alg, tiny_model_path, tmp_path):
        res = run_alg("siameseanalog:compareregions", self._params(tmp_path, tiny_model_path))
        columns, rows = self._rows(res["OUTPUT_CSV"])
        assert columns == CSV_COLUMNS
        regions = self._region_names()
        refs = [SAMPLE_REFERENCE.name, SECOND_REFERENCE.name]
        assert res["REGION_COUNT"] == len(regions) and res["REFERENCE_COUNT"] == 2
        assert sorted((r["region"], r["reference"]) for r in rows) == sorted((g, f) for g in regions for f in refs)
        for row in rows:
            if int(row["cells"]):
                lo, q1, med, q3, hi = (float(row[k]) for k in ("min", "q1", "median", "q3", "max"))
                assert lo <= q1 <= med <= q3 <= hi
                assert -80 < float(row["best_lon"]) < -70 and 20 < float(row["best_lat"]) < 28
        html = (tmp_path / "table.html").read_text()
        assert "data:image/png;base64," in html and regions[0] in html

    def test_from_embeddings_only_gives_the_same_table(self, run_alg, tiny_model_path, tmp_path):
        # The regions' own grid: their union as the area, as the comparison cuts it.
        emb = run_alg("siameseanalog:embedarea", {"INPUT": str(SAMPLE_RASTER), "AREA": str(REGIONS),
                                                  "CELL_SIZE": FAST_CELL_M, "MODEL": tiny_model_path,
                                                  "DEVICE": "cpu", "OUTPUT": str(tmp_path / "regions_emb.tif")})
        plain = run_alg("siameseanalog:compareregions", self._params(tmp_path, tiny_model_path))
        params = self._params(tmp_path, tiny_model_path, EMBEDDINGS=emb["OUTPUT"],
                              OUTPUT_CSV=str(tmp_path / "emb.csv"), OUTPUT_HTML=str(tmp_path / "emb.html"))
        del params["INPUT"], params["MODEL"], params["CELL_SIZE"]
        from_emb = run_alg("siameseanalog:compareregions", params)
        assert self._rows(plain["OUTPUT_CSV"]) == self._rows(from_emb["OUTPUT_CSV"])

    def test_memory_region_layer_is_read(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsFeature, QgsGeometry, QgsVectorLayer

        layer = QgsVectorLayer(f"Polygon?crs={UTM18}&field=label:string", "regions", "memory")
        feats = []
        for name, box in (("west", (120000.0, 2650000.0, 200000.0, 2780000.0)),
                          ("east", (220000.0, 2650000.0, 330000.0, 2780000.0))):
            f = QgsFeature(layer.fields())
            f.setAttribute("label", name)
            f.setGeometry(QgsGeometry.fromWkt(box_wkt(*box)))
            feats.append(f)
        layer.dataProvider().addFeatures(feats)
        res = run_alg("siameseanalog:compareregions", self._params(
            tmp_path, tiny_model_path, REGIONS=layer, NAME_FIELD="label", REFERENCE=[str(SAMPLE_REFERENCE)]))
        _, rows = self._rows(res["OUTPUT_CSV"])
        assert sorted(r["region"] for r in rows) == ["east", "west"]
        assert all(int(r["cells"]) > 0 for r in rows)

    def test_bad_name_field_is_the_engines_one_line_message(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        with pytest.raises(QgsProcessingException) as err:
            run_alg("siameseanalog:compareregions", self._params(tmp_path, tiny_model_path, NAME_FIELD="nom"))
        message = str(err.value)
        assert "has no field 'nom'" in message and "name" in message
        assert "\n" not in message
        assert not (tmp_path / "table.csv").exists()

    def test_embeddings_of_another_raster_are_refused(self, run_alg, embedded, tiny_model_path, tmp_path):
        from osgeo import gdal
        from qgis.core import QgsProcessingException

        other = str(tmp_path / "copy.tif")
        gdal.Translate(other, str(SAMPLE_RASTER))
        params = self._params(tmp_path, tiny_model_path, INPUT=other, EMBEDDINGS=embedded["OUTPUT"])
        del params["CELL_SIZE"]
        with pytest.raises(QgsProcessingException) as err:
            run_alg("siameseanalog:compareregions", params)
        assert "was made from" in str(err.value) and "\n" not in str(err.value)
        assert not (tmp_path / "table.csv").exists()

    def test_report_is_an_html_output_for_the_results_viewer(self, analog_provider):
        from qgis.core import QgsApplication

        alg = QgsApplication.processingRegistry().createAlgorithmById("siameseanalog:compareregions")
        assert alg.outputDefinition("OUTPUT_HTML").type() == "outputHtml"
        assert alg.parameterDefinition("NAME_FIELD").parentLayerParameterName() == "REGIONS"

    def test_neither_imagery_nor_embeddings_is_refused(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        params = self._params(tmp_path, tiny_model_path)
        del params["INPUT"]
        with pytest.raises(QgsProcessingException, match="Give the Earth imagery"):
            run_alg("siameseanalog:compareregions", params)


class TestLoadedResults:
    def test_kept_embeddings_load_styled_and_results_point_to_them(self, analog_provider, tiny_model_path,
                                                                   qgis_new_project, tmp_path):
        """As the toolbox runs it: results still styled, tagged with their embedding raster, which is remembered."""
        import processing
        from qgis.core import QgsMultiBandColorRenderer, QgsSingleBandPseudoColorRenderer

        from siamese_analog_plugin.embedding_layers import (
            EMBEDDINGS_LAYER_NAME,
            EMBEDDINGS_PROPERTY,
            forget_embeddings,
            last_embeddings,
        )
        from siamese_analog_plugin.styles import CELLS_LAYER_NAME, RASTER_LAYER_NAME

        forget_embeddings()
        keep = str(tmp_path / "kept.tif")
        try:
            processing.runAndLoadResults("siameseanalog:findanalogs", {
                **search_params(tiny_model_path, tmp_path, "loaded"), "KEEP_EMBEDDINGS": keep})
            layers = {layer.name(): layer for layer in qgis_new_project.mapLayers().values()}
            assert {RASTER_LAYER_NAME, CELLS_LAYER_NAME, EMBEDDINGS_LAYER_NAME} <= set(layers)
            assert isinstance(layers[RASTER_LAYER_NAME].renderer(), QgsSingleBandPseudoColorRenderer)
            assert isinstance(layers[EMBEDDINGS_LAYER_NAME].renderer(), QgsMultiBandColorRenderer)
            for name in (RASTER_LAYER_NAME, CELLS_LAYER_NAME):
                assert layers[name].customProperty(EMBEDDINGS_PROPERTY) == keep
            assert last_embeddings() == keep
        finally:
            forget_embeddings()
            qgis_new_project.removeAllMapLayers()
