"""Mapping the landforms of an area from a few labelled examples (``fewshot-map`` and the Processing algorithm)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import numpy as np

from .classes import class_colours
from .classify import build_classifier
from .encoder import AnalogEncoder
from .errors import InputError, OutputError
from .feedback import Feedback, check_cancelled
from .grid import Area, CellGrid
from .imagery import describe_raster
from .outputs import atomic_outputs, check_destination
from .runtime import load_runtime
from .safety import check_output_format, check_outputs
from .support import LabelledFeatures, SupportSet, support_from_features

CLASS_NODATA = 0  # class raster value of cells outside the area or mostly nodata; classes are 1..C


CELLS_LAYER = "cells"


@dataclass
class FewShotParams:
    """What a few-shot landform map needs (the grid part mirrors :class:`.search.SearchParams`).

    Attributes:
        raster: the imagery to map (georeferenced GDAL raster).
        area: polygon to map (``None`` = the raster's extent).
        cell_size_m: cell side in metres (``None`` = 100 raster pixels).
        stride_m, min_coverage, max_nodata, band, max_cells, force: as for a search.
        model, device, batch_size, runtime: the encoder (runtime ``auto``, ``onnx`` or ``torch``).
        scale: logit scale for the confidence (``None``: the model's, else 10).
        max_cells_per_polygon: cells taken from one labelled polygon at most.
        embeddings: an embedding raster (``embed-area``) whose cells are classified instead of
            encoding the raster again (its grid and model are used; the raster must be its own).
    """

    raster: str
    area: Area | None = None
    cell_size_m: float | None = None
    stride_m: float | None = None
    min_coverage: float = 0.5
    max_nodata: float = 0.5
    band: int | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int = 128
    max_cells: int = 1_000_000
    force: bool = False
    scale: float | None = None
    max_cells_per_polygon: int = 64
    embeddings: str | None = None  # an embedding raster of the area to classify instead of encoding
    runtime: str = "auto"


@dataclass
class FewShotMapResult:
    """Per-cell classes (arrays aligned with ``grid``) and run facts."""

    grid: CellGrid
    class_names: list[str]
    class_index: np.ndarray  # int32, -1 where not classified
    cosine: np.ndarray  # float32, NaN where not classified
    confidence: np.ndarray
    margin: np.ndarray
    valid_fraction: np.ndarray
    support_counts: dict
    device: str
    model_path: str | None
    seconds: float

    @property
    def classified(self) -> np.ndarray:
        return self.class_index >= 0

    def counts(self) -> dict[str, int]:
        """Cells per class."""
        return {n: int((self.class_index == i).sum()) for i, n in enumerate(self.class_names)}

    def columns(self) -> dict[str, np.ndarray]:
        names = np.array(list(self.class_names) + [""], dtype=object)
        return {"class": names[self.class_index], "class_id": np.where(self.classified, self.class_index + 1, 0),
                "cosine": self.cosine, "confidence": self.confidence, "margin": self.margin,
                "status": np.where(self.classified, "classified", "nodata"), "valid_fraction": self.valid_fraction}


def _default_cell_size(info) -> float:
    from .search import default_cell_size_m

    return default_cell_size_m(info, [])[0]


MARS_MODEL_NAME = "siamese_compact_mars"  # transfer step 1 on HiRISE (models/README.md, make train-mars)


def default_landform_model(raster_crs: str | None, runtime: str | None = "auto", device: str | None = "auto",
                           log=None) -> str | None:
    """The model a landform map uses when none is given: on a Mars raster, the shipped Mars model
    beside the default encoder (step 1 of the stepwise transfer, fine-tuned on HiRISE landforms:
    better few-shot Mars classes on the validation side, worse Earth ones), said through ``log``;
    else ``None`` (the default encoder). ``None`` too when the Mars model is not installed.
    """
    from .geo import is_mars_crs
    from .runtime import choose_runtime

    if not raster_crs or not is_mars_crs(raster_crs):
        return None
    _, path = choose_runtime(None, runtime, device)
    mars = path.with_name(MARS_MODEL_NAME + path.suffix)
    if not mars.is_file():
        return None
    if log is not None:
        log(f"Model: {mars.name} (the Mars landform model, for a Mars raster; give a model file to use another)")
    return str(mars)


def run_fewshot_map(params: FewShotParams, support: SupportSet | LabelledFeatures | str | os.PathLike | None,
                    out_raster: str | None = None, out_cells: str | None = None,
                    feedback: Feedback | None = None, encoder: AnalogEncoder | None = None) -> FewShotMapResult:
    """Map landforms over an area from a few labelled examples.

    Args:
        params: raster, area, cells and model.
        support: labelled points/polygons (read from ``params.raster`` at the cell size), a
            ``<class>/*`` image folder, a ready :class:`SupportSet`, or ``None`` to use the
            classes stored in a step-2 model.
        out_raster: class GeoTIFF (uint8, 1..C, 0 = not classified, with a colour table).
        out_cells: GeoPackage with layer ``cells`` (class, cosine, confidence, margin...).
        feedback: progress, log and cancel.
        encoder: an already loaded encoder.

    Raises:
        InputError, ModelError, OutputError; SearchCancelled when cancelled (nothing written).
    """
    from .embeddings import EmbeddingRaster
    from .search import SearchParams, _encode_stream, plan_grid, query_embedding_raster

    feedback = feedback or Feedback()
    t0 = time.perf_counter()
    if params.batch_size < 1:
        raise InputError(f"The batch size must be at least 1, not {params.batch_size}", "Use e.g. 128")
    if not 0 <= params.max_nodata < 1:
        raise InputError(f"The largest nodata share must be in [0, 1), not {params.max_nodata}", "Use e.g. 0.5")
    if out_cells and not str(out_cells).lower().endswith(".gpkg"):
        raise OutputError(f"The cell layer '{out_cells}' is not a GeoPackage", "Give a .gpkg file name")
    check_output_format(out_raster, "class raster", (".tif", ".tiff"), "GeoTIFF")
    check_outputs({"class raster": out_raster, "cell layer": out_cells},
                  {"raster": params.raster, "embeddings": params.embeddings, "model": params.model,
                   "support folder": support if isinstance(support, (str, os.PathLike)) else None})
    for path, what in ((out_raster, "class raster"), (out_cells, "cell layer")):
        if path:
            check_destination(path, what)
    for value, what in ((params.cell_size_m, "cell size"), (params.stride_m, "stride")):
        if value is not None and not value > 0:  # 0 is a mistake, not "the default"
            raise InputError(f"The {what} must be above 0 metres, not {value:g}", "Give e.g. 500, or leave it out")
    source = EmbeddingRaster.open(params.embeddings) if params.embeddings else None
    if source is not None:
        source.check_raster(params.raster)
        source.check_grid(params.cell_size_m, params.stride_m)
        if params.area is not None:
            raise InputError("An embedding raster fixes the area: an area cannot be given with it",
                             "Leave the area out, or embed the new area with 'embed-area'")
        source.check_nodata(1.0 - params.max_nodata)
        source.check_band(params.band)
    info = describe_raster(params.raster)
    model = params.model or (source.facts.model_path if source else None) or None
    if encoder is None and model is None and source is None:  # an embedding raster keeps its model
        model = default_landform_model(info.crs_wkt, params.runtime, params.device, feedback.log)
    encoder = encoder or load_runtime(model, params.runtime, params.device)
    if source is not None:
        source.check_model(encoder)
    size = encoder.input_size
    if source is not None:
        cell = source.facts.cell_size_m
    else:
        cell = params.cell_size_m if params.cell_size_m is not None else _default_cell_size(info)
    if params.cell_size_m is None and source is None:
        feedback.log(f"Cell size: {cell:.1f} m (100 raster pixels)")
    if isinstance(support, LabelledFeatures):
        support = support_from_features(params.raster, support, cell, size, params.band, params.max_nodata,
                                         params.max_cells_per_polygon, feedback)
    if isinstance(support, SupportSet):
        feedback.log("Labelled examples: " + ", ".join(f"{k} {v}" for k, v in support.counts().items()))
    clf = build_classifier(encoder, support, params.scale, params.batch_size)
    if len(clf.class_names) > 254:
        raise InputError(f"{len(clf.class_names)} classes are more than a class raster can hold (254)",
                         "Merge classes")
    counts = support.counts() if isinstance(support, SupportSet) else {c: 0 for c in clf.class_names}
    sp = SearchParams(raster=params.raster, references=None, area=params.area, cell_size_m=cell,
                      stride_m=params.stride_m, min_coverage=params.min_coverage, max_nodata=params.max_nodata,
                      band=params.band, batch_size=params.batch_size, max_cells=params.max_cells, force=params.force)
    grid = source.grid if source is not None else plan_grid(sp, None, feedback, info)[1]
    n = len(grid)
    feedback.log(f"Cells: {n:,} of {grid.cell_size_m:g} m (grid {grid.n_rows} x {grid.n_cols}); "
                 f"classes: {', '.join(clf.class_names)}; device {encoder.device}")
    check_cancelled(feedback)
    index = np.full(n, -1, dtype=np.int32)
    cosine = np.full(n, np.nan, dtype=np.float32)
    confidence = np.full(n, np.nan, dtype=np.float32)
    margin = np.full(n, np.nan, dtype=np.float32)
    valid_fraction = np.zeros(n, dtype=np.float32)

    def score(emb):  # the landform classes are one more query over the cells' embeddings
        pred = clf.predict(emb)
        return {"index": pred.index, "cosine": pred.cosine, "confidence": pred.confidence, "margin": pred.margin}

    def consume(idx, valid, ok, emb, scored) -> None:
        valid_fraction[idx] = valid
        if scored is not None:
            sel = idx[ok]
            index[sel], cosine[sel] = scored["index"], scored["cosine"]
            confidence[sel], margin[sel] = scored["confidence"], scored["margin"]

    min_valid = 1.0 - params.max_nodata
    if source is not None:
        feedback.log(f"Embeddings come from {source.path}; only the classes are computed")
        query_embedding_raster(source, score, min_valid, consume, feedback)
    else:
        _encode_stream(sp, encoder, info, grid, score, min_valid, None, consume, {"precision": "fp32"}, feedback,
                       t0)
    result = FewShotMapResult(grid, list(clf.class_names), index, cosine, confidence, margin, valid_fraction,
                              counts, str(encoder.device), encoder.path, time.perf_counter() - t0)
    if not result.classified.any():
        raise InputError("Every cell in the area is mostly nodata, so nothing could be classified",
                         "Choose an area over valid imagery, or raise the largest nodata share")
    feedback.log("Cells per class: " + ", ".join(f"{k} {v:,}" for k, v in result.counts().items()))
    check_cancelled(feedback)
    if out_raster or out_cells:
        tags = {"model": encoder.path or "", "classes": json.dumps(clf.class_names), "scale": clf.scale,
                "cell_size_m": grid.cell_size_m, "support": json.dumps(counts)}
        with atomic_outputs({"raster": out_raster, "cells": out_cells}) as tmp:
            if tmp["raster"]:
                write_class_raster(tmp["raster"], grid, index, clf.class_names, tags)
            if tmp["cells"]:
                write_fewshot_cells(tmp["cells"], grid, result.columns())
    return result


def write_class_raster(path: str, grid: CellGrid, class_index: np.ndarray, class_names: list[str],
                       tags: dict | None = None) -> None:
    """Write a uint8 GeoTIFF, one pixel per grid position: class ``i`` as ``i + 1``, 0 = not classified.

    It carries a colour table (:func:`class_colours`) and category names, so any GIS shows
    it with a legend as is.
    """
    from .outputs import write_cell_raster

    values = np.where(class_index >= 0, class_index + 1, CLASS_NODATA).astype(np.uint8)
    colours = {CLASS_NODATA: (0, 0, 0, 0)}
    colours.update({i + 1: (*rgb, 255) for i, rgb in enumerate(class_colours(len(class_names)))})
    meta = {f"CLASS_{i + 1}": n for i, n in enumerate(class_names)}
    meta.update(tags or {})
    write_cell_raster(path, grid, values, meta, description="landform class", dtype="uint8", nodata=CLASS_NODATA,
                      colours=colours, categories=["(not classified)"] + list(class_names))


FEWSHOT_FIELDS = [
    ("id", "int64"), ("row", "int"), ("col", "int"), ("class", "str"), ("class_id", "int"), ("cosine", "real"),
    ("confidence", "real"), ("margin", "real"), ("lon", "real"), ("lat", "real"), ("status", "str"),
    ("coverage", "real"), ("valid_fraction", "real"),
]


def write_fewshot_cells(path: str, grid: CellGrid, columns: dict[str, np.ndarray]) -> None:
    """Write the cells as polygons (layer ``cells``) with their class, cosine and confidence."""
    from .outputs import write_cells_gpkg

    columns = dict(columns)
    classes = np.asarray(columns["class"], dtype=object)
    classes[classes == ""] = None  # unclassified cells: NULL class
    columns["class"] = classes
    write_cells_gpkg(path, grid, columns, top_k=0, fields=FEWSHOT_FIELDS)
