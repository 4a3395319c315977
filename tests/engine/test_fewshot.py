"""Few-shot landform mapping: the cosine classifier, support sets, folder classification,
area mapping and the k-shot evaluation, on real files and a real (tiny) torch model."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from affine import Affine
from shapely.geometry import Point, box

from siamese_analog_plugin.cli import build_parser
from siamese_analog_plugin.engine.classes import CosineClassifier, class_colours
from siamese_analog_plugin.engine.classify import classify_folder
from siamese_analog_plugin.engine.errors import InputError, OutputError
from siamese_analog_plugin.engine.landforms import CLASS_NODATA, FewShotParams, run_fewshot_map
from siamese_analog_plugin.engine.support import (
    LabelledFeatures,
    SupportSet,
    load_labelled_folder,
    read_labelled_features,
    support_from_features,
)
from siamese_analog_plugin.learning.fewshot_eval import evaluate_fewshot, parse_transfer_models
from siamese_analog_plugin.learning.splits import HeldOutSplit, split_files

from .conftest import write_raster


# -- synthetic textures -------------------------------------------------------------------------
def stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    """Vertical stripes (period 6-10 px, random phase), a little noise: uint8."""
    x = np.arange(size)
    period, phase = rng.uniform(6, 10), rng.uniform(0, 2 * np.pi)
    row = 0.5 + 0.4 * np.sin(2 * np.pi * x / period + phase)
    img = np.tile(row, (size, 1)) + rng.normal(0, 0.03, (size, size))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def speckle(size: int, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise: uint8."""
    return rng.integers(0, 256, (size, size)).astype(np.uint8)


def blobs(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth blobs (8 px), uint8."""
    small = rng.random((size // 8 + 2, size // 8 + 2))
    return (np.kron(small, np.ones((8, 8)))[:size, :size] * 255).astype(np.uint8)


MAKERS = {"stripes": stripes, "speckle": speckle, "blobs": blobs}


def write_png(path, img: np.ndarray) -> None:
    import rasterio

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="PNG", width=img.shape[1], height=img.shape[0], count=1,
                       dtype="uint8") as dst:
        dst.write(img[None])


def make_class_folder(root, per_class: dict[str, int], seed: int = 0, size: int = 64, prefix: str = "img"):
    """``root/<class>/<prefix>_<i>.png`` synthetic texture images."""
    rng = np.random.default_rng(seed)
    for cls, n in per_class.items():
        for i in range(n):
            write_png(root / cls / f"{prefix}_{cls}_{i}.png", MAKERS[cls](size, rng))
    return root


# -- the classifier -----------------------------------------------------------------------------
class TestCosineClassifier:
    def test_prototypes_are_normalised_means_of_normalised_embeddings(self):
        emb = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [-1.0, -1.0]])
        clf = CosineClassifier.fit(emb, np.array([0, 0, 1, 1]), ["a", "b"])
        # class a: mean of (1,0) and (0,1) = (.5,.5) -> (0.7071, 0.7071)
        # class b: mean of (0,-1) and (-.7071,-.7071) = (-.3536, -.8536) -> normalised
        b = np.array([-0.35355339, -0.85355339])
        assert clf.prototypes[0] == pytest.approx([0.70710678, 0.70710678], abs=1e-6)
        assert clf.prototypes[1] == pytest.approx(b / np.linalg.norm(b), abs=1e-6)

    def test_prediction_cosine_confidence_and_margin(self):
        clf = CosineClassifier(["x", "y", "z"], np.eye(3), scale=10.0)
        pred = clf.predict(np.array([[2.0, 1.0, 0.0], [0.1, 1.0, -1.0]]))
        assert list(pred.index) == [0, 1]
        c = np.array([2, 1, 0]) / np.sqrt(5)
        assert pred.cosine[0] == pytest.approx(c[0])
        assert pred.margin[0] == pytest.approx(c[0] - c[1])
        softmax = np.exp(10 * c) / np.exp(10 * c).sum()
        assert pred.confidence[0] == pytest.approx(softmax[0], rel=1e-5)
        assert pred.cosines.shape == (2, 3)

    def test_only_the_direction_of_an_embedding_matters(self):
        rng = np.random.default_rng(0)
        clf = CosineClassifier.fit(rng.normal(size=(6, 4)), np.array([0, 0, 1, 1, 2, 2]), ["a", "b", "c"])
        q = rng.normal(size=(20, 4))
        a, b = clf.predict(q), clf.predict(q * 7.5)
        assert (a.index == b.index).all() and np.allclose(a.cosine, b.cosine, atol=1e-6)

    def test_a_class_without_examples_is_named(self):
        with pytest.raises(InputError, match="'b' has no usable example"):
            CosineClassifier.fit(np.ones((2, 3)), np.array([0, 0]), ["a", "b"])

    def test_round_trip_through_json(self):
        clf = CosineClassifier(["a", "b"], np.array([[1.0, 2.0], [3.0, -1.0]]), scale=7.0)
        back = CosineClassifier.from_dict(json.loads(json.dumps(clf.to_dict())))
        assert back.class_names == ["a", "b"] and back.scale == 7.0
        assert np.allclose(back.prototypes, clf.prototypes, atol=1e-6)

    def test_colours_are_distinct_for_many_classes(self):
        colours = class_colours(30)
        assert len(set(colours)) == 30 and all(0 <= v <= 255 for c in colours for v in c)


# -- support sets from folders --------------------------------------------------------------------
class TestLabelledFolder:
    def test_loads_every_class_in_order(self, tmp_path):
        make_class_folder(tmp_path / "s", {"stripes": 2, "speckle": 3})
        s = load_labelled_folder(tmp_path / "s", 32)
        assert s.class_names == ["speckle", "stripes"]
        assert s.counts() == {"speckle": 3, "stripes": 2}
        assert s.patches.shape == (5, 32, 32) and 0 <= s.patches.min() and s.patches.max() <= 1

    def test_a_single_class_is_refused(self, tmp_path):
        make_class_folder(tmp_path / "s", {"stripes": 2})
        with pytest.raises(InputError, match="single class"):
            load_labelled_folder(tmp_path / "s", 32)

    def test_images_without_class_folders_are_refused(self, tmp_path):
        write_png(tmp_path / "s" / "a.png", np.zeros((8, 8), np.uint8))
        with pytest.raises(InputError, match="no class folders"):
            load_labelled_folder(tmp_path / "s", 32)


# -- the fewshot command --------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


class TestClassifyFolder:
    def test_separates_two_textures_and_writes_the_csv(self, tiny_model, tmp_path, capsys):
        make_class_folder(tmp_path / "support", {"stripes": 3, "speckle": 3}, seed=1)
        make_class_folder(tmp_path / "query", {"stripes": 6, "speckle": 6}, seed=2, prefix="q")
        out = tmp_path / "pred.csv"
        assert run_cli(["fewshot", "--support", str(tmp_path / "support"), "--query", str(tmp_path / "query"),
                        "--out", str(out), "--model", tiny_model, "--device", "cpu", "--quiet"]) == 0
        rows = list(csv.DictReader(out.open()))
        assert len(rows) == 12
        assert set(rows[0]) == {"path", "predicted", "cosine", "confidence", "margin", "cos_speckle", "cos_stripes"}
        assert all(r["path"].split("/")[0] == r["predicted"] for r in rows)  # query/<class>/... is the truth
        for r in rows:
            assert float(r["cosine"]) == pytest.approx(float(r[f"cos_{r['predicted']}"]), abs=1e-5)
            assert 0.5 <= float(r["confidence"]) <= 1 and float(r["margin"]) >= 0
        assert "Accuracy against the query sub-folder names: 100.0 %" in capsys.readouterr().out

    def test_missing_query_folder_is_named_and_nothing_written(self, tiny_model, tmp_path):
        make_class_folder(tmp_path / "support", {"stripes": 1, "speckle": 1})
        with pytest.raises(InputError, match="query folder"):
            classify_folder(tmp_path / "support", tmp_path / "nope", tiny_model, "cpu")
        assert not (tmp_path / "pred.csv").exists()


# -- mapping an area ------------------------------------------------------------------------------
@pytest.fixture()
def two_texture_raster(tmp_path):
    """UTM 33N, 10 m pixels, 400 x 200 px: west half stripes, east half speckle; a nodata strip
    of 40 px along the bottom of the east half."""
    rng = np.random.default_rng(5)
    img = np.zeros((200, 400), np.uint8)
    img[:, :200] = stripes(200, rng)[:, :200]
    img[:, 200:] = speckle(200, rng)
    img = np.where(img == 0, 1, img).astype(np.uint8)
    img[160:, 200:] = 0
    return write_raster(tmp_path / "two.tif", img, "EPSG:32633", Affine(10, 0, 500000, 0, -10, 10000), nodata=0)


def labelled_points_wgs84():
    """One point in each half, given in EPSG:4326 (so they must be reprojected)."""
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    west = Point(*tr.transform(500500, 9000))
    east = Point(*tr.transform(503500, 9000))
    return LabelledFeatures([(west, "stripes"), (east, "speckle")], "EPSG:4326")


class TestFewShotMap:
    def test_maps_both_halves_and_writes_styled_outputs(self, tiny_model, two_texture_raster, tmp_path):
        from osgeo import gdal, ogr

        out_tif, out_gpkg = tmp_path / "classes.tif", tmp_path / "cells.gpkg"
        params = FewShotParams(two_texture_raster, cell_size_m=400, model=tiny_model, device="cpu")
        res = run_fewshot_map(params, labelled_points_wgs84(), str(out_tif), str(out_gpkg))
        assert res.class_names == ["speckle", "stripes"]
        assert res.support_counts == {"speckle": 1, "stripes": 1}
        g = res.grid
        assert (g.n_rows, g.n_cols) == (5, 10)
        cx, _ = g.centres()
        names = np.array(res.class_names + [""])[res.class_index]
        west, east = cx < 502000, cx > 502000
        assert (names[west] == "stripes").mean() >= 0.9
        scored_east = east & res.classified
        assert (names[scored_east] == "speckle").mean() >= 0.9
        # the bottom row of the east half is all nodata: not classified
        assert not res.classified[(g.rows == 4) & east].any()
        assert np.isnan(res.cosine[~res.classified]).all()

        ds = gdal.Open(str(out_tif))
        band = ds.GetRasterBand(1)
        data = band.ReadAsArray()
        assert band.DataType == gdal.GDT_Byte and band.GetNoDataValue() == CLASS_NODATA
        assert band.GetCategoryNames()[1:] == ["speckle", "stripes"]
        assert band.GetColorTable().GetColorEntry(1)[:3] == class_colours(2)[0]
        assert (data[g.rows, g.cols] == np.where(res.classified, res.class_index + 1, 0)).all()
        ds = None

        src = ogr.Open(str(out_gpkg))
        layer = src.GetLayerByName("cells")
        assert layer.GetFeatureCount() == len(g)
        feats = {f.GetFID(): f for f in layer}
        i = int(np.nonzero(res.classified)[0][0])
        f = feats[int(g.ids[i])]
        assert f.GetField("class") == res.class_names[res.class_index[i]]
        assert f.GetField("cosine") == pytest.approx(float(res.cosine[i]), abs=1e-6)
        assert f.GetField("confidence") == pytest.approx(float(res.confidence[i]), abs=1e-6)
        j = int(np.nonzero(~res.classified)[0][0])
        assert feats[int(g.ids[j])].GetField("status") == "nodata" and feats[int(g.ids[j])].IsFieldNull("class")

    def test_polygon_examples_give_the_cells_inside_them(self, tiny_model, two_texture_raster):
        feats = LabelledFeatures([(box(500000, 8400, 501200, 10000), "stripes"),
                                  (Point(503500, 9000), "speckle")], "EPSG:32633")
        support = support_from_features(two_texture_raster, feats, 400, 100)
        # 1200 m x 1600 m polygon with 400 m cells: 3 x 4 cells, plus one point
        assert support.counts() == {"speckle": 1, "stripes": 12}

    def test_examples_read_from_a_vector_file(self, two_texture_raster, tmp_path):
        from osgeo import ogr, osr

        path = tmp_path / "labels.gpkg"
        srs = osr.SpatialReference()
        srs.ImportFromEPSG(32633)
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(path))
        lyr = ds.CreateLayer("labels", srs, ogr.wkbPoint)
        lyr.CreateField(ogr.FieldDefn("landform", ogr.OFTString))
        for x, c in ((500500, "stripes"), (503500, "speckle"), (501000, None)):
            f = ogr.Feature(lyr.GetLayerDefn())
            if c:
                f.SetField("landform", c)
            f.SetGeometry(ogr.CreateGeometryFromWkt(f"POINT({x} 9000)"))
            lyr.CreateFeature(f)
        ds = None
        feats = read_labelled_features(path, "landform")
        assert sorted(c for _, c in feats.items) == ["speckle", "stripes"]  # the unlabelled point is skipped
        with pytest.raises(InputError, match="no field 'kind'"):
            read_labelled_features(path, "kind")

    def test_a_class_labelled_only_over_nodata_fails_and_writes_nothing(self, tiny_model, two_texture_raster,
                                                                        tmp_path):
        feats = LabelledFeatures([(Point(500500, 9000), "stripes"), (Point(503500, 8300), "speckle")],
                                 "EPSG:32633")
        params = FewShotParams(two_texture_raster, cell_size_m=400, model=tiny_model, device="cpu")
        with pytest.raises(InputError, match="'speckle' lies off the raster or over nodata"):
            run_fewshot_map(params, feats, str(tmp_path / "c.tif"), str(tmp_path / "c.gpkg"))
        assert not list(tmp_path.glob("c.*")) and not list(tmp_path.glob(".c*"))

    def test_a_single_labelled_class_is_refused(self, two_texture_raster):
        feats = LabelledFeatures([(Point(500500, 9000), "stripes")], "EPSG:32633")
        with pytest.raises(InputError, match="same class"):
            support_from_features(two_texture_raster, feats, 400, 100)

    def test_cells_must_go_to_a_geopackage(self, tiny_model, two_texture_raster, tmp_path):
        params = FewShotParams(two_texture_raster, cell_size_m=400, model=tiny_model, device="cpu")
        with pytest.raises(OutputError, match="GeoPackage"):
            run_fewshot_map(params, labelled_points_wgs84(), None, str(tmp_path / "cells.shp"))

    def test_command_from_support_folder(self, tiny_model, two_texture_raster, tmp_path, capsys):
        make_class_folder(tmp_path / "support", {"stripes": 2, "speckle": 2}, seed=3)
        assert run_cli(["fewshot-map", "--raster", two_texture_raster, "--support", str(tmp_path / "support"),
                        "--cell-size", "400", "--model", tiny_model, "--device", "cpu", "--quiet",
                        "--out-raster", str(tmp_path / "m.tif"), "--out-cells", str(tmp_path / "m.gpkg")]) == 0
        out = capsys.readouterr().out
        assert "Classified 45 of 50 cells" in out and "stripes" in out
        assert (tmp_path / "m.tif").exists() and (tmp_path / "m.gpkg").exists()


# -- the held-out split and the evaluation ---------------------------------------------------------
class TestSplitAndEvaluation:
    def test_without_a_split_file_whole_scenes_are_held_out_in_every_class(self, tmp_path):
        root = tmp_path / "hirise"
        for cls, scenes in (("crater", range(0, 20)), ("dark_dune", range(20, 25))):
            for scene in scenes:
                for crop in range(3):
                    write_png(root / cls / f"ESP_{scene:06d}_1234_RED-{crop:04d}.jpg", np.zeros((4, 4), np.uint8))
        split = HeldOutSplit(None, "by scene")
        test = split_files(root, None, "test", split)
        train = split_files(root, None, "train", split)
        for cls in ("crater", "dark_dune"):
            assert test[cls] and train[cls]  # every class on both sides
            test_scenes = {p.name.split("-")[0] for p in test[cls]}
            train_scenes = {p.name.split("-")[0] for p in train[cls]}
            assert not test_scenes & train_scenes  # never a scene on both sides
        assert 6 <= len(test["crater"]) <= 21  # about 20 % of 60 crops, whole scenes of 3
        assert split_files(root, ["crater"], "test", split)["crater"] == test["crater"]  # independent of the classes

    def test_split_json_of_the_train_command_is_honoured(self, tmp_path):
        make_class_folder(tmp_path / "data", {"stripes": 3, "speckle": 3})
        split_file = tmp_path / "m.split.json"
        split_file.write_text(json.dumps({"data_root": str(tmp_path / "data"), "seed": 4,
                                          "held_out": ["stripes/img_stripes_0.png", "speckle/img_speckle_2.png"]}))
        model = tmp_path / "m.pt"  # found beside the model, as the train command writes it
        split = HeldOutSplit.load(model=model)
        test = split_files(tmp_path / "data", None, "test", split)
        train = split_files(tmp_path / "data", None, "train", split)
        assert {c: [p.name for p in v] for c, v in test.items()} == {"speckle": ["img_speckle_2.png"],
                                                                      "stripes": ["img_stripes_0.png"]}
        assert sum(len(v) for v in train.values()) == 4

    def test_split_json_keys_match_a_data_folder_anywhere(self, tmp_path):
        # The train command writes keys relative to the project's data folder ("shared/data"); the
        # same images in another folder on another machine are still recognised as held out.
        folder = make_class_folder(tmp_path / "elsewhere" / "mars" / "hirise_landmarks", {"stripes": 3, "speckle": 3})
        split_file = tmp_path / "m.split.json"
        split_file.write_text(json.dumps({"data_root": "shared/data", "seed": 0, "held_out": [
            "mars/hirise_landmarks/stripes/img_stripes_1.png", "mars/hirise_landmarks/speckle/img_speckle_0.png",
            "earth/dune_fields/site/scene_test.jpg#0,0,150"]}))
        split = HeldOutSplit.load(split_file)
        test = split_files(folder, None, "test", split)
        assert {c: [p.name for p in v] for c, v in test.items()} == {"stripes": ["img_stripes_1.png"],
                                                                      "speckle": ["img_speckle_0.png"]}
        assert split.part_of(folder / "stripes" / "img_stripes_0.png") == "train"
        # A file of the same name in a folder of another name is not a held-out image.
        other = make_class_folder(tmp_path / "other_set", {"stripes": 3})
        assert split_files(other, None, "test", split) == {"stripes": []}

    def test_kshot_evaluation_reports_every_method_and_k(self, tiny_model, tmp_path):
        data = make_class_folder(tmp_path / "data", {"stripes": 8, "speckle": 8, "blobs": 8})
        everything = {str(p.resolve()) for p in data.rglob("*.png")}
        report = evaluate_fewshot({"synthetic": (str(data), None)}, {"encoder": tiny_model}, shots=(1, 3), draws=2,
                                  max_per_class=8, adapt_steps=5, split=HeldOutSplit(everything, "all"))
        methods = {(r["method"], r["k"]) for r in report["results"]}
        assert methods == {(m, k) for m in ("encoder", "texture baseline", "encoder+adapt") for k in (1, 3)}
        for r in report["results"]:
            assert len(r["accuracies"]) == 2 and 0 <= r["mean"] <= 1
            assert r["std"] == pytest.approx(np.std(r["accuracies"]))
        texture3 = next(r for r in report["results"] if r["method"] == "texture baseline" and r["k"] == 3)
        assert texture3["mean"] > 0.9  # stripes, speckle and blobs are trivially told apart by texture
        assert report["facts"]["datasets"]["synthetic"]["images"] == {"blobs": 8, "speckle": 8, "stripes": 8}

    def test_a_transfer_model_per_dataset_scores_only_its_dataset(self, tiny_model, tmp_path):
        a = make_class_folder(tmp_path / "a", {"stripes": 5, "speckle": 5})
        b = make_class_folder(tmp_path / "b", {"stripes": 5, "blobs": 5})
        everything = {str(p.resolve()) for p in tmp_path.rglob("*.png")}
        models = {"encoder": tiny_model, "stepwise transfer": parse_transfer_models(["A=" + tiny_model], ["A", "B"])}
        report = evaluate_fewshot({"A": (str(a), None), "B": (str(b), None)}, models, shots=(1,), draws=2,
                                  max_per_class=5, texture=False, split=HeldOutSplit(everything, "all"))
        rows = {(r["dataset"], r["method"]) for r in report["results"]}
        assert rows == {("A", "encoder"), ("A", "stepwise transfer"), ("B", "encoder")}
        assert set(report["facts"]["models"]) == {"encoder", "stepwise transfer (A)"}
        # The same weights give the same accuracies on the same draws.
        acc = {(r["dataset"], r["method"]): r["accuracies"] for r in report["results"]}
        assert acc["A", "encoder"] == acc["A", "stepwise transfer"]

    def test_transfer_model_arguments(self):
        assert parse_transfer_models(["m.pt"], ["HiRISE", "AID"]) == "m.pt"
        assert parse_transfer_models(["HiRISE=h.pt", "AID=a.pt"], ["HiRISE", "AID"]) == {"HiRISE": "h.pt",
                                                                                           "AID": "a.pt"}
        with pytest.raises(InputError, match="name each one's dataset"):
            parse_transfer_models(["h.pt", "a.pt"], ["HiRISE", "AID"])
        with pytest.raises(InputError, match="'Moon', which is not evaluated"):
            parse_transfer_models(["Moon=m.pt"], ["HiRISE", "AID"])


def test_support_set_counts():
    s = SupportSet(np.zeros((3, 2, 2), np.float32), np.array([1, 1, 0]), ["a", "b"])
    assert s.counts() == {"a": 1, "b": 2}


MARS_EQC = ('PROJCS["Mars equirectangular",GEOGCS["Mars 2000",DATUM["D_Mars_2000",SPHEROID["Mars_2000_IAU_IAG",'
            '3396190,169.894447223612]],PRIMEM["Reference_Meridian",0],UNIT["degree",0.0174532925199433]],'
            'PROJECTION["Equirectangular"],PARAMETER["standard_parallel_1",0],PARAMETER["central_meridian",0],'
            'PARAMETER["false_easting",0],PARAMETER["false_northing",0],UNIT["metre",1]]')


class TestLandformModelByPlanet:
    """Without a model file, a landform map of a Mars raster uses the shipped Mars landform model
    (models/siamese_compact_mars.*); elsewhere the default encoder."""

    @pytest.fixture()
    def support_folder(self, tmp_path):
        from PIL import Image

        rng = np.random.default_rng(3)
        for name, make in (("stripes", stripes), ("speckle", speckle)):
            (tmp_path / "support" / name).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(make(100, rng)).save(tmp_path / "support" / name / f"{k}.png")
        return str(tmp_path / "support")

    def _raster(self, tmp_path, crs):
        rng = np.random.default_rng(5)
        img = np.concatenate([stripes(200, rng)[:, :200], speckle(200, rng)[:, :200]], axis=1)
        return write_raster(tmp_path / "area.tif", np.maximum(img, 1).astype(np.uint8), crs,
                            Affine(10, 0, 500000, 0, -10, 10000))

    def test_mars_crs_is_recognised(self):
        from siamese_analog_plugin.engine.geo import is_mars_crs

        assert is_mars_crs(MARS_EQC) and not is_mars_crs("EPSG:32633") and not is_mars_crs(None)
        assert not is_mars_crs("not a crs")

    @pytest.mark.parametrize("runtime", ["onnx", "torch"])
    def test_a_mars_raster_gets_the_mars_model(self, tmp_path, support_folder, runtime):
        from siamese_analog_plugin.engine.feedback import Feedback

        logs = []

        class Log(Feedback):
            def log(self, message):
                logs.append(message)

        res = run_fewshot_map(FewShotParams(self._raster(tmp_path, MARS_EQC), cell_size_m=500, runtime=runtime,
                                            device="cpu"), support_folder, None, None, Log())
        assert res.model_path.endswith("siamese_compact_mars." + ("onnx" if runtime == "onnx" else "pt"))
        assert any("the Mars landform model" in m for m in logs)
        assert set(res.class_names) == {"speckle", "stripes"}

    def test_an_earth_raster_or_a_given_model_keeps_its_model(self, tmp_path, support_folder, tiny_model):
        earth = FewShotParams(self._raster(tmp_path, "EPSG:32633"), cell_size_m=500, device="cpu", runtime="onnx")
        assert run_fewshot_map(earth, support_folder).model_path.endswith("siamese_compact.onnx")
        (tmp_path / "m").mkdir()
        mars = FewShotParams(str(self._raster(tmp_path / "m", MARS_EQC)), cell_size_m=500, device="cpu",
                             model=tiny_model)
        assert run_fewshot_map(mars, support_folder).model_path == tiny_model

    def test_an_embedding_raster_of_a_mars_raster_keeps_its_model(self, tmp_path, support_folder):
        """Even when it names no model file (made by an in-memory encoder): its model is the shipped
        encoder, never the Mars model picked for the raster."""
        import json

        from osgeo import gdal

        from siamese_analog_plugin.cli import main
        from siamese_analog_plugin.engine.embeddings import TAG

        raster, emb = self._raster(tmp_path, MARS_EQC), str(tmp_path / "emb.tif")
        assert main(["embed-area", "--raster", raster, "--cell-size", "500", "--runtime", "onnx", "--out", emb,
                     "--quiet"]) == 0
        ds = gdal.Open(emb, gdal.GA_Update)
        facts = json.loads(ds.GetMetadataItem(TAG))
        ds.SetMetadataItem(TAG, json.dumps({**facts, "model_path": ""}))
        ds = None
        res = run_fewshot_map(FewShotParams(raster, embeddings=emb, device="cpu", runtime="onnx"), support_folder)
        assert res.model_path.endswith("siamese_compact.onnx")
