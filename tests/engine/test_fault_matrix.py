"""Nothing lost, whatever the input or the fault (issue 16).

Each case runs the real command line on real files made here (a tiny raster, a real reference,
a real GeoPackage, the tiny real model) and asserts the exit code, one error line without a
traceback, the outputs left behind, and that every input and older output is byte for byte
intact. Signals and concurrent runs use subprocesses of the real CLI, paused at a known point
(after the first batch is scored, or while the picture is drawn) by a wrapper that slows the
console feedback down, never the engine.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from affine import Affine

from siamese_analog_plugin.engine.errors import InputError, ModelError
from siamese_analog_plugin.engine.outputs import same_run
from siamese_analog_plugin.engine.safety import check_outputs, pid_alive, same_file

from .conftest import REPO, smooth_noise, write_raster

UTM = "EPSG:32633"
ORIGIN = Affine(10, 0, 499000, 0, -10, 10000)


# -- the world every case starts from ----------------------------------------------------------------
@pytest.fixture()
def world(tmp_path, tiny_model):
    """Inputs and an older result in ``tmp_path`` (the working folder of every run)."""
    from osgeo import ogr, osr

    write_raster(tmp_path / "earth.tif", smooth_noise((200, 200), seed=1), UTM, ORIGIN)
    write_raster(tmp_path / "ref.tif", smooth_noise((120, 120), seed=2), UTM, Affine(5, 0, 0, 0, -5, 0))
    srs = osr.SpatialReference()
    srs.ImportFromEPSG(32633)
    for name, geom_type, wkts in (
            ("area.gpkg", ogr.wkbPolygon, ["POLYGON((499100 8100,500900 8100,500900 9900,499100 9900,499100 8100))"]),
            ("labels.gpkg", ogr.wkbPoint, ["POINT(499300 9700)", "POINT(500700 8300)"])):
        ds = ogr.GetDriverByName("GPKG").CreateDataSource(str(tmp_path / name))
        lyr = ds.CreateLayer(Path(name).stem, srs, geom_type)
        lyr.CreateField(ogr.FieldDefn("landform", ogr.OFTString))
        for wkt, cls in zip(wkts, ("a", "b")):
            f = ogr.Feature(lyr.GetLayerDefn())
            f.SetField("landform", cls)
            f.SetGeometry(ogr.CreateGeometryFromWkt(wkt))
            lyr.CreateFeature(f)
        ds = None
    (tmp_path / "imgs").mkdir()
    write_raster(tmp_path / "imgs" / "a.tif", smooth_noise((64, 64), seed=3), UTM, ORIGIN)
    # An older result, which a failed or interrupted run must leave as it is.
    for name in ("old.tif", "old.gpkg", "old.png", "old.npz"):
        (tmp_path / name).write_bytes(b"older result " + name.encode())
    return tmp_path


def search_args(model, **extra) -> list[str]:
    args = {"--raster": "earth.tif", "--reference": "ref.tif", "--cell-size": "200", "--model": model,
            "--device": "cpu", "--batch-size": "16", "--out-raster": "old.tif", "--out-cells": "old.gpkg"}
    args.update(extra)
    return ["search", "--quiet", *[x for k, v in args.items() if v is not None for x in (k, v)]]


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial-" in p.name)


@pytest.fixture()
def cli(world, monkeypatch):
    """``cli(args) -> (code, out, err)``: the real ``main`` in this process, in ``world``.

    The handlers ``main`` installs (SIGTERM as Ctrl-C) are put back afterwards.
    """
    from siamese_analog_plugin.cli import main

    monkeypatch.chdir(world)
    monkeypatch.setenv("CPL_LOG", os.devnull)
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def run(args):
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse
                code = exc.code
        return code, out.getvalue(), err.getvalue()

    yield run
    for s, h in saved.items():
        signal.signal(s, h)


def assert_one_line_error(err: str, *words: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert ".partial" not in lines[0], err
    for w in words:
        assert w in lines[0], err
    return lines[0]


# -- 1. an output that is an input, or two outputs that are one file ---------------------------------
OUTPUT_IS_INPUT = [
    (["--out-raster", "./sub/../earth.tif"], "is the input --raster"),
    (["--out-raster", "link_to_ref.tif"], "is the input --reference"),
    (["--out-cells", "area.gpkg", "--area", "area.gpkg"], "is the input --area"),
    (["--out-cells", "earth.tif"], "is the input --raster"),
    (["--out-cells", "old.tif"], "are the same file"),
    (["--out-png", "old.tif"], "are the same file"),
]


@pytest.mark.parametrize("change, words", OUTPUT_IS_INPUT)
def test_search_refuses_an_output_that_is_an_input(cli, world, tiny_model, change, words):
    (world / "sub").mkdir()
    (world / "link_to_ref.tif").symlink_to(world / "ref.tif")
    before = snapshot(world)
    extra = dict(zip(change[::2], change[1::2]))
    code, _, err = cli(search_args(tiny_model, **extra))
    assert code == 1
    assert_one_line_error(err, words)
    assert snapshot(world) == before


@pytest.mark.parametrize("change, words", [
    (["--out-cells", "labels.gpkg"], "is the input --labels"),
    (["--out-raster", "earth.tif"], "is the input --raster"),
    (["--out-cells", "old.tif"], "are the same file"),
])
def test_fewshot_map_refuses_an_output_that_is_an_input(cli, world, tiny_model, change, words):
    before = snapshot(world)
    args = {"--raster": "earth.tif", "--labels": "labels.gpkg", "--class-field": "landform", "--cell-size": "200",
            "--model": tiny_model, "--device": "cpu", "--out-raster": "old.tif", "--out-cells": "old.gpkg"}
    args.update(dict(zip(change[::2], change[1::2])))
    code, _, err = cli(["fewshot-map", "--quiet", *[x for kv in args.items() for x in kv]])
    assert code == 1
    assert_one_line_error(err, words)
    assert snapshot(world) == before


@pytest.mark.parametrize("args, words", [
    (["embed-area", "--raster", "earth.tif", "--out", "./earth.tif"], "is the input --raster"),
    (["similar", "--embeddings", "emb.tif", "--cells", "1", "--out-raster", "emb.tif", "--out-cells", "c.gpkg"],
     "is the input --embeddings"),
    (["compare", "--raster", "earth.tif", "--regions", "area.gpkg", "--name-field", "landform", "--reference",
      "ref.tif", "--out-csv", "t.csv", "--out-cells", "area.gpkg"], "is the input --regions"),
])
def test_the_embedding_commands_refuse_an_output_that_is_an_input(cli, world, args, words):
    (world / "emb.tif").write_bytes(b"an embedding raster")
    before = snapshot(world)
    code, _, err = cli(args)
    assert code == 1
    assert_one_line_error(err, words)
    assert snapshot(world) == before


def test_same_file_sees_through_spellings_and_links(world):
    os.link(world / "earth.tif", world / "hard.tif")
    (world / "soft.tif").symlink_to("earth.tif")
    for other in ("earth.tif", "./earth.tif", "imgs/../earth.tif", "hard.tif", "soft.tif", str(world / "earth.tif")):
        assert same_file(world / "earth.tif", world / other if not other.startswith("/") else other)
    assert not same_file(world / "earth.tif", world / "ref.tif")
    assert not same_file(world / "new.tif", world / "earth.tif")  # a file that does not exist yet
    with pytest.raises(InputError, match="is the input reference"):
        check_outputs({"raster": world / "hard.tif"}, {"reference": [world / "ref.tif", world / "earth.tif"]})


# -- 2 and 7. every numeric option checked, zero is not "not given" ------------------------------------
BAD_NUMBERS = [
    ["embed", "--images", "imgs", "--out", "old.npz", "--batch-size", "-5"],
    ["embed", "--images", "imgs", "--out", "old.npz", "--batch-size", "0"],
    ["search", "--cell-size", "0"],
    ["search", "--stride", "0"],
    ["search", "--cell-size", "nan"],
    ["search", "--min-coverage", "2"],
    ["search", "--max-nodata", "1"],
    ["search", "--reference-resolution", "-5"],
    ["search", "--band", "0"],
    ["search", "--max-cells", "0"],
    ["search", "--top", "-1"],
    ["fewshot-map", "--raster", "earth.tif", "--support", "imgs", "--out-raster", "old.tif", "--out-cells", "old.gpkg",
     "--cell-size", "0"],
    ["fewshot", "--query", "imgs", "--out", "p.csv", "--scale", "0"],
    ["train", "--epochs", "0"],
    ["transfer", "--step", "1", "--lr", "-1"],
    ["evaluate-fewshot", "--shots", "0"],
    ["bench", "--cells", "-3"],
]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=lambda a: f"{a[0]}{a[-2]}={a[-1]}")
def test_bad_numbers_are_refused_before_anything_runs(cli, world, tiny_model, args):
    if args[0] == "search":
        args = search_args(tiny_model) + args[1:]
    before = snapshot(world)
    code, _, err = cli(args)
    assert code == 2
    line = assert_one_line_error(err, args[-2], "is not allowed" if args[-1] != "nan" else "is not a number")
    assert "--help" in line
    assert snapshot(world) == before


def test_engine_refuses_zero_cell_size_stride_and_batch_size(world, tiny_model):
    from siamese_analog_plugin.engine.image_embeddings import embed_folder
    from siamese_analog_plugin.engine.search import SearchParams, run_search

    for change, words in (({"cell_size_m": 0.0}, "cell size must be above 0"),
                          ({"stride_m": 0.0}, "stride must be above 0"),
                          ({"batch_size": 0}, "batch size")):
        params = SearchParams(str(world / "earth.tif"), str(world / "ref.tif"), model=tiny_model, device="cpu",
                              **{"cell_size_m": 200.0, **change})
        with pytest.raises(InputError, match=words):
            run_search(params, str(world / "n.tif"), str(world / "n.gpkg"))
    with pytest.raises(InputError, match="batch size"):
        embed_folder(world / "imgs", tiny_model, "cpu", batch_size=-5)
    assert not list(world.glob("n.*"))


# -- 8. output formats ---------------------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    ({"--out-cells": "c.shp"}, ".gpkg"), ({"--out-raster": "d.png"}, ".tif"), ({"--out-cells": "c.csv"}, "GeoPackage"),
    ({"--out-png": "map.jpg"}, ".png"),
])
def test_search_refuses_output_formats_it_does_not_write(cli, world, tiny_model, change, words):
    before = snapshot(world)
    code, _, err = cli(search_args(tiny_model, **change))
    assert code == 1
    assert_one_line_error(err, words, next(iter(change.values())))
    assert snapshot(world) == before


# -- 6. GDAL failing during the read, not at open ------------------------------------------------------
@pytest.fixture()
def broken(world):
    """A truncated tiled GeoTIFF, a VRT whose source is gone, a 90-degree rotated raster."""
    from osgeo import gdal

    tiled = write_raster(world / "tiled.tif", smooth_noise((256, 256), seed=4), UTM, ORIGIN)
    import rasterio

    with rasterio.open(tiled) as src:
        profile = {**src.profile, "tiled": True, "blockxsize": 64, "blockysize": 64}
        data = src.read()
    with rasterio.open(world / "tiled64.tif", "w", **profile) as dst:
        dst.write(data)
    raw = (world / "tiled64.tif").read_bytes()
    (world / "truncated.tif").write_bytes(raw[: len(raw) // 2])
    for p in (world / "tiled.tif", world / "tiled64.tif"):
        p.unlink()
    write_raster(world / "gone.tif", smooth_noise((120, 120), seed=5), UTM, ORIGIN)
    gdal.BuildVRT(str(world / "missing.vrt"), [str(world / "gone.tif")]).FlushCache()
    (world / "gone.tif").unlink()
    write_raster(world / "rotated.tif", smooth_noise((200, 200), seed=1), UTM, Affine(0, 10, 499000, 10, 0, 10000))
    (world / "imgs" / "truncated.tif").write_bytes((world / "truncated.tif").read_bytes())
    return world


@pytest.mark.parametrize("args, words", [
    (["--raster", "truncated.tif"], "The raster 'truncated.tif' cannot be read"),
    (["--reference", "truncated.tif"], "The reference image 'truncated.tif' cannot be read"),
    (["--raster", "missing.vrt"], "The raster 'missing.vrt' cannot be read"),
    (["--reference", "missing.vrt"], "The reference image 'missing.vrt' cannot be read"),
])
def test_search_read_failures_are_one_line(cli, broken, tiny_model, args, words):
    before = snapshot(broken)
    code, _, err = cli(search_args(tiny_model, **dict(zip(args[::2], args[1::2]))))
    assert code == 1
    assert_one_line_error(err, words, "truncated or refer to files that are missing")
    assert snapshot(broken) == before


def test_embed_and_fewshot_map_read_failures_are_one_line(cli, broken, tiny_model):
    before = snapshot(broken)
    code, _, err = cli(["embed", "--images", "imgs", "--out", "old.npz", "--model", tiny_model, "--device", "cpu",
                        "--quiet"])
    assert code == 1
    assert_one_line_error(err, "imgs/truncated.tif", "cannot be read")
    code, _, err = cli(["fewshot-map", "--raster", "truncated.tif", "--labels", "labels.gpkg", "--class-field",
                        "landform", "--cell-size", "200", "--model", tiny_model, "--device", "cpu", "--quiet",
                        "--out-raster", "old.tif", "--out-cells", "old.gpkg"])
    assert code == 1
    assert_one_line_error(err, "truncated.tif", "cannot be read")
    assert snapshot(broken) == before


def test_a_rotated_raster_is_searched_not_a_traceback(cli, broken, tiny_model):
    code, out, err = cli(search_args(tiny_model, **{"--raster": "rotated.tif", "--out-raster": "r.tif",
                                                    "--out-cells": "r.gpkg"}))
    assert code == 0, err
    assert "Traceback" not in err and (broken / "r.tif").exists() and (broken / "r.gpkg").exists()


# -- 9. NaN pixels are invalid in every read path --------------------------------------------------------
@pytest.mark.parametrize("cell, block_reads, mode", [(1000.0, True, "block"), (230.0, True, "rows"),
                                                     (200.0, False, "cell")])
def test_nan_pixels_count_as_invalid(world, tiny_model, cell, block_reads, mode):
    from siamese_analog_plugin.engine.search import SearchParams, run_search

    img = smooth_noise((200, 200), seed=1).astype(np.float32)
    img[:, :90] = np.nan  # no nodata tag
    write_raster(world / "nan.tif", img, UTM, ORIGIN)
    params = SearchParams(str(world / "nan.tif"), str(world / "ref.tif"), cell_size_m=cell, model=tiny_model,
                          device="cpu", block_reads=block_reads)
    res = run_search(params)
    assert res.extra["read_mode"] == mode  # each of the three read paths
    scored = res.scored
    assert (~scored).any() and scored.any()
    # A cell is skipped exactly when its valid share is too low; none says "all valid" and is skipped.
    np.testing.assert_array_equal(scored, res.valid_fraction >= 0.5)
    assert (res.valid_fraction[~scored] < 0.5).all()
    assert np.isfinite(res.dissimilarity[scored]).all()
    left = res.grid.bounds_array(np.arange(len(res.grid)))[:, 2] <= 499000 + 900
    assert (res.valid_fraction[left] == 0).all()


# -- 10. messages that name the real problem ------------------------------------------------------------
def test_a_model_of_input_size_zero_is_named_as_such(world, tiny_model):
    import json

    import torch

    from siamese_analog_plugin.engine.encoder import load_model

    payload = torch.load(tiny_model, weights_only=True)
    meta = json.loads(payload["metadata"])
    meta["input_size"] = 0
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, world / "zero.pt")
    with pytest.raises(ModelError, match="input patches are 0 pixels wide"):
        load_model(str(world / "zero.pt"), "cpu")


def test_reference_resolution_and_undefined_area_crs_are_named(cli, world, tiny_model):
    import sqlite3

    from siamese_analog_plugin.engine.imagery import load_references

    with pytest.raises(InputError, match="reference resolution must be above 0"):
        load_references(str(world / "ref.tif"), 100, -5.0)
    con = sqlite3.connect(world / "area.gpkg")
    con.execute("UPDATE gpkg_geometry_columns SET srs_id = 0")
    con.commit()
    con.close()
    code, _, err = cli(search_args(tiny_model, **{"--area": "area.gpkg", "--out-raster": "n.tif",
                                                  "--out-cells": "n.gpkg"}))
    assert code == 1
    assert_one_line_error(err, "undefined CRS")


def test_a_vsizip_reference_is_read(cli, world, tiny_model):
    import zipfile

    with zipfile.ZipFile(world / "refs.zip", "w") as z:
        z.write(world / "ref.tif", "ref.tif")
    code, _, err = cli(search_args(tiny_model, **{"--reference": "/vsizip/refs.zip/ref.tif", "--out-raster": "n.tif",
                                                  "--out-cells": "n.gpkg"}))
    assert code == 0, err


def test_no_double_punctuation():
    assert str(InputError("is the cell size in metres?", "Check it")) == "is the cell size in metres? Check it."


# -- 11. references that cannot carry texture ------------------------------------------------------------
@pytest.mark.parametrize("shape, value, words", [((1, 1), None, "only 1 x 1 pixels"), ((8, 8), None, "only 8 x 8"),
                                                 ((120, 120), 128, "one flat grey")])
def test_references_without_texture_are_refused(cli, world, tiny_model, shape, value, words):
    data = np.full(shape, value, np.uint8) if value is not None else smooth_noise((16, 16), 3)[: shape[0], : shape[1]]
    write_raster(world / "bad_ref.tif", data, UTM, ORIGIN)
    before = snapshot(world)
    code, _, err = cli(search_args(tiny_model, **{"--reference": "bad_ref.tif"}))
    assert code == 1
    assert_one_line_error(err, words)
    assert snapshot(world) == before


# -- the output set: all moved into place, or none ------------------------------------------------------
def test_a_set_that_cannot_be_moved_whole_leaves_the_older_set(tmp_path):
    from siamese_analog_plugin.engine.errors import OutputError
    from siamese_analog_plugin.engine.outputs import atomic_outputs

    a, b = tmp_path / "a.tif", tmp_path / "b.gpkg"
    a.write_bytes(b"older a")
    b.write_bytes(b"older b")
    with pytest.raises(OutputError, match="the older files are kept"):
        with atomic_outputs({"a": a, "b": b}) as tmp:
            Path(tmp["a"]).write_bytes(b"new a")
            # b's temporary file is not there when the set is moved (someone removed it): a, moved
            # first, must be put back.
    assert a.read_bytes() == b"older a" and b.read_bytes() == b"older b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.gpkg"]


def test_an_older_result_set_aside_by_a_dead_run_goes_back(tmp_path):
    from siamese_analog_plugin.engine.safety import hold_destinations

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / f".a.partial-{pid}-old0123abcd.tif").write_bytes(b"older a")  # killed while moving: a is gone
    (tmp_path / f".b.partial-{pid}-old0123abcd.gpkg").write_bytes(b"older b")  # b was replaced already
    (tmp_path / "b.gpkg").write_bytes(b"new b")
    with hold_destinations([tmp_path / "a.tif", tmp_path / "b.gpkg"]):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif", "b.gpkg"]
    assert (tmp_path / "a.tif").read_bytes() == b"older a" and (tmp_path / "b.gpkg").read_bytes() == b"new b"


def test_a_cache_entry_left_half_written_by_a_killed_run_is_removed(world, tiny_model):
    from siamese_analog_plugin.engine.search import SearchParams, run_search

    params = SearchParams(str(world / "earth.tif"), str(world / "ref.tif"), cell_size_m=200.0, model=tiny_model,
                          device="cpu", cache_dir=str(world / "cache"))
    run_search(params)
    entries = [p for p in (world / "cache").rglob("*.tif")]
    assert len(entries) == 1
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = entries[0].with_name(f".{entries[0].stem}.partial-{int(dead.stdout)}-0123abcd.tif")
    stale.write_bytes(b"half an embedding raster")
    entries[0].unlink()  # the next search writes the entry again
    assert run_search(params).extra["cache"] == "miss"
    assert not stale.exists() and entries[0].exists()


def test_a_destination_held_by_another_thread_is_refused(tmp_path):
    import threading

    from siamese_analog_plugin.engine.errors import OutputError
    from siamese_analog_plugin.engine.safety import hold_destinations

    dest = tmp_path / "d.tif"
    errors = []

    def other():
        try:
            with hold_destinations([dest]):
                pass
        except OutputError as exc:
            errors.append(str(exc))

    with hold_destinations([dest]), hold_destinations([dest]):  # re-entrant in one thread
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and f"process {os.getpid()}" in errors[0] and ".d.tif.lock" in errors[0]
    with hold_destinations([dest]):  # released: free again
        pass
    assert not list(tmp_path.iterdir())


# -- 3, 4, 5. signals, concurrent runs, dead runs' partial files: real processes ----------------------------
# The real command line, with the console feedback slowed down at a known point: after the first
# batch it prints a marker and waits (for a release file, or up to 60 s); --png-pause makes the
# picture's writer write some bytes, print the marker and wait instead.
DRIVER = r"""
import os, sys, time
from siamese_analog_plugin.engine import feedback, figures
from siamese_analog_plugin.cli import main

def wait():
    print("PAUSED", file=sys.stderr, flush=True)
    end = time.time() + 60
    while time.time() < end and not os.path.exists("release"):
        time.sleep(0.05)

if os.environ.get("PAUSE") == "png":
    def render(result, raster, path, top=5):
        with open(path, "wb") as fh:
            fh.write(b"\x89PNG half")
            fh.flush()
            wait()
    figures.render_search_png = render
elif os.environ.get("PAUSE") == "batch":
    progress = feedback.ConsoleFeedback.progress
    def slow(self, fraction, message=""):
        progress(self, fraction, message)
        if not getattr(self, "paused", False):
            self.paused = True
            wait()
    feedback.ConsoleFeedback.progress = slow
sys.exit(main(sys.argv[1:]))
"""


def start(world: Path, args: list[str], pause: str | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "CPL_LOG": os.devnull, "QT_QPA_PLATFORM": "offscreen"}
    if pause:
        env["PAUSE"] = pause
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=world, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for_pause(proc: subprocess.Popen) -> None:
    line = proc.stderr.readline()
    assert line.strip() == "PAUSED", line + proc.stderr.read()


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_run_replaces_nothing_and_leaves_nothing(world, tiny_model, sig):
    before = snapshot(world)
    proc = start(world, search_args(tiny_model, **{"--out-png": "old.png"}), pause="batch")
    wait_for_pause(proc)
    assert partials(world), "the run writes under temporary names while it runs"
    proc.send_signal(sig)
    code, _, err = finish(proc)
    assert code == 130
    assert err.strip().splitlines()[-1] == "interrupted: nothing was written" and "Traceback" not in err
    assert snapshot(world) == before and not partials(world)
    assert not list(world.glob(".*.lock"))


def test_ctrl_c_while_the_picture_is_drawn_replaces_nothing(world, tiny_model):
    before = snapshot(world)
    proc = start(world, search_args(tiny_model, **{"--out-png": "old.png"}), pause="png")
    wait_for_pause(proc)
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    assert code == 130 and "nothing was written" in err and "Traceback" not in err
    assert snapshot(world) == before and not partials(world)  # no 0-byte or half PNG either


def test_a_second_run_to_the_same_destination_refuses_and_outputs_stay_one_set(cli, world, tiny_model):
    import rasterio
    from osgeo import ogr

    first = start(world, search_args(tiny_model, **{"--out-png": "old.png"}), pause="batch")
    wait_for_pause(first)
    # The second run is the real command line too, in this process (one interpreter start less).
    code, _, err = cli(search_args(tiny_model, **{"--cell-size": "400", "--out-png": "other.png"}))
    assert code == 1
    line = assert_one_line_error(err, "is being written by another run", f"process {first.pid}", "lock file")
    assert "'old.gpkg'" in line and ".old.gpkg.lock" in line
    assert "Wait for that run to finish" in line
    (world / "release").write_text("")
    code, _, err = finish(first)
    assert code == 0, err
    with rasterio.open(world / "old.tif") as ds:
        assert float(ds.tags()["cell_size_m"]) == 200 and (ds.width, ds.height) == (10, 10)
    ds = ogr.Open(str(world / "old.gpkg"))
    assert ds.GetLayerByName("cells").GetFeatureCount() == 100
    assert same_run(world / "old.tif", world / "old.gpkg")  # what a reader checks: one run's pair
    assert (world / "old.png").read_bytes()[:4] == b"\x89PNG" and not (world / "other.png").exists()
    assert not partials(world) and not list(world.glob(".*.lock"))


def test_a_reader_tells_a_mixed_pair_from_one_run(world, tiny_model):
    from siamese_analog_plugin.engine.search import SearchParams, run_search

    for name, cell in (("a", 200.0), ("b", 400.0)):
        run_search(SearchParams(str(world / "earth.tif"), str(world / "ref.tif"), cell_size_m=cell, model=tiny_model,
                                device="cpu"), str(world / f"{name}.tif"), str(world / f"{name}.gpkg"))
    assert same_run(world / "a.tif", world / "a.gpkg") and same_run(world / "b.tif", world / "b.gpkg")
    assert not same_run(world / "a.tif", world / "b.gpkg")


def test_partials_of_a_killed_run_are_removed_by_the_next_run(cli, world, tiny_model):
    before = snapshot(world)
    proc = start(world, search_args(tiny_model), pause="batch")
    wait_for_pause(proc)
    proc.kill()
    proc.communicate(timeout=30)
    left = partials(world)
    assert left and all(f"partial-{proc.pid}-" in name for name in left)
    locks = sorted(p.name for p in world.glob(".*.lock"))
    assert locks == [".old.gpkg.lock", ".old.tif.lock"]  # released by the OS with the process, left as files
    assert snapshot(world) == before | {n: snapshot(world)[n] for n in left + locks}  # older outputs untouched
    assert not pid_alive(proc.pid)
    # A partial of a process that is alive (this one) is not touched.
    mine = world / f".old.partial-{os.getpid()}-0123abcd.tif"
    mine.write_bytes(b"in use")
    code, _, err = cli(search_args(tiny_model))  # the next run: the real command line, in this process
    assert code == 0, err
    assert partials(world) == [mine.name] and not list(world.glob(".*.lock"))
    assert snapshot(world)["old.tif"] != before["old.tif"]


def test_disk_full_names_the_destination_not_the_hidden_file(world, tiny_model):
    import resource

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    before = snapshot(world)
    proc = start(world, search_args(tiny_model, **{"--out-png": "old.png"}), preexec_fn=small_files)
    code, _, err = finish(proc)
    assert code == 1
    line = assert_one_line_error(err)
    assert "'old.gpkg'" in line and "disk" in line and ".partial" not in line
    assert snapshot(world) == before and not partials(world)

