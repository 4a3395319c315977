"""The command line, run in-process on real files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from siamese_analog_plugin.cli import main

from .conftest import SAMPLE_HIRISE, SAMPLE_RASTER


def test_search_prints_best_sites_and_writes_outputs(tiny_model, tmp_path, capsys):
    code = main(["search", "--raster", str(SAMPLE_RASTER), "--reference", str(SAMPLE_HIRISE[0]),
                 "--cell-size", "15000", "--model", tiny_model, "--device", "cpu", "--quiet", "--top", "3",
                 "--out-raster", str(tmp_path / "d.tif"), "--out-cells", str(tmp_path / "c.gpkg"),
                 "--out-png", str(tmp_path / "map.png")])
    out = capsys.readouterr().out
    assert code == 0
    assert "Best analog sites" in out and len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 3
    for name in ("d.tif", "c.gpkg", "map.png"):
        assert (tmp_path / name).stat().st_size > 1000
    assert Image.open(tmp_path / "map.png").size[0] > 600


def test_search_error_is_one_clear_line(tiny_model, tmp_path, capsys):
    code = main(["search", "--raster", str(tmp_path / "missing.tif"), "--reference", str(SAMPLE_HIRISE[0]),
                 "--model", tiny_model, "--out-raster", str(tmp_path / "d.tif"),
                 "--out-cells", str(tmp_path / "c.gpkg")])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: The raster") and "does not exist" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_search_with_area_file_in_another_crs(tiny_model, tmp_path, capsys):
    from osgeo import ogr, osr

    srs = osr.SpatialReference()
    srs.ImportFromEPSG(4326)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    ds = ogr.GetDriverByName("GeoJSON").CreateDataSource(str(tmp_path / "area.geojson"))
    layer = ds.CreateLayer("area", srs, ogr.wkbPolygon)
    f = ogr.Feature(layer.GetLayerDefn())
    f.SetGeometry(ogr.CreateGeometryFromWkt("POLYGON((-78 24.5,-77.2 24.5,-77.2 25.2,-78 25.2,-78 24.5))"))
    layer.CreateFeature(f)
    ds = None
    code = main(["search", "--raster", str(SAMPLE_RASTER), "--reference", str(SAMPLE_HIRISE[0]), "--area",
                 str(tmp_path / "area.geojson"), "--cell-size", "9000", "--model", tiny_model, "--quiet", "--json",
                 "--out-raster", str(tmp_path / "d.tif"), "--out-cells", str(tmp_path / "c.gpkg")])
    assert code == 0
    import json

    report = json.loads(capsys.readouterr().out.split("\nWrote")[0])
    assert report["cells"] > 20
    for site in report["best"]:
        assert -78.1 < site["lon"] < -77.1 and 24.4 < site["lat"] < 25.3


def test_embed_folder(tiny_model, tmp_path, capsys):
    imgs = tmp_path / "imgs"
    (imgs / "a" / "deep").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for rel in ("x.png", "a/y.jpg", "a/deep/z.png"):
        Image.fromarray((rng.random((60, 80)) * 255).astype(np.uint8)).save(imgs / rel)
    (imgs / "notes.txt").write_text("not an image")
    assert main(["embed", "--images", str(imgs), "--out", str(tmp_path / "e.npz"), "--model", tiny_model,
                 "--quiet"]) == 0
    data = np.load(tmp_path / "e.npz")
    assert sorted(data["paths"].tolist()) == ["a/deep/z.png", "a/y.jpg", "x.png"]
    assert data["embeddings"].shape == (3, 8) and np.isfinite(data["embeddings"]).all()


def test_embed_empty_folder(tiny_model, tmp_path, capsys):
    (tmp_path / "none").mkdir()
    assert main(["embed", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "e.npz"),
                 "--model", tiny_model]) == 1
    assert "holds no images" in capsys.readouterr().err


def test_info(tiny_model, capsys):
    assert main(["info", "--model", tiny_model]) == 0
    out = capsys.readouterr().out
    assert "devices available: cpu" in out and "embedding size : 8" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "search" in capsys.readouterr().out


def test_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["search"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--out-raster" in err and len(err.strip().splitlines()) == 1  # one line, not the usage


def test_evaluate_with_fewshot_prints_retrieval_and_k_shot_tables(tiny_model, tmp_path, capsys):
    """`evaluate --fewshot` on a tiny data folder in the project layout (HiRISE + AID classes)."""
    import json

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    looks = {"crater": lambda: ((yy - 32) ** 2 + (xx - 32) ** 2 < rng.uniform(80, 300)) * 200,
             "dark_dune": lambda: 120 + 100 * np.sin(xx / rng.uniform(2, 4)),
             "bright_dune": lambda: 120 + 100 * np.sin((xx + yy) / rng.uniform(5, 8)),
             "other": lambda: rng.uniform(0, 255, (64, 64)),
             "Desert": lambda: 120 + 100 * np.sin(yy / rng.uniform(2, 4)),
             "Forest": lambda: rng.uniform(0, 80, (64, 64))}
    for cls, look in looks.items():
        folder = tmp_path / "data" / ("earth/aid" if cls[0].isupper() else "mars/hirise_landmarks") / cls
        folder.mkdir(parents=True)
        for scene in range(4):
            for k in range(3):
                name = f"{cls}_{scene}-{k}.png" if cls[0].islower() else f"{cls}_{scene}_{k}.png"
                Image.fromarray(np.clip(look(), 0, 255).astype(np.uint8)).save(folder / name)
    out = tmp_path / "eval.json"
    rc = main(["evaluate", "--model", tiny_model, "--data", str(tmp_path / "data"), "--seed", "0",
               "--test-fraction", "0.5", "--no-cache", "--quiet", "--fewshot", "--shots", "1", "--draws", "2",
               "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mars_map" in printed and "earth_map" in printed
    report = json.loads(out.read_text())["fewshot"]
    rows = {(r["dataset"], r["method"], r["k"]) for r in report["results"]}
    assert {(d, m, 1) for d in ("HiRISE", "AID") for m in ("encoder", "texture baseline")} <= rows
    assert all(0.0 <= r["mean"] <= 1.0 and len(r["accuracies"]) == 2 for r in report["results"])
