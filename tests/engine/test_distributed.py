"""The search on Dask: a real LocalCluster of two worker processes, tiny rasters, the tiny model.

One cluster serves the module (starting one costs seconds); the searches reach it by its
``tcp://127.0.0.1:PORT`` address, as they would a real cluster's.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from shapely.geometry import Polygon

from siamese_analog_plugin.engine import distributed as dist
from siamese_analog_plugin.engine.encoder import load_model
from siamese_analog_plugin.engine.errors import InputError, SearchCancelled
from siamese_analog_plugin.engine.feedback import Feedback
from siamese_analog_plugin.engine.grid import Area
from siamese_analog_plugin.engine.search import SearchParams, iter_patch_batches, plan_grid, run_search

from .conftest import smooth_noise, write_raster

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def cluster():
    import logging

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None, silence_logs=logging.ERROR) as c, \
            distributed.Client(c) as client:
        yield c, client


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 8 cells, so the tiny grids make many tasks that finish out of order."""
    monkeypatch.setattr(dist, "DEFAULT_TILE_CELLS", 8)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """1500 x 1000 px RGB, 10 m, UTM 18N, a nodata corner; a reference cut from it."""
    folder = tmp_path_factory.mktemp("dist")
    grey = smooth_noise((1000, 1500), seed=7)
    grey[:250, :300] = 0
    rgb = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)])
    raster = write_raster(folder / "r.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)
    ref = write_raster(folder / "ref.tif", grey[500:600, 700:800], None, Affine.identity())
    return raster, ref


def _read_outputs(tif, gpkg):
    with rasterio.open(tif) as ds:
        raster = ds.read(1)
    with sqlite3.connect(gpkg) as con:
        rows = con.execute("SELECT fid, dissimilarity, rank, status, valid_fraction, reference FROM cells "
                           "ORDER BY fid").fetchall()
        sites = con.execute("SELECT COUNT(*) FROM analog_sites").fetchone()[0]
    return raster, rows, sites


def _same_outputs(a, b):
    (ra, rows_a, sa), (rb, rows_b, sb) = a, b
    np.testing.assert_allclose(ra, rb, atol=1e-6)
    assert sa == sb and len(rows_a) == len(rows_b)
    for x, y in zip(rows_a, rows_b):
        assert x[0] == y[0] and x[2:] == y[2:]
        assert (x[1] is None) == (y[1] is None)
        if x[1] is not None:
            assert abs(x[1] - y[1]) < 1e-6


def _address(cluster):
    return cluster[0].scheduler_address


def _params(scene, tiny_model, **kw):
    return SearchParams(scene[0], scene[1], cell_size_m=kw.pop("cell", 1000), model=tiny_model, device="cpu",
                        batch_size=4, **kw)


@pytest.fixture(scope="module")
def local_result(scene, tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    result = run_search(_params(scene, tiny_model), str(out / "d.tif"), str(out / "c.gpkg"))
    return result, _read_outputs(out / "d.tif", out / "c.gpkg")


def test_parse_scheduler(tmp_path):
    assert dist.parse_scheduler("local") == ("local", None)
    assert dist.parse_scheduler("local:3") == ("local", 3)
    assert dist.parse_scheduler("tcp://10.0.0.1:8786") == ("address", "tcp://10.0.0.1:8786")
    f = tmp_path / "s.json"
    f.write_text("{}")
    assert dist.parse_scheduler(str(f)) == ("file", str(f))
    for bad in ("local:0", "cluster", str(tmp_path / "missing.yaml")):
        with pytest.raises(InputError):
            dist.parse_scheduler(bad)


def test_cell_order_releases_in_order():
    order = dist.CellOrder(10)
    emb = np.arange(20, dtype=np.float32).reshape(10, 2)
    ok = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], bool)
    valid = ok.astype(np.float32)

    def tile(idx):
        idx = np.array(idx)
        return idx, valid[idx], ok[idx], emb[idx[ok[idx]]]

    assert order.add(*tile([5, 6, 7])) == []
    assert order.add(*tile([2, 8])) == []
    out = order.add(*tile([0, 1, 3, 4]))
    idx, v, o, e = out[0]
    assert list(idx) == list(range(0, 9)) and list(o) == list(ok[:9])
    np.testing.assert_array_equal(e, emb[np.flatnonzero(ok[:9])])
    assert order.waiting == 0 and order.next == 9
    with pytest.raises(RuntimeError):
        order.add(*tile([4]))
    assert order.add(*tile([9]))[0][0].tolist() == [9]


def test_search_on_cluster_equals_single_process(scene, tiny_model, cluster, local_result, tmp_path):
    result, files = local_result
    params = _params(scene, tiny_model, scheduler=_address(cluster), cache_dir=str(tmp_path / "cache"))
    got = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
    assert got.extra["tiles"] >= 10 and got.extra["workers"] == 2
    np.testing.assert_allclose(got.dissimilarity, result.dissimilarity, atol=1e-6)
    np.testing.assert_array_equal(got.valid_fraction, result.valid_fraction)
    np.testing.assert_array_equal(got.rank, result.rank)
    _same_outputs(_read_outputs(tmp_path / "d.tif", tmp_path / "c.gpkg"), files)
    # The cache it wrote (tiles back in cell order) serves a single-process search.
    again = run_search(_params(scene, tiny_model, cache_dir=str(tmp_path / "cache")))
    assert again.extra["cache"] == "hit"
    np.testing.assert_allclose(again.dissimilarity, result.dissimilarity, atol=1e-6)


def test_embeddings_of_rectangular_tiles(scene, tiny_model, cluster):
    """Tiles of 3 x 4 cells of an area with holes: every cell once, the local embeddings."""
    ring = [(600000, 2700000), (615000, 2700000), (615000, 2690000), (606000, 2690000), (606000, 2695000),
            (600000, 2695000)]
    params = _params(scene, tiny_model, cell=500, area=Area(Polygon(ring), "EPSG:32618"))
    _, grid = plan_grid(params)
    encoder = load_model(tiny_model, "cpu")
    seen = np.zeros(len(grid), int)
    emb = np.full((len(grid), encoder.embedding_dim), np.nan, np.float32)
    valid = np.zeros(len(grid), np.float32)
    for idx, v, ok, e in dist.iter_embedded_tiles(scene[0], grid, tiny_model, _address(cluster), min_valid=0.5,
                                                  batch_size=5, tile_rows=3, tile_cols=4):
        seen[idx] += 1
        valid[idx] = v
        emb[idx[ok]] = e
    assert (seen == 1).all()
    for idx, patches, v in iter_patch_batches(scene[0], grid, 100, 64):
        np.testing.assert_array_equal(valid[idx], v)
        ok = v >= 0.5
        np.testing.assert_allclose(emb[idx[ok]], encoder.embed(patches[ok]), atol=1e-6)
        assert np.isnan(emb[idx[~ok]]).all()


def test_worker_killed_mid_run(scene, tiny_model, cluster, local_result, tmp_path):
    _, client = cluster
    pids = client.run(os.getpid)

    class KillOne(Feedback):
        killed = None

        def progress(self, fraction, message=""):
            if self.killed is None:
                busy = [w for w, keys in client.processing().items() if keys] or list(pids)
                self.killed = busy[0]
                os.kill(pids[busy[0]], signal.SIGKILL)

    fb = KillOne()
    params = _params(scene, tiny_model, scheduler=_address(cluster))
    got = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"), fb)
    assert fb.killed is not None
    np.testing.assert_allclose(got.dissimilarity, local_result[0].dissimilarity, atol=1e-6)
    _same_outputs(_read_outputs(tmp_path / "d.tif", tmp_path / "c.gpkg"), local_result[1])
    client.wait_for_workers(2, timeout=60)  # the nanny brings a new worker up


def test_cancel_leaves_nothing(scene, tiny_model, cluster, tmp_path):
    _, client = cluster

    class CancelAfterFirst(Feedback):
        tiles = 0

        def progress(self, fraction, message=""):
            self.tiles += 1

        def cancelled(self):
            return self.tiles >= 1

    params = _params(scene, tiny_model, scheduler=_address(cluster))
    with pytest.raises(SearchCancelled):
        run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"), CancelAfterFirst())
    assert list(tmp_path.iterdir()) == []
    deadline = time.time() + 10
    while client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) and time.time() < deadline:
        time.sleep(0.1)
    assert client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) == 0


def test_read_failure_is_the_local_error(scene, tiny_model, cluster, tmp_path):
    """A damaged block fails its tile with the single-process search's one-line InputError."""
    grey = smooth_noise((512, 512), seed=3)
    path = tmp_path / "broken.tif"
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=Affine(10, 0, 600000, 0, -10, 2700000), tiled=True, blockxsize=256,
                       blockysize=256, compress="deflate") as ds:
        ds.write(grey, 1)
    with rasterio.open(path) as ds:
        offset = int(ds.tags(1, "TIFF").get("BLOCK_OFFSET_1_1") or ds.get_tag_item("BLOCK_OFFSET_1_1", "TIFF", 1))
    data = bytearray(path.read_bytes())
    data[offset:offset + 64] = b"\xff" * 64
    path.write_bytes(bytes(data))
    errors = []
    for scheduler in (None, _address(cluster)):
        params = SearchParams(str(path), scene[1], cell_size_m=1000, model=tiny_model, device="cpu",
                              scheduler=scheduler)
        with pytest.raises(InputError) as info:
            run_search(params)
        errors.append(str(info.value))
    assert errors[0] == errors[1] and "\n" not in errors[0]


_RANGE_SERVER = r"""
import http.server, io, sys
from pathlib import Path


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send_head(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return None
        data = path.read_bytes()
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            a, _, b = rng[6:].partition("-")
            a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
            body = data[a:b + 1]
        else:
            self.send_response(200)
            body = data
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body if self.command == "GET" else b"")


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: RangeHandler(*a, directory=sys.argv[1]))
print(server.server_address[1], flush=True)
server.serve_forever()
"""


@pytest.fixture()
def http_server(scene):
    """A file server with HTTP range requests (what GDAL's /vsicurl/ asks for) on 127.0.0.1, in
    its own process (GDAL may hold this one's GIL while it waits for the answer)."""
    proc = subprocess.Popen([sys.executable, "-c", _RANGE_SERVER, str(Path(scene[0]).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        yield f"http://127.0.0.1:{int(proc.stdout.readline())}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_raster_over_http(scene, tiny_model, cluster, local_result, http_server, tmp_path):
    params = _params(scene, tiny_model, scheduler=_address(cluster))
    params.raster = f"/vsicurl/{http_server}/r.tif"
    got = run_search(params, str(tmp_path / "d.tif"), str(tmp_path / "c.gpkg"))
    np.testing.assert_allclose(got.dissimilarity, local_result[0].dissimilarity, atol=1e-6)
    _same_outputs(_read_outputs(tmp_path / "d.tif", tmp_path / "c.gpkg"), local_result[1])


def test_embed_area_on_cluster_equals_single_process(scene, tiny_model, cluster, tmp_path):
    """embed-area --scheduler writes the embedding raster the single-process run writes."""
    from siamese_analog_plugin.engine.embed import EmbedParams, run_embed_area

    arrays = []
    for scheduler, name in ((None, "local.tif"), (_address(cluster), "dask.tif")):
        params = EmbedParams(scene[0], cell_size_m=1000, model=tiny_model, device="cpu", batch_size=4,
                             scheduler=scheduler)
        result = run_embed_area(params, str(tmp_path / name))
        with rasterio.open(tmp_path / name) as ds:
            arrays.append((ds.read(), ds.tags()))
        assert result.encoded > 0
    (a, tags_a), (b, tags_b) = arrays
    assert a.shape == b.shape and tags_a.keys() == tags_b.keys()
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, atol=1e-3, equal_nan=True)  # bitwise equal here; one half-precision step at most


def test_onnx_model_on_cluster_equals_single_process(scene, tiny_model, cluster, tmp_path):
    """An .onnx model runs on ONNX Runtime in the workers, as in this process."""
    pytest.importorskip("onnxruntime")
    from siamese_analog_plugin.learning.export import export_onnx

    pt = tmp_path / "tiny.pt"
    pt.write_bytes(Path(tiny_model).read_bytes())
    export_onnx(pt, tmp_path / "tiny.onnx")
    results = []
    for scheduler in (None, _address(cluster)):
        params = SearchParams(scene[0], scene[1], cell_size_m=1000, model=str(tmp_path / "tiny.onnx"), device="cpu",
                              batch_size=4, scheduler=scheduler)
        results.append(run_search(params))
    assert results[0].extra["runtime"] == "onnx"
    np.testing.assert_allclose(results[1].dissimilarity, results[0].dissimilarity, atol=1e-6)
