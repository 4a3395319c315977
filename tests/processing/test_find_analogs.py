"""``siameseanalog:findanalogs`` on the real sample data, in a real QGIS."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ..conftest import SAMPLE_HIRISE, SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import AREA_BOX, FAST_CELL_M, UTM18, RecordingFeedback, box_wkt, leftovers, polygon_layer, raster_info

ALG = "siameseanalog:findanalogs"


def base_params(model: str, **extra) -> dict:
    params = {"INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": FAST_CELL_M,
              "MODEL": model, "DEVICE": "cpu", "OUTPUT_RASTER": "TEMPORARY_OUTPUT",
              "OUTPUT_CELLS": "TEMPORARY_OUTPUT"}
    params.update(extra)
    return params


def cells_of(path: str):
    from qgis.core import QgsVectorLayer

    layer = QgsVectorLayer(f"{path}|layername=cells", "cells", "ogr")
    assert layer.isValid()
    return layer


class TestWholeRaster:
    def test_outputs_crs_extent_counts_and_values(self, run_alg, tiny_model_path, feedback):
        res = run_alg(ALG, base_params(tiny_model_path))
        crs, extent, width, height, data = raster_info(res["OUTPUT_RASTER"])
        assert crs == "EPSG:32618"
        # 237 km x 215 km of imagery in 20 km cells: 11 columns, 10 rows, anchored top-left.
        assert (width, height) == (11, 10)
        assert extent.xMinimum() == pytest.approx(101985.0)
        assert extent.yMaximum() == pytest.approx(2826915.0)
        assert extent.width() == pytest.approx(11 * FAST_CELL_M)
        assert res["CELL_COUNT"] == 110
        cells = cells_of(res["OUTPUT_CELLS"])
        assert cells.featureCount() == 110
        assert cells.crs().authid() == "EPSG:32618"
        scored = [f["dissimilarity"] for f in cells.getFeatures() if f["status"] == "scored"]
        assert len(scored) == res["SCORED_COUNT"] > 50
        # The raster holds the same values as the cells, NaN (nodata) elsewhere.
        finite = data[np.isfinite(data)]
        assert finite.size == res["SCORED_COUNT"]
        assert np.allclose(np.sort(finite), np.sort(np.array(scored, dtype=float)), atol=1e-5)
        assert res["BEST_DISSIMILARITY"] == pytest.approx(finite.min(), abs=1e-5)
        # Ranks: 1..N over the scored cells, rank 1 the lowest dissimilarity.
        ranked = sorted((f["rank"], f["dissimilarity"]) for f in cells.getFeatures() if f["status"] == "scored")
        assert [r for r, _ in ranked] == list(range(1, len(scored) + 1))
        assert ranked[0][1] == pytest.approx(min(scored))

    def test_top_sites_output_and_log(self, run_alg, tiny_model_path, feedback):
        from qgis.core import QgsVectorLayer, QgsWkbTypes

        res = run_alg(ALG, base_params(tiny_model_path, TOP_K=4))
        sites = QgsVectorLayer(res["OUTPUT_SITES"], "sites", "ogr")
        assert sites.isValid()
        assert sites.geometryType() == QgsWkbTypes.PointGeometry
        assert sorted(f["rank"] for f in sites.getFeatures()) == [1, 2, 3, 4]
        # The log says the device used, the number of cells and the throughput.
        assert res["DEVICE_USED"] == "cpu"
        assert "Device used: cpu" in feedback.log
        assert "Cells: 110" in feedback.log
        assert "cells/s" in feedback.log
        assert res["CELLS_PER_SECOND"] > 0
        assert max(feedback.progress_values) == pytest.approx(100.0)


class TestArea:
    def test_area_polygon_limits_the_cells(self, run_alg, tiny_model_path):
        area = polygon_layer([box_wkt(*AREA_BOX)])
        res = run_alg(ALG, base_params(tiny_model_path, AREA=area))
        assert res["CELL_COUNT"] == 25  # 100 km square, 20 km cells
        crs, extent, width, height, _ = raster_info(res["OUTPUT_RASTER"])
        assert (width, height) == (5, 5)
        assert extent.xMinimum() == pytest.approx(AREA_BOX[0])
        assert extent.yMaximum() == pytest.approx(AREA_BOX[3])

    def test_selected_features_only(self, run_alg, tiny_model_path, qgis_new_project):
        from qgis.core import QgsProcessingFeatureSourceDefinition

        west = box_wkt(120000, 2700000, 160000, 2740000)  # 2 x 2 cells
        east = box_wkt(*AREA_BOX)  # 5 x 5 cells
        area = polygon_layer([west, east])
        qgis_new_project.addMapLayer(area)
        area.selectByIds([1])  # the west square only
        res = run_alg(ALG, base_params(tiny_model_path, AREA=QgsProcessingFeatureSourceDefinition(
            area.id(), selectedFeaturesOnly=True)))
        assert res["CELL_COUNT"] == 4
        _, extent, _, _, _ = raster_info(res["OUTPUT_RASTER"])
        assert extent.xMinimum() == pytest.approx(120000)
        # Unselected: both polygons' bounding box is searched, cells kept where inside.
        res_all = run_alg(ALG, base_params(tiny_model_path, AREA=area))
        assert res_all["CELL_COUNT"] == 4 + 25

    def test_area_in_another_crs(self, run_alg, tiny_model_path):
        from qgis.core import QgsCoordinateReferenceSystem, QgsCoordinateTransform, QgsGeometry, QgsProject

        geom = QgsGeometry.fromWkt(box_wkt(*AREA_BOX))
        geom.transform(QgsCoordinateTransform(QgsCoordinateReferenceSystem(UTM18),
                                              QgsCoordinateReferenceSystem("EPSG:4326"), QgsProject.instance()))
        area = polygon_layer([geom.asWkt()], crs="EPSG:4326")
        res = run_alg(ALG, base_params(tiny_model_path, AREA=area, MIN_COVERAGE=0.9))
        assert 16 <= res["CELL_COUNT"] <= 25


class TestReferencesAndReport:
    def test_raster_layer_references_and_html_report(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsRasterLayer

        refs = [QgsRasterLayer(str(p), p.stem) for p in SAMPLE_HIRISE]
        assert all(r.isValid() for r in refs)
        report = tmp_path / "report.html"
        res = run_alg(ALG, base_params(tiny_model_path, REFERENCE=refs, OUTPUT_REPORT=str(report), TOP_K=3,
                                       AREA=polygon_layer([box_wkt(*AREA_BOX)])))
        assert res["OUTPUT_REPORT"] == str(report)
        text = report.read_text(encoding="utf-8")
        assert "quartiles" in text.lower() and "median" in text
        # the histogram + for each of the 3 best sites a cell thumbnail and a reference thumbnail
        assert text.count("data:image/png;base64,") == 1 + 3 * 2
        cells = cells_of(res["OUTPUT_CELLS"])
        best = min((f for f in cells.getFeatures() if f["status"] == "scored"), key=lambda f: f["rank"])
        assert f"{best['lon']:.5f}" in text and f"{best['lat']:.5f}" in text
        used = {f["reference"] for f in cells.getFeatures() if f["status"] == "scored"}
        assert used <= {p.name for p in SAMPLE_HIRISE}

    def test_every_run_remembers_its_reference_and_warns_about_coarse_cells(self, run_alg, tiny_model_path,
                                                                          tmp_path, feedback):
        """Not only runs started from the drawing tool: the next search starts from this reference.
        20 km cells are 67 Landsat pixels (no pixel warning) but the imagery is 43 times coarser
        than the 7 m reference: the log and the report say so, and the reference is never opened
        as a vector ("[OGR] Cannot open")."""
        from qgis.core import QgsApplication

        from siamese_analog_plugin.gui.settings import clear_last_used, load_last_used

        clear_last_used()
        messages = []
        log = QgsApplication.messageLog()

        def record(message, tag, level):
            messages.append(f"[{tag}] {message}")

        log.messageReceived.connect(record)
        report = tmp_path / "r.html"
        try:
            run_alg(ALG, base_params(tiny_model_path, OUTPUT_REPORT=str(report), TOP_K=2))
            remembered = load_last_used()
        finally:
            log.messageReceived.disconnect(record)
            clear_last_used()
        assert remembered["REFERENCE"] == [str(SAMPLE_REFERENCE)]
        assert remembered["CELL_SIZE"] == FAST_CELL_M and remembered["DEVICE"] == "cpu"
        assert "times coarser than the Mars reference" in feedback.log
        assert "times coarser than the Mars reference" in report.read_text(encoding="utf-8")
        assert not [m for m in messages if "Cannot open" in m and SAMPLE_REFERENCE.name in m], messages

    def test_stride_overlaps_cells(self, run_alg, tiny_model_path):
        area = polygon_layer([box_wkt(*AREA_BOX)])
        res = run_alg(ALG, base_params(tiny_model_path, AREA=area, STRIDE=10000))
        assert res["CELL_COUNT"] == 9 * 9  # (100 - 20) / 10 + 1 positions a side


class TestBadInput:
    @pytest.mark.parametrize("change, words", [
        ({"REFERENCE": ["/nonexistent/mars.png"]}, "does not exist"),
        ({"CELL_SIZE": 100.0}, "smaller than one pixel"),
        ({"CELL_SIZE": 1_000_000.0}, "larger than the area"),
        ({"DEVICE": "cuda:7"}, "DEVICE"),  # not one of the choices (auto, cpu, cuda)
        ({"MODEL": "__GARBAGE__"}, "not a Siamese Analog Finder model"),
        ({"MODEL": "__RASTER__"}, "is not a model file (.onnx or .pt)"),
        ({"OUTPUT_CELLS": "__SHP__"}, ".gpkg"),
        ({"SCHEDULER": "somewhere"}, "Unknown scheduler"),
    ])
    def test_engine_errors_become_processing_exceptions(self, run_alg, tiny_model_path, tmp_path, change, words):
        from qgis.core import QgsProcessingException

        params = base_params(tiny_model_path, OUTPUT_RASTER=str(tmp_path / "d.tif"),
                             OUTPUT_CELLS=str(tmp_path / "c.gpkg"))
        garbage = tmp_path.parent / f"{tmp_path.name}-garbage.pt"
        garbage.write_bytes(b"this is not a model" * 10)
        special = {"__RASTER__": str(SAMPLE_RASTER), "__SHP__": str(tmp_path / "c.shp"), "__GARBAGE__": str(garbage)}
        for key, value in change.items():
            params[key] = special.get(value, value) if isinstance(value, str) else value
        with pytest.raises(QgsProcessingException) as err:
            run_alg(ALG, params)
        assert words in str(err.value)
        assert leftovers(tmp_path) == []

    def test_area_off_the_raster(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        area = polygon_layer([box_wkt(600000, 600000, 700000, 700000)])
        with pytest.raises(QgsProcessingException, match="does not overlap the raster"):
            run_alg(ALG, base_params(tiny_model_path, AREA=area, OUTPUT_RASTER=str(tmp_path / "d.tif"),
                                     OUTPUT_CELLS=str(tmp_path / "c.gpkg")))
        assert leftovers(tmp_path) == []

    def test_empty_selection(self, run_alg, tiny_model_path, qgis_new_project):
        from qgis.core import QgsProcessingException, QgsProcessingFeatureSourceDefinition

        area = polygon_layer([box_wkt(*AREA_BOX)])
        qgis_new_project.addMapLayer(area)
        area.removeSelection()
        with pytest.raises(QgsProcessingException):
            run_alg(ALG, base_params(tiny_model_path, AREA=QgsProcessingFeatureSourceDefinition(
                area.id(), selectedFeaturesOnly=True)))


class TestCancel:
    def test_cancel_leaves_nothing_and_qgis_keeps_running(self, run_alg, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        out = tmp_path / "out"
        out.mkdir()
        params = base_params(tiny_model_path, BATCH_SIZE=8, OUTPUT_RASTER=str(out / "d.tif"),
                             OUTPUT_CELLS=str(out / "c.gpkg"), OUTPUT_REPORT=str(out / "r.html"))
        fb = RecordingFeedback.make(cancel_after_progress=2)
        with pytest.raises(QgsProcessingException, match="cancelled"):
            run_alg(ALG, params, fb=fb)
        assert fb.isCanceled()
        assert 0 < len(fb.progress_values) < 110 / 8  # stopped early, not at the end
        assert leftovers(out) == []
        # QGIS and the provider are still usable: the same run completes afterwards.
        res = run_alg(ALG, params)
        assert sorted(leftovers(out)) == ["c.gpkg", "d.tif", "r.html"]
        assert res["CELL_COUNT"] == 110
        assert math.isfinite(res["BEST_DISSIMILARITY"])
