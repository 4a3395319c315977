"""The analog search: area + imagery + reference + model -> per-cell dissimilarity.

Data flows one way: grid of cells -> windowed grey patches -> embeddings -> Euclidean
distance to the Mars reference embedding(s) -> rank and percentile -> GeoTIFF + GeoPackage.
Reading runs in a background thread (its own GDAL handle) so it overlaps encoding.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .encoder import AnalogEncoder, load_model
from .errors import InputError
from .feedback import Feedback, check_cancelled
from .grid import DEFAULT_MAX_CELLS, Area, CellGrid, build_grid
from .imagery import GreyReader, RasterInfo, ReferenceImage, describe_raster, load_references
from .outputs import atomic_outputs, check_destination, write_cells_gpkg, write_dissimilarity_raster

__all__ = [
    "AGGREGATES",
    "SearchParams",
    "SearchResult",
    "plan_grid",
    "default_cell_size_m",
    "iter_patch_batches",
    "score_embeddings",
    "rank_scores",
    "run_search",
]

AGGREGATES = ("nearest", "mean")
STATUS_SCORED = "scored"
STATUS_NODATA = "nodata"


@dataclass
class SearchParams:
    """Everything a search needs; every face fills one of these.

    Attributes:
        raster: Earth imagery (any GDAL raster, georeferenced).
        references: Mars reference image file, folder, or list of them.
        area: polygon to search (any CRS); ``None`` = the raster's extent.
        cell_size_m: cell side in metres; ``None`` = the reference's ground size when known,
            else 100 raster pixels.
        stride_m: distance between cells in metres (``None`` = cell size: no overlap).
        min_coverage: keep cells at least this share inside the area.
        max_nodata: skip (and mark) cells with more than this share of nodata pixels.
        band: band of the raster to use (``None`` = luminance of RGB / band 1).
        reference_resolution_m: metres per pixel of non-georeferenced references.
        model: model file (``None`` = the shipped one).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        batch_size: cells encoded together.
        aggregate: with several references, ``nearest`` (distance to the closest one) or
            ``mean`` (distance to their mean embedding).
        max_cells / force: the absurd-count guard.
        top_k: how many best sites to list.
    """

    raster: str
    references: object
    area: Area | None = None
    cell_size_m: float | None = None
    stride_m: float | None = None
    min_coverage: float = 0.5
    max_nodata: float = 0.5
    band: int | None = None
    reference_resolution_m: float | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int = 128
    aggregate: str = "nearest"
    max_cells: int = DEFAULT_MAX_CELLS
    force: bool = False
    top_k: int = 10


@dataclass
class SearchResult:
    """Per-cell results (arrays aligned with ``grid``'s kept cells) and run facts."""

    grid: CellGrid
    dissimilarity: np.ndarray  # float32, NaN where not scored
    valid_fraction: np.ndarray  # float32
    nearest_reference: np.ndarray  # int32 index into references, -1 where not scored
    rank: np.ndarray  # int32, 1 = most Mars-like, 0 where not scored
    percentile: np.ndarray  # float32 in [0, 100], NaN where not scored
    references: list[ReferenceImage]
    device: str
    model_path: str | None
    seconds: float
    encode_seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def scored(self) -> np.ndarray:
        return np.isfinite(self.dissimilarity)

    @property
    def cells_per_s(self) -> float:
        return len(self.grid) / self.seconds if self.seconds > 0 else float("nan")

    def status(self) -> np.ndarray:
        return np.where(self.scored, STATUS_SCORED, STATUS_NODATA)

    def best(self, k: int = 10) -> list[dict]:
        """The ``k`` most Mars-like cells, best first."""
        idx = np.nonzero(self.rank > 0)[0]
        idx = idx[np.argsort(self.rank[idx], kind="stable")][:k]
        out = []
        for i in idx:
            out.append({"id": int(self.grid.ids[i]), "row": int(self.grid.rows[i]), "col": int(self.grid.cols[i]),
                        "dissimilarity": float(self.dissimilarity[i]), "rank": int(self.rank[i]),
                        "percentile": float(self.percentile[i]), "lon": float(self.grid.lon[i]),
                        "lat": float(self.grid.lat[i]),
                        "reference": Path(self.references[self.nearest_reference[i]].path).name})
        return out

    def columns(self) -> dict[str, np.ndarray]:
        """Per-cell attribute columns for the cell layer."""
        names = np.array([Path(r.path).name for r in self.references] + [""], dtype=object)
        return {"dissimilarity": self.dissimilarity, "rank": self.rank, "percentile": self.percentile,
                "status": self.status(), "valid_fraction": self.valid_fraction,
                "reference": names[self.nearest_reference]}


def default_cell_size_m(info: RasterInfo, references: list[ReferenceImage]) -> tuple[float, str]:
    """Cell size when none is given: the references' ground size (same scale), else 100 pixels."""
    grounds = [r.ground_size_m for r in references if r.ground_size_m]
    if grounds:
        return float(np.median(grounds)), "the Mars reference's ground size"
    from .geo import metres_per_degree, metres_per_unit, to_crs

    crs = to_crs(info.crs_wkt)
    if crs.is_geographic:
        mx, _ = metres_per_degree(crs, (info.bounds[1] + info.bounds[3]) / 2)
        pixel_m = info.res[0] * mx
    else:
        pixel_m = info.res[0] * metres_per_unit(crs)
    return 100 * pixel_m, "100 raster pixels (the reference's ground resolution is unknown)"


def plan_grid(params: SearchParams, references: list[ReferenceImage] | None = None,
              feedback: Feedback | None = None) -> tuple[RasterInfo, CellGrid]:
    """Describe the raster and build the grid (no pixel is read)."""
    info = describe_raster(params.raster)
    cell = params.cell_size_m
    if not cell:
        cell, why = default_cell_size_m(info, references or [])
        if feedback:
            feedback.log(f"Cell size: {cell:.1f} m ({why})")
    grid = build_grid(info, cell, params.area, params.stride_m, params.min_coverage, params.max_cells, params.force)
    return info, grid


def iter_patch_batches(raster: str, grid: CellGrid, size: int, batch_size: int, band: int | None = None,
                       prefetch: int = 2, stop: threading.Event | None = None):
    """Yield ``(indices, patches, valid_fraction)`` batches, read by a background thread.

    The reader thread owns its own GDAL handle and stays ``prefetch`` batches ahead, so
    decoding and resampling overlap the encoder.
    """
    stop = stop or threading.Event()
    q: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    n = len(grid)

    def reader() -> None:
        try:
            with GreyReader(raster, band=band) as r:
                for start in range(0, n, batch_size):
                    if stop.is_set():
                        return
                    idx = np.arange(start, min(start + batch_size, n))
                    bounds = grid.bounds_array(idx)
                    patches = np.empty((idx.size, size, size), dtype=np.float32)
                    valid = np.empty(idx.size, dtype=np.float32)
                    for j, b in enumerate(bounds):
                        patches[j], valid[j] = r.read_bounds(tuple(b), size)
                    while not stop.is_set():
                        try:
                            q.put((idx, patches, valid), timeout=0.1)
                            break
                        except queue.Full:
                            continue
        except BaseException as exc:  # hand errors to the consumer
            q.put(exc)
            return
        q.put(None)

    thread = threading.Thread(target=reader, name="analog-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def score_embeddings(embeddings: np.ndarray, reference_embeddings: np.ndarray,
                     aggregate: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """Euclidean dissimilarity of each embedding to the reference(s).

    Returns:
        ``(dissimilarity, nearest)``: float32 distances and, for ``nearest``, the index of the
        closest reference (0 for ``mean``).
    """
    e = np.asarray(embeddings, dtype=np.float32)
    r = np.asarray(reference_embeddings, dtype=np.float32)
    if aggregate == "mean":
        d = np.linalg.norm(e - r.mean(axis=0, keepdims=True), axis=1)
        return d.astype(np.float32), np.zeros(len(e), dtype=np.int32)
    if aggregate != "nearest":
        raise InputError(f"Unknown way to combine references '{aggregate}'", "Use nearest or mean")
    d = np.linalg.norm(e[:, None, :] - r[None, :, :], axis=2)
    nearest = d.argmin(axis=1)
    return d[np.arange(len(e)), nearest].astype(np.float32), nearest.astype(np.int32)


def rank_scores(dissimilarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rank (1 = lowest dissimilarity) and percentile (0 = best, 100 = worst) of scored cells."""
    rank = np.zeros(dissimilarity.shape, dtype=np.int32)
    pct = np.full(dissimilarity.shape, np.nan, dtype=np.float32)
    idx = np.nonzero(np.isfinite(dissimilarity))[0]
    if idx.size:
        order = idx[np.argsort(dissimilarity[idx], kind="stable")]
        rank[order] = np.arange(1, idx.size + 1)
        pct[order] = 100.0 * np.arange(idx.size) / max(idx.size - 1, 1)
    return rank, pct


def run_search(params: SearchParams, out_raster: str | None = None, out_cells: str | None = None,
               feedback: Feedback | None = None, encoder: AnalogEncoder | None = None) -> SearchResult:
    """Run a search and (optionally) write its outputs.

    Args:
        params: what to search.
        out_raster: dissimilarity GeoTIFF to write (``None``: not written).
        out_cells: GeoPackage of cells to write (``None``: not written).
        feedback: progress, log and cancel.
        encoder: an already loaded encoder (else ``params.model`` is loaded).

    Raises:
        InputError, ModelError, OutputError: bad input, named with its fix.
        SearchCancelled: the user cancelled; nothing was written.
    """
    feedback = feedback or Feedback()
    t0 = time.perf_counter()
    if params.aggregate not in AGGREGATES:
        raise InputError(f"Unknown way to combine references '{params.aggregate}'", "Use nearest or mean")
    if params.batch_size < 1:
        raise InputError(f"The batch size must be at least 1, not {params.batch_size}", "Use e.g. 128")
    if not 0 <= params.max_nodata < 1:
        raise InputError(f"The largest nodata share must be in [0, 1), not {params.max_nodata}", "Use e.g. 0.5")
    for path, what in ((out_raster, "output raster"), (out_cells, "output cell layer")):
        if path:
            check_destination(path, what)
    describe_raster(params.raster)  # a missing/unreadable raster is named before the model loads
    encoder = encoder or load_model(params.model, params.device)
    size = encoder.input_size
    references = load_references(params.references, size, params.reference_resolution_m)
    info, grid = plan_grid(params, references, feedback)
    n = len(grid)
    feedback.log(f"Device: {encoder.device}; model: {encoder.path or 'in memory'}")
    feedback.log(f"Cells: {n:,} of {grid.cell_size_m:g} m (grid {grid.n_rows} x {grid.n_cols}); "
                 f"references: {len(references)}")
    check_cancelled(feedback)

    ref_emb = encoder.embed(np.stack([r.patch for r in references]))
    dissimilarity = np.full(n, np.nan, dtype=np.float32)
    valid_fraction = np.zeros(n, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int32)
    encode_s = 0.0
    done = 0
    stop = threading.Event()
    batches = iter_patch_batches(params.raster, grid, size, params.batch_size, params.band, stop=stop)
    try:
        for idx, patches, valid in batches:
            check_cancelled(feedback)
            valid_fraction[idx] = valid
            ok = valid >= 1.0 - params.max_nodata
            if ok.any():
                t = time.perf_counter()
                emb = encoder.embed_tensor(encoder.to_tensor(patches[ok]))
                encode_s += time.perf_counter() - t
                d, near = score_embeddings(emb, ref_emb, params.aggregate)
                dissimilarity[idx[ok]] = d
                nearest[idx[ok]] = near
            done += idx.size
            elapsed = time.perf_counter() - t0
            feedback.progress(done / n, f"{done:,}/{n:,} cells, {done / max(elapsed, 1e-9):,.0f} cells/s")
    finally:
        stop.set()
        batches.close()
    rank, pct = rank_scores(dissimilarity)
    seconds = time.perf_counter() - t0
    result = SearchResult(grid, dissimilarity, valid_fraction, nearest, rank, pct, references, str(encoder.device),
                          encoder.path, seconds, encode_s)
    skipped = int((~result.scored).sum())
    feedback.log(f"Scored {n - skipped:,} cells ({skipped:,} skipped as mostly nodata) in {seconds:.1f} s: "
                 f"{result.cells_per_s:,.0f} cells/s on {encoder.device}")
    if skipped == n:
        raise InputError("Every cell in the area is mostly nodata, so nothing could be compared",
                         "Choose an area over valid imagery, or raise the largest nodata share")
    check_cancelled(feedback)
    if out_raster or out_cells:
        write_outputs(result, out_raster, out_cells, params)
    return result


def write_outputs(result: SearchResult, out_raster: str | None, out_cells: str | None,
                  params: SearchParams | None = None) -> None:
    """Write the GeoTIFF and GeoPackage of a result (atomically, both or neither)."""
    tags = {"model": result.model_path or "", "device": result.device,
            "references": ";".join(r.path for r in result.references),
            "cell_size_m": result.grid.cell_size_m, "stride_m": result.grid.stride_m,
            "aggregate": params.aggregate if params else "nearest", "meaning": "lower = more Mars-like"}
    with atomic_outputs({"raster": out_raster, "cells": out_cells}) as tmp:
        if tmp["raster"]:
            write_dissimilarity_raster(tmp["raster"], result.grid, result.dissimilarity, tags)
        if tmp["cells"]:
            write_cells_gpkg(tmp["cells"], result.grid, result.columns(), top_k=params.top_k if params else 10)
