"""The RUNTIME parameter: Find Mars analog sites runs on ONNX Runtime or torch, with .onnx or .pt
models, and both give the same map."""

from __future__ import annotations

import numpy as np
import pytest

from ..conftest import ROOT, SAMPLE_RASTER, SAMPLE_REFERENCE
from .conftest import RecordingFeedback

ALG = "siameseanalog:findanalogs"


def _run(run_alg, tmp_path, name, **extra):
    fb = RecordingFeedback.make()
    params = {"INPUT": str(SAMPLE_RASTER), "REFERENCE": [str(SAMPLE_REFERENCE)], "CELL_SIZE": 12000,
              "DEVICE": "cpu", "OUTPUT_RASTER": str(tmp_path / f"{name}.tif"),
              "OUTPUT_CELLS": str(tmp_path / f"{name}.gpkg"), **extra}
    res = run_alg(ALG, params, fb)
    import rasterio

    with rasterio.open(res["OUTPUT_RASTER"]) as ds:
        return res, ds.read(1), fb.log


def test_onnx_and_torch_runtimes_make_the_same_map(run_alg, tmp_path):
    onnx_res, onnx_map, onnx_log = _run(run_alg, tmp_path, "onnx", RUNTIME=1)  # ONNX Runtime, shipped .onnx
    torch_res, torch_map, torch_log = _run(run_alg, tmp_path, "torch", RUNTIME=2)  # torch, shipped .pt
    assert "onnxruntime CPUExecutionProvider" in onnx_log and "siamese_compact.onnx" in onnx_log
    assert "onnxruntime" not in torch_log and "siamese_compact.pt" in torch_log
    assert onnx_res["SCORED_COUNT"] == torch_res["SCORED_COUNT"] > 0
    assert np.abs(onnx_map - torch_map).max() < 5e-4  # half-precision rounding step at most
    # A .pt given with the ONNX runtime runs the .onnx exported beside it.
    shipped_pt = str(ROOT / "models" / "siamese_compact.pt")
    _, pt_on_onnx, log = _run(run_alg, tmp_path, "pt_onnx", RUNTIME=1, MODEL=shipped_pt)
    assert "siamese_compact.onnx" in log and np.array_equal(pt_on_onnx, onnx_map)


def test_a_model_without_metadata_is_refused_in_one_line(run_alg, tmp_path):
    from qgis.core import QgsProcessingException

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(QgsProcessingException, match="cannot be opened as an ONNX model"):
        _run(run_alg, tmp_path, "bad", MODEL=str(bad))
    assert not (tmp_path / "bad.tif").exists()
