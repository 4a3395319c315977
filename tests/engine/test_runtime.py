"""The inference runtimes: ONNX Runtime and torch agree; ONNX model files; a search without torch.

Real components only: the shipped model files, tiny models exported in the test, real ONNX
Runtime sessions, GeoTIFFs made in the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx  # the exporter's dependency (requirements.txt); running a model needs only onnxruntime
import pytest
import rasterio
from affine import Affine

from siamese_analog_plugin.engine.classes import CosineClassifier
from siamese_analog_plugin.engine.embeddings import file_sha256
from siamese_analog_plugin.engine.encoder import ModelMetadata, load_model
from siamese_analog_plugin.engine.errors import InputError, ModelError
from siamese_analog_plugin.engine.image_embeddings import embed_folder
from siamese_analog_plugin.engine.runtime import (
    ONNX_METADATA_KEY,
    ONNX_SOURCE_KEY,
    OnnxEncoder,
    choose_runtime,
    default_model_path,
    load_runtime,
)
from siamese_analog_plugin.engine.search import SearchParams, run_search
from siamese_analog_plugin.learning.export import export_onnx

from .conftest import REPO, SAMPLE_HIRISE, SAMPLE_REFERENCE, smooth_noise, write_raster

SHIPPED_PT = REPO / "models" / "siamese_compact.pt"
SHIPPED_ONNX = REPO / "models" / "siamese_compact.onnx"
TOL = 1e-5
# A search rounds embeddings to half precision (as the embedding raster stores them): a 1e-7
# difference can move a component across a rounding step (2.4e-4 for components in [0.25, 0.5)),
# so a few cells' dissimilarities differ by up to about that; most are equal.
SEARCH_TOL = 5e-4


@pytest.fixture(scope="module")
def tiny_onnx(tiny_model, tmp_path_factory):
    """The tiny test model exported beside a copy of its .pt."""
    folder = tmp_path_factory.mktemp("onnx")
    pt = folder / "tiny.pt"
    pt.write_bytes(Path(tiny_model).read_bytes())
    export_onnx(pt, folder / "tiny.onnx")
    return str(folder / "tiny.onnx")


@pytest.fixture()
def area_raster(tmp_path):
    """500 x 400 px RGB, 10 m pixels, UTM 18N, a nodata corner: 1 km cells are 100 px."""
    grey = smooth_noise((400, 500), seed=21)
    grey[:100, :120] = 0
    rgb = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)])
    return write_raster(tmp_path / "area.tif", rgb, "EPSG:32618", Affine(10, 0, 600000, 0, -10, 2700000), nodata=0)


def _patches(n=80, size=100, seed=3):
    rng = np.random.default_rng(seed)
    p = rng.random((n, size, size)).astype(np.float32)
    p[: n // 4] = smooth_noise((size, size), seed=seed)[None] / 255.0  # texture, not only noise
    p[-1] = 0.5  # a flat patch: the per-patch std floor
    return p


class TestParity:
    def test_shipped_onnx_is_the_shipped_pt(self):
        """The shipped .onnx was exported from the shipped .pt (retrained weights need a re-export:
        python -m siamese_analog_plugin export-onnx --model models/siamese_compact.pt)."""
        enc = load_runtime(None, "onnx", "cpu")
        assert Path(enc.path) == SHIPPED_ONNX == default_model_path("onnx")
        assert enc.properties[ONNX_SOURCE_KEY] == file_sha256(SHIPPED_PT), \
            "models/siamese_compact.onnx is stale: re-export it from models/siamese_compact.pt"
        assert enc.metadata.to_json() == load_model(SHIPPED_PT, "cpu").metadata.to_json()

    def test_shipped_mars_model_is_step_one_of_the_shipped_encoder(self):
        """models/siamese_compact_mars.* (transfer step 1 on the HiRISE training side, the few-shot
        option for Mars landforms) comes from the shipped encoder, and its .onnx from its .pt."""

        pt, onx = REPO / "models" / "siamese_compact_mars.pt", REPO / "models" / "siamese_compact_mars.onnx"
        enc = load_runtime(onx, "onnx", "cpu")
        assert enc.properties[ONNX_SOURCE_KEY] == file_sha256(pt), "re-export siamese_compact_mars.onnx"
        training = load_model(pt, "cpu").metadata.training
        assert str(training["step"]) == "1" and "models/siamese_compact.split.json" in training["split"]
        parent, shipped = training["parent"], load_model(SHIPPED_PT, "cpu").metadata.training
        assert parent["sha256"] == file_sha256(SHIPPED_PT), "retrain it: make train-mars"
        assert parent["dune_train_sites"] == shipped["dune_train_sites"] and parent["protocol"] == "leakfree"

    @pytest.mark.parametrize("which", ["shipped", "tiny"])
    def test_embeddings_agree(self, which, tiny_model, tiny_onnx):
        pt, onx = (SHIPPED_PT, SHIPPED_ONNX) if which == "shipped" else (tiny_model, tiny_onnx)
        t, o = load_runtime(pt, "torch", "cpu"), load_runtime(onx, "onnx", "cpu")
        assert (t.runtime, o.runtime) == ("torch", "onnx") and isinstance(o, OnnxEncoder)
        patches = _patches()
        a, b = t.embed(patches), o.embed(patches)
        assert a.shape == b.shape == (len(patches), t.embedding_dim) and b.dtype == np.float32
        assert np.abs(a - b).max() < TOL
        # The normalised paths: (N, 1, S, S) and (N, S, S) arrays, and batches over the CPU chunk.
        x = o.to_tensor(patches)
        assert np.abs(o.embed_normalised(x) - b).max() == 0
        assert np.abs(o.embed_normalised(x[:, 0]) - b).max() == 0
        assert np.abs(t.embed_normalised(x) - a).max() == 0

    @pytest.mark.parametrize("which", ["shipped", "tiny"])
    def test_whole_search_agrees(self, which, tiny_model, tiny_onnx, area_raster, tmp_path):
        pt, onx = (SHIPPED_PT, SHIPPED_ONNX) if which == "shipped" else (tiny_model, tiny_onnx)
        out = {}
        for runtime, model in (("torch", pt), ("onnx", onx)):
            params = SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, stride_m=500,
                                  model=str(model), runtime=runtime, device="cpu", batch_size=16)
            r = run_search(params, str(tmp_path / f"{runtime}.tif"), str(tmp_path / f"{runtime}.gpkg"))
            assert r.extra["runtime"] == runtime
            with rasterio.open(tmp_path / f"{runtime}.tif") as ds:
                out[runtime] = (r, ds.read(1))
        (rt, tif_t), (ro, tif_o) = out["torch"], out["onnx"]
        assert np.array_equal(rt.scored, ro.scored) and rt.scored.sum() > 10 and (~rt.scored).any()
        diff = np.abs(rt.dissimilarity[rt.scored] - ro.dissimilarity[ro.scored])
        assert diff.max() < SEARCH_TOL and np.mean(diff < TOL) > 0.9
        assert np.abs(tif_t - tif_o).max() < SEARCH_TOL
        assert ro.extra["encoder_threads"] >= 1 and ro.device == "cpu"

    def test_fewshot_map_and_embed_agree(self, tiny_model, tiny_onnx, area_raster, tmp_path):
        from siamese_analog_plugin.engine.landforms import FewShotParams, run_fewshot_map
        from siamese_analog_plugin.engine.support import SupportSet

        folder = tmp_path / "images"
        folder.mkdir()
        for f in SAMPLE_HIRISE[:4]:
            (folder / f.name).write_bytes(f.read_bytes())
        (_, et, _), (_, eo, dev) = (embed_folder(folder, m, "cpu", runtime=r)
                                    for m, r in ((tiny_model, "torch"), (tiny_onnx, "onnx")))
        assert np.abs(et - eo).max() < TOL and dev == "cpu"
        rng = np.random.default_rng(0)
        support = SupportSet(np.stack([smooth_noise((100, 100), seed=s) / 255.0 for s in range(4)]).astype(np.float32)
                             * rng.uniform(0.5, 1.0, (4, 1, 1)).astype(np.float32),
                             np.array([0, 0, 1, 1]), ["a", "b"])
        maps = [run_fewshot_map(FewShotParams(area_raster, cell_size_m=1000, model=m, runtime=r, device="cpu"),
                                support) for m, r in ((tiny_model, "torch"), (tiny_onnx, "onnx"))]
        ok = np.isfinite(maps[0].cosine)
        assert ok.any() and np.abs(maps[0].cosine[ok] - maps[1].cosine[ok]).max() < TOL


class TestModelFiles:
    def test_round_trip_keeps_metadata_and_the_cosine_classifier(self, tmp_path):
        import torch

        from siamese_analog_plugin.engine.encoder import build_network, save_model

        torch.manual_seed(1)
        clf = CosineClassifier(["dune", "crater"], np.eye(2, 8, dtype=np.float32), 12.0)
        meta = ModelMetadata("compact", 64, 8, {"widths": [4, 8], "pooling": "center"},
                             {"mode": "global", "mean": 0.4, "std": 0.2},
                             {"step": 2, "cosine_classifier": clf.to_dict(), "note": "é ünïcode"}, "a test model")
        save_model(tmp_path / "m.pt", build_network("compact", 64, embedding_dim=8, widths=(4, 8), pooling="center"),
                   meta)
        done = export_onnx(tmp_path / "m.pt", tmp_path / "m.onnx")
        assert done["max_abs_diff"] < TOL
        enc = load_runtime(tmp_path / "m.onnx", "auto", "cpu")
        assert enc.runtime == "onnx" and enc.metadata.to_json() == meta.to_json()
        assert (enc.input_size, enc.embedding_dim) == (64, 8)
        back = CosineClassifier.from_model(enc)
        assert back.class_names == ["dune", "crater"] and np.allclose(back.prototypes, clf.prototypes)
        proto = onnx.load(str(tmp_path / "m.onnx"))  # an ordinary ONNX file: dynamic batch, one input
        assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
        assert "a test model" in enc.describe() and "onnxruntime" in enc.describe()
        # The global normalisation is applied as the .pt's (patches not normalised per patch).
        p = _patches(6, 64)
        assert np.abs(enc.embed(p) - load_model(tmp_path / "m.pt", "cpu").embed(p)).max() < TOL

    def _rewrite(self, src, dst, **props):
        proto = onnx.load(str(src))
        kept = {p.key: p.value for p in proto.metadata_props}
        kept.update(props)
        del proto.metadata_props[:]
        for k, v in kept.items():
            if v is not None:
                e = proto.metadata_props.add()
                e.key, e.value = k, v
        onnx.save(proto, str(dst))
        return dst

    @pytest.mark.parametrize("props, words", [
        ({ONNX_METADATA_KEY: None, "siamese_analog_finder.format": None}, "without Siamese Analog Finder metadata"),
        ({ONNX_METADATA_KEY: "{not json"}, "metadata in"),
        ({ONNX_METADATA_KEY: json.dumps({"input_size": 100})}, "metadata in"),
        ({ONNX_METADATA_KEY: json.dumps({"architecture": "compact", "input_size": 64, "embedding_dim": 8})},
         "does not match its metadata"),
        ({"siamese_analog_finder.version": "99"}, "newer version"),
    ])
    def test_bad_or_missing_metadata_is_a_one_line_model_error(self, tiny_onnx, tmp_path, props, words):
        bad = self._rewrite(tiny_onnx, tmp_path / "bad.onnx", **props)
        with pytest.raises(ModelError) as err:
            load_runtime(bad, "onnx", "cpu")
        assert words in str(err.value) and "\n" not in str(err.value)

    def test_not_an_onnx_file(self, tmp_path):
        junk = tmp_path / "junk.onnx"
        junk.write_bytes(os.urandom(2000))
        for path, words in ((junk, "cannot be opened as an ONNX model"), (tmp_path / "none.onnx", "does not exist"),
                            (tmp_path, "is a folder")):
            with pytest.raises(ModelError, match=words) as err:
                OnnxEncoder.load(path, "cpu")
            assert "\n" not in str(err.value)

    def test_choosing_the_runtime_and_the_file(self, tiny_model, tiny_onnx, tmp_path):
        assert choose_runtime(None, "onnx") == ("onnx", SHIPPED_ONNX)
        assert choose_runtime(None, "torch") == ("torch", SHIPPED_PT)
        assert choose_runtime(tiny_onnx, "auto") == ("onnx", Path(tiny_onnx))
        assert choose_runtime(tiny_model, "auto", "cpu") == ("torch", Path(tiny_model))  # torch is installed here
        pt = Path(tiny_onnx).with_suffix(".pt")
        assert choose_runtime(pt, "onnx") == ("onnx", Path(tiny_onnx))  # the .onnx exported beside it
        assert choose_runtime(tiny_onnx, "torch") == ("torch", pt)
        with pytest.raises(ModelError, match="export-onnx"):
            choose_runtime(tiny_model, "onnx")  # no .onnx beside this one
        with pytest.raises(InputError, match="auto, onnx or torch"):
            choose_runtime(None, "tensorflow")
        with pytest.raises(InputError, match="mps"):
            load_runtime(tiny_onnx, "onnx", "mps")

    def test_a_stale_onnx_beside_a_retrained_pt_is_refused(self, tiny_onnx, tmp_path):
        import torch

        from siamese_analog_plugin.engine.encoder import build_network, save_model

        pt, onx = tmp_path / "m.pt", tmp_path / "m.onnx"
        onx.write_bytes(Path(tiny_onnx).read_bytes())
        torch.manual_seed(5)  # other weights than the ones the .onnx came from
        save_model(pt, build_network("compact", 100, embedding_dim=8, widths=(4, 8), pooling="meanstd"),
                   ModelMetadata("compact", 100, 8, {"widths": [4, 8], "pooling": "meanstd"}))
        with pytest.raises(ModelError, match="weights changed"):
            load_runtime(pt, "onnx", "cpu")

    def test_export_command(self, tiny_model, tmp_path, capsys):
        from siamese_analog_plugin.cli import main

        out = tmp_path / "cli.onnx"
        assert main(["export-onnx", "--model", tiny_model, "--out", str(out)]) == 0
        assert "within" in capsys.readouterr().out
        assert load_runtime(out, "onnx", "cpu").metadata.to_json() == load_model(tiny_model, "cpu").metadata.to_json()
        assert main(["export-onnx", "--model", str(out), "--out", str(tmp_path / "x.onnx")]) == 1
        err = capsys.readouterr().err
        assert "is not a .pt model file" in err and len(err.strip().splitlines()) == 1


class TestThreads:
    def test_search_plan_and_one_shared_session(self, tiny_onnx, area_raster):
        enc = load_runtime(tiny_onnx, "onnx", "cpu")
        r = run_search(SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, torch_threads=2,
                                    batch_size=8), encoder=enc)
        assert (r.extra["encoder_threads"], r.extra["torch_threads"]) == (2, 1)
        assert (1, 0) in enc._sessions  # the workers' shared session: one intra-op thread
        plan = enc.thread_plan(4, workers=1)
        assert (plan.workers, plan.per_worker) == (1, 4) and "4 onnxruntime thread(s)" in plan.describe()
        # More cores than workers: each worker runs its own session of several threads.
        plan = enc.thread_plan(4, workers=2)
        assert (plan.workers, plan.per_worker) == (2, 2) and "a session each" in plan.describe()
        import threading
        from concurrent.futures import ThreadPoolExecutor

        x = enc.to_tensor(_patches(8))
        both = threading.Barrier(2, timeout=60)  # each worker takes one task (a busy machine let one take all)

        def task(_):
            both.wait()
            return enc.embed_tensor(x)

        with ThreadPoolExecutor(2, initializer=plan.enter_worker) as pool:
            outs = list(pool.map(task, range(2)))
        plan.restore()
        assert {(2, 0), (2, 1)} <= set(enc._sessions) and all(np.array_equal(o, outs[0]) for o in outs)


_NO_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` now fails, as in a QGIS without torch
from siamese_analog_plugin.cli import main
code = main(sys.argv[1:])
assert "torch" not in [m.split(".")[0] for m, v in sys.modules.items() if v is not None], "torch was imported"
sys.exit(code)
"""


def _run_no_torch(*args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)


def test_search_and_embed_without_torch_give_the_same_outputs(area_raster, tmp_path):
    """A Python where torch cannot be imported: search and embed run on ONNX Runtime (the shipped
    .onnx) and write what the torch runtime writes in this process."""
    common = ["--raster", area_raster, "--reference", str(SAMPLE_REFERENCE), "--cell-size", "1000", "--quiet",
              "--json", "--top", "5"]
    p = _run_no_torch("search", *common, "--out-raster", str(tmp_path / "o.tif"), "--out-cells",
                      str(tmp_path / "o.gpkg"))
    assert p.returncode == 0, p.stderr
    r = run_search(SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, runtime="torch"),
                   str(tmp_path / "t.tif"), str(tmp_path / "t.gpkg"))
    with rasterio.open(tmp_path / "o.tif") as a, rasterio.open(tmp_path / "t.tif") as b:
        assert np.abs(a.read(1) - b.read(1)).max() < SEARCH_TOL
    best = json.JSONDecoder().raw_decode(p.stdout[p.stdout.index("{"):])[0]["best"]
    assert np.allclose([s["dissimilarity"] for s in best], [s["dissimilarity"] for s in r.best(5)], atol=SEARCH_TOL)

    folder = tmp_path / "images"
    folder.mkdir()
    for f in SAMPLE_HIRISE[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    p = _run_no_torch("embed", "--images", str(folder), "--out", str(tmp_path / "e.npz"), "--quiet")
    assert p.returncode == 0, p.stderr
    _, want, _ = embed_folder(folder, None, "cpu", runtime="torch")
    assert np.abs(np.load(tmp_path / "e.npz")["embeddings"] - want).max() < TOL

    # Asking for torch there is a one-line error naming the fix.
    p = _run_no_torch("embed", "--images", str(folder), "--out", str(tmp_path / "f.npz"), "--runtime", "torch")
    assert p.returncode == 1 and "pip install torch" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_an_embedding_raster_made_on_one_runtime_is_queried_on_the_other(area_raster, tmp_path):
    """The shipped .onnx has the shipped .pt's identity: embeddings made with torch answer a search
    on ONNX Runtime (and equal a search that encodes)."""
    from siamese_analog_plugin.engine.embed import EmbedParams, run_embed_area

    emb = str(tmp_path / "emb.tif")
    run_embed_area(EmbedParams(area_raster, cell_size_m=1000, runtime="torch", device="cpu"), emb)
    from_raster = run_search(SearchParams(None, str(SAMPLE_REFERENCE), embeddings=emb, runtime="onnx"))
    encoded = run_search(SearchParams(area_raster, str(SAMPLE_REFERENCE), cell_size_m=1000, runtime="torch"))
    assert from_raster.extra["runtime"] == "onnx" and encoded.extra["runtime"] == "torch"
    ok = encoded.scored
    assert np.array_equal(from_raster.scored, ok)
    assert np.abs(from_raster.dissimilarity[ok] - encoded.dissimilarity[ok]).max() < SEARCH_TOL


def test_every_engine_module_and_the_command_line_import_without_torch():
    modules = sorted(f"siamese_analog_plugin.engine.{p.stem}" for p in (REPO / "siamese_analog_plugin" / "engine")
                     .glob("*.py") if p.stem != "__init__")
    code = ("import sys, importlib\n"
            "sys.modules['torch'] = None\n"
            f"for m in {modules!r} + ['siamese_analog_plugin.cli']:\n"
            "    importlib.import_module(m)\n"
            "import siamese_analog_plugin.cli as c; c.build_parser()\n"
            "from siamese_analog_plugin.engine.runtime import load_runtime\n"
            "enc = load_runtime(None, 'auto', 'auto')\n"
            "assert enc.runtime == 'onnx', enc.runtime\n"
            "print('ok', enc.describe().count('onnxruntime'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")
