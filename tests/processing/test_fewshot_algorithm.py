"""``siameseanalog:fewshotlandforms`` in a real QGIS: labelled points -> styled landform map."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from ..engine.conftest import write_raster
from ..engine.test_fewshot import make_class_folder, speckle, stripes
from .conftest import RecordingFeedback, leftovers

ALG = "siameseanalog:fewshotlandforms"
UTM33 = "EPSG:32633"


@pytest.fixture()
def two_textures(tmp_path):
    """UTM 33N, 10 m pixels, 400 x 200 px: stripes in the west half, speckle in the east."""
    rng = np.random.default_rng(5)
    img = np.zeros((200, 400), np.uint8)
    img[:, :200] = stripes(200, rng)[:, :200]
    img[:, 200:] = speckle(200, rng)
    return write_raster(tmp_path / "two.tif", img, UTM33, Affine(10, 0, 500000, 0, -10, 10000))


def labelled_points(points: list[tuple[float, float, str | None]], crs: str = UTM33):
    """A memory point layer with a ``landform`` field."""
    from qgis.core import QgsFeature, QgsGeometry, QgsPointXY, QgsVectorLayer

    layer = QgsVectorLayer(f"Point?crs={crs}&field=landform:string", "examples", "memory")
    feats = []
    for x, y, cls in points:
        f = QgsFeature(layer.fields())
        f.setAttribute("landform", cls)
        f.setGeometry(QgsGeometry.fromPointXY(QgsPointXY(x, y)))
        feats.append(f)
    assert layer.dataProvider().addFeatures(feats)[0]
    layer.updateExtents()
    return layer


def wgs84_examples():
    """One example per half, given in EPSG:4326 (reprojected by the engine), plus one unlabelled point."""
    from pyproj import Transformer

    tr = Transformer.from_crs(UTM33, "EPSG:4326", always_xy=True)
    pts = [(*tr.transform(500500, 9000), "stripes"), (*tr.transform(503500, 9000), "speckle"),
           (*tr.transform(501000, 9000), None)]
    return labelled_points(pts, "EPSG:4326")


def params(raster: str, model: str, tmp_path, **extra) -> dict:
    p = {"INPUT": raster, "CELL_SIZE": 400, "MODEL": model, "DEVICE": "cpu",
         "OUTPUT_RASTER": str(tmp_path / "classes.tif"), "OUTPUT_CELLS": str(tmp_path / "cells.gpkg")}
    p.update(extra)
    return p


class TestFewShotLandforms:
    def test_labelled_points_give_a_map_loaded_with_one_colour_per_class(self, analog_provider, two_textures,
                                                                         tiny_model_path, tmp_path, feedback,
                                                                         qgis_new_project):
        import processing
        from qgis.core import (
            QgsCategorizedSymbolRenderer,
            QgsPalettedRasterRenderer,
            QgsProject,
            QgsRasterLayer,
            QgsVectorLayer,
        )

        from siamese_analog_plugin.engine.classes import class_colours

        examples = wgs84_examples()
        QgsProject.instance().addMapLayer(examples)
        res = processing.runAndLoadResults(ALG, params(two_textures, tiny_model_path, tmp_path,
                                                       EXAMPLES=examples.id(), CLASS_FIELD="landform"),
                                           feedback=feedback)
        assert res["CLASSES"] == "speckle,stripes"
        assert res["CELL_COUNT"] == 50 and res["CLASSIFIED_COUNT"] == 50
        assert "Labelled examples: speckle 1, stripes 1" in feedback.log

        cells = QgsVectorLayer(f"{tmp_path / 'cells.gpkg'}|layername=cells", "c", "ogr")
        by_half = {"west": [], "east": []}
        for f in cells.getFeatures():
            x = f.geometry().centroid().asPoint().x()
            by_half["west" if x < 502000 else "east"].append(f["class"])
            assert 0 < f["confidence"] <= 1 and -1 <= f["cosine"] <= 1
        assert by_half["west"].count("stripes") >= 0.9 * len(by_half["west"])
        assert by_half["east"].count("speckle") >= 0.9 * len(by_half["east"])

        # Both outputs were loaded into the project and styled on the main thread.
        loaded = [ly for ly in QgsProject.instance().mapLayers().values() if ly.id() != examples.id()]
        raster = next(ly for ly in loaded if isinstance(ly, QgsRasterLayer))
        vector = next(ly for ly in loaded if isinstance(ly, QgsVectorLayer))
        assert isinstance(raster.renderer(), QgsPalettedRasterRenderer)
        classes = raster.renderer().classes()
        assert [(c.value, c.label) for c in classes] == [(1, "speckle"), (2, "stripes")]
        assert classes[0].color.getRgb()[:3] == class_colours(2)[0]
        renderer = vector.renderer()
        assert isinstance(renderer, QgsCategorizedSymbolRenderer) and renderer.classAttribute() == "class"
        categories = renderer.categories()  # keep the copies alive while their symbols are read
        assert [c.value() for c in categories] == ["speckle", "stripes"]
        assert categories[1].symbol().symbolLayer(0).strokeColor().getRgb()[:3] == class_colours(2)[1]
        assert vector.name() == "Landform cells" and raster.name() == "Landform classes"
        # The examples on top, then the cells' outlines, then the class raster.
        order = [node.layer().id() for node in QgsProject.instance().layerTreeRoot().findLayers()]
        assert order == [examples.id(), vector.id(), raster.id()]

    def test_example_image_folder_instead_of_a_layer(self, run_alg, two_textures, tiny_model_path, tmp_path):
        support = make_class_folder(tmp_path / "support", {"stripes": 2, "speckle": 2}, seed=3)
        res = run_alg(ALG, params(two_textures, tiny_model_path, tmp_path, SUPPORT_FOLDER=str(support)))
        assert res["CLASSES"] == "speckle,stripes" and res["CLASSIFIED_COUNT"] == 50

    def test_a_mars_raster_without_a_model_gets_the_mars_landform_model(self, run_alg, tmp_path):
        from ..engine.test_fewshot import MARS_EQC

        rng = np.random.default_rng(5)
        img = np.concatenate([stripes(200, rng)[:, :200], speckle(200, rng)[:, :200]], axis=1)
        mars = write_raster(tmp_path / "mars.tif", np.maximum(img, 1).astype(np.uint8), MARS_EQC,
                            Affine(10, 0, 500000, 0, -10, 10000))
        support = make_class_folder(tmp_path / "support", {"stripes": 2, "speckle": 2}, seed=3)
        fb = RecordingFeedback.make()
        res = run_alg(ALG, {**params(mars, "", tmp_path, SUPPORT_FOLDER=str(support)), "MODEL": None}, fb)
        assert res["CLASSES"] == "speckle,stripes"
        assert any("siamese_compact_mars" in line and "Mars landform model" in line for line in fb.infos)

    @pytest.mark.parametrize("key, name, match", [("OUTPUT_RASTER", "classes.png", "class raster is written as a "
                                                                                  "GeoTIFF.*ending in .tif"),
                                                  ("OUTPUT_CELLS", "cells.shp", "cells are written as a "
                                                                                "GeoPackage.*ending in .gpkg")])
    def test_other_output_formats_are_refused_with_the_fix(self, run_alg, two_textures, tiny_model_path, tmp_path,
                                                           key, name, match):
        from qgis.core import QgsProcessingException

        support = make_class_folder(tmp_path / "support", {"stripes": 2, "speckle": 2}, seed=3)
        with pytest.raises(QgsProcessingException, match=match):
            run_alg(ALG, params(two_textures, tiny_model_path, tmp_path, SUPPORT_FOLDER=str(support),
                                **{key: str(tmp_path / name)}))
        assert not (tmp_path / name).exists()

    def test_missing_class_field_is_explained(self, run_alg, two_textures, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        with pytest.raises(QgsProcessingException, match="class field"):
            run_alg(ALG, params(two_textures, tiny_model_path, tmp_path, EXAMPLES=wgs84_examples()))
        assert leftovers(tmp_path) == ["two.tif"]

    def test_one_class_only_is_refused_with_the_fix(self, run_alg, two_textures, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        layer = labelled_points([(500500, 9000, "stripes"), (501500, 9000, "stripes")])
        with pytest.raises(QgsProcessingException, match="same class.*Label a few cells of another landform"):
            run_alg(ALG, params(two_textures, tiny_model_path, tmp_path, EXAMPLES=layer, CLASS_FIELD="landform"))
        assert leftovers(tmp_path) == ["two.tif"]

    def test_cancel_leaves_no_partial_outputs(self, run_alg, two_textures, tiny_model_path, tmp_path):
        from qgis.core import QgsProcessingException

        fb = RecordingFeedback.make(cancel_after_progress=1)
        with pytest.raises(QgsProcessingException, match="cancelled"):
            run_alg(ALG, params(two_textures, tiny_model_path, tmp_path, EXAMPLES=wgs84_examples(),
                                CLASS_FIELD="landform", BATCH_SIZE=8), fb=fb)
        assert leftovers(tmp_path) == ["two.tif"]
