"""The analog search: area + imagery + reference + model -> per-cell dissimilarity.

Data flows one way: grid of cells -> windowed grey patches -> embeddings -> Euclidean
distance to the Mars reference embedding(s) -> rank and percentile -> GeoTIFF + GeoPackage.

The pipeline streams: reader threads (each with its own GDAL handle; GDAL releases the GIL)
read, resample and normalise the next batches while the encoder runs on the current one, so
pixels and tensors exist for a few batches only and memory does not grow with the area; per
cell only a few numbers are kept (dissimilarity, valid share, nearest reference). Each scored
batch goes straight to the outputs (a writer thread appends it to the GeoTIFF and the
GeoPackage, :class:`~.outputs.ResultStream`); rank, percentile and the best sites, which need
every cell, are completed in one final pass. Cells that tile the raster at its own resolution
are read a grid row at a time (one windowed read per row of a batch, into the reader's own
buffers), and batches are normalised in place. On CUDA, batches are pinned in the reader threads and copied without
blocking; mixed precision is an option (``amp``). With ``cache_dir`` the embeddings are kept
(:mod:`.cache`), and a later search of the same area only computes distances.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .embeddings import EmbeddingCache, EmbeddingRaster, EmbeddingRasterWriter, embedding_facts, quantise
from .encoder import AnalogEncoder, normalise_in_place
from .errors import AnalogFinderError, InputError
from .feedback import Feedback, check_cancelled
from .grid import DEFAULT_MAX_CELLS, Area, CellGrid, build_grid
from .imagery import GreyReader, RasterInfo, ReferenceImage, describe_raster, load_references
from .outputs import (
    RUN_ID,
    ResultStream,
    atomic_outputs,
    best_cells,
    check_destination,
    new_run_id,
    write_cell_raster,
    write_cells_gpkg,
)
from .queries import AGGREGATES, ReferenceQuery, reference_columns
from .reads import ROWS_READ_PIXELS, ReadPlan, plan_reads, read_cells  # noqa: F401  (re-exported)
from .runtime import load_runtime
from .safety import check_outputs, partial_name, remove_stale_partials

__all__ = [
    "AGGREGATES",
    "SearchParams",
    "SearchResult",
    "plan_grid",
    "scale_warnings",
    "default_cell_size_m",
    "iter_patch_batches",
    "plan_reads",
    "read_cells",
    "ReadPlan",
    "describe_device",
    "score_embeddings",
    "rank_scores",
    "run_search",
]

READER_REOPEN_BYTES = 8 * 1024 * 1024
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
        model: model file, ``.onnx`` or ``.pt`` (``None`` = the shipped one for the runtime).
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
        runtime: ``auto``, ``onnx`` (ONNX Runtime) or ``torch`` (see :func:`.runtime.choose_runtime`).
        batch_size: cells encoded together.
        aggregate: with several references, ``nearest`` (distance to the closest one) or
            ``mean`` (distance to their mean embedding).
        max_cells / force: the absurd-count guard.
        top_k: how many best sites to list.
        cache_dir: folder of the embedding cache (``None``: no cache): embedding rasters kept
            under a key. A search of an area already searched with the same raster, grid, band
            and model then only computes distances.
        embeddings: an embedding raster (:mod:`.embeddings`) to query instead of encoding: the
            grid, raster and model come from it (any given must match it).
        keep_embeddings: also write the embeddings computed on the way to this embedding raster.
        examples: instead of reference images, ``(names, embeddings, patches)`` of examples to
            compare every cell with (query by example: ``similar``); ``references`` is unused.
        reader_threads: threads reading the raster (``None``: :func:`default_reader_threads`).
        amp: on CUDA, encode in mixed precision (bfloat16, else float16). Dissimilarities then
            differ from float32 by up to ~0.03 (embeddings are unit vectors, distances in
            [0, 2]); ignored on CPU.
        torch_threads: CPU threads of the encoder (``None``: torch's, one per core); on CPU they
            encode several batches at once (see :class:`_EncoderThreads`; with ONNX Runtime,
            :class:`.runtime.OnnxThreads`).
        block_reads: read a grid row's cells at once when they can be (:class:`ReadPlan`):
            cells of exactly the patch size as slices of one read (the same values), larger
            cells averaged down from one full-resolution read (GDAL's ``average``, to its
            rounding); ``False`` has GDAL read and resample every cell on its own.
        scheduler: embed the cells on a Dask cluster instead of this process's threads
            (:mod:`.distributed`): ``local[:N]``, ``tcp://HOST:PORT`` or a scheduler file;
            ``None``/empty: the single-process pipeline.
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
    cache_dir: str | None = None
    embeddings: str | None = None
    keep_embeddings: str | None = None
    examples: tuple | None = None
    reader_threads: int | None = None
    amp: bool = False
    torch_threads: int | None = None
    block_reads: bool = True
    runtime: str = "auto"
    scheduler: str | None = None


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
    per_reference: np.ndarray | None = None  # (N, R) float32 with several references, else None

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
        idx = best_cells(self.rank, k)
        out = []
        for i in idx:
            out.append({"id": int(self.grid.ids[i]), "row": int(self.grid.rows[i]), "col": int(self.grid.cols[i]),
                        "dissimilarity": float(self.dissimilarity[i]), "rank": int(self.rank[i]),
                        "percentile": float(self.percentile[i]), "lon": float(self.grid.lon[i]),
                        "lat": float(self.grid.lat[i]),
                        "reference": Path(self.references[self.nearest_reference[i]].path).name})
        return out

    def columns(self, index=slice(None)) -> dict[str, np.ndarray]:
        """Per-cell attribute columns for the cell layer (of the cells ``index``; default all)."""
        return cell_columns(self.dissimilarity, self.valid_fraction, self.nearest_reference,
                            reference_names(self.references), index, self.rank, self.percentile,
                            self.per_reference)


def reference_names(references: list[ReferenceImage]) -> np.ndarray:
    """File names of the references, and "" last (for index -1: not scored)."""
    return np.array([Path(r.path).name for r in references] + [""], dtype=object)


def cell_columns(dissimilarity: np.ndarray, valid_fraction: np.ndarray, nearest: np.ndarray, names: np.ndarray,
                 index=slice(None), rank: np.ndarray | None = None,
                 percentile: np.ndarray | None = None,
                 per_reference: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Cell-layer columns of the cells ``index``; without ``rank`` and ``percentile`` (unknown
    until every cell is scored) they are NaN (NULL in the layer), as for cells that are not
    scored: a rank 0 would sort before rank 1. With several references, ``per_reference`` adds
    each one's own dissimilarity (``d_<name>``)."""
    d = dissimilarity[index]
    extra = {}
    if per_reference is not None:
        extra = {col: per_reference[index, k] for k, col in enumerate(reference_columns(list(names[:-1])))}
    r = rank[index] if rank is not None else np.zeros(d.shape, np.int32)
    return {**extra, "dissimilarity": d,
            "rank": np.where(r > 0, r, np.nan),
            "percentile": percentile[index] if percentile is not None else np.full(d.shape, np.nan, np.float32),
            "status": np.where(np.isfinite(d), STATUS_SCORED, STATUS_NODATA), "valid_fraction": valid_fraction[index],
            "reference": names[nearest[index]]}


MIN_CELL_PIXELS = 32  # a cell of fewer imagery pixels a side has little texture left to compare


def raster_pixel_m(info: RasterInfo) -> float:
    """The raster's pixel width on the ground in metres (at the centre for geographic CRSs)."""
    from .geo import metres_per_degree, metres_per_unit, to_crs

    crs = to_crs(info.crs_wkt)
    if crs.is_geographic:
        mx, _ = metres_per_degree(crs, (info.bounds[1] + info.bounds[3]) / 2)
        return info.res[0] * mx
    return info.res[0] * metres_per_unit(crs)


def default_cell_size_m(info: RasterInfo, references: list[ReferenceImage]) -> tuple[float, str]:
    """Cell size when none is given: the references' ground size (same scale), but at least
    :data:`MIN_CELL_PIXELS` raster pixels; 100 raster pixels when the references' ground size
    is unknown. One function for the search and the drawing tool's estimate."""
    pixel_m = raster_pixel_m(info)
    grounds = [r.ground_size_m for r in references if r.ground_size_m]
    if grounds:
        ground = float(np.median(grounds))
        if ground >= MIN_CELL_PIXELS * pixel_m:
            return ground, "the Mars reference's ground size"
        return MIN_CELL_PIXELS * pixel_m, (f"{MIN_CELL_PIXELS} imagery pixels: the Mars reference's ground size, "
                                           f"{ground:,.0f} m, is only {ground / pixel_m:.1f} pixels of this imagery")
    return 100 * pixel_m, "100 raster pixels (the reference's ground resolution is unknown)"


def scale_warnings(info: RasterInfo, cell_size_m: float, references: list[ReferenceImage] = ()) -> list[str]:
    """Plain warnings when the comparison is not like for like: a cell spans too few imagery
    pixels, or the imagery is much coarser than the reference."""
    pixel_m = raster_pixel_m(info)
    out = []
    pixels = cell_size_m / pixel_m if pixel_m > 0 else float("inf")
    if pixels < MIN_CELL_PIXELS - 0.5:  # the default of 32 pixels rounds to a few metres less
        out.append(f"A cell of {cell_size_m:,.0f} m spans only {pixels:.1f} pixels of the imagery ({pixel_m:,.1f} m "
                   f"a pixel), blown up to the network's input: such cells have little texture, so featureless "
                   f"places (water) can rank best. Use cells of at least {MIN_CELL_PIXELS * pixel_m:,.0f} m or "
                   "finer imagery.")
    ratio = _imagery_to_reference(pixel_m, references)
    if ratio is not None and ratio > 10:
        out.append(f"The imagery ({pixel_m:,.1f} m a pixel) is {ratio:,.0f} times coarser than the Mars reference: "
                   "the same texture is seen at very different detail. Finer imagery (or a coarser reference) "
                   "compares better.")
    return out


def _imagery_to_reference(pixel_m: float, references: list[ReferenceImage]) -> float | None:
    """How many times coarser an imagery pixel is than a reference pixel (median), when known."""
    res = []
    for ref in references:
        if not ref.ground_size_m:
            continue
        try:
            with GreyReader(ref.path, what="reference image") as reader:
                res.append(ref.ground_size_m / max(min(reader.ds.width, reader.ds.height), 1))
        except AnalogFinderError:
            continue
    return pixel_m / float(np.median(res)) if res else None


def plan_grid(params: SearchParams, references: list[ReferenceImage] | None = None,
              feedback: Feedback | None = None, info: RasterInfo | None = None) -> tuple[RasterInfo, CellGrid]:
    """Describe the raster (unless ``info`` already does) and build the grid (no pixel is read)."""
    info = info or describe_raster(params.raster)
    cell = params.cell_size_m
    if cell is not None and not cell > 0:  # 0 is a mistake, not "the default"
        raise InputError(f"The cell size must be above 0 metres, not {cell:g}", "Give e.g. 500, or leave it out")
    if params.stride_m is not None and not params.stride_m > 0:
        raise InputError(f"The stride must be above 0 metres, not {params.stride_m:g}",
                         "Give e.g. the cell size, or leave it out")
    if cell is None:
        cell, why = default_cell_size_m(info, references or [])
        if feedback:
            feedback.log(f"Cell size: {cell:.1f} m ({why})")
    if feedback:
        for warning in scale_warnings(info, cell, references or []):
            feedback.log(f"Warning: {warning}")
    grid = build_grid(info, cell, params.area, params.stride_m, params.min_coverage, params.max_cells, params.force)
    return info, grid


def default_reader_threads(device_type: str = "cpu") -> int:
    """Reader threads: half the cores, up to 8; at least one, or two for a GPU encoder (it
    encodes faster than one reader reads). On two cores one reader keeps up with the encoder
    and a second only contends with it: 11 % slower with cells to resample, 2 % without."""
    return max(1 if device_type == "cpu" else 2, min(8, (os.cpu_count() or 1) // 2))


def iter_patch_batches(raster: str, grid: CellGrid, size: int, batch_size: int, band: int | None = None,
                       prefetch: int = 2, stop: threading.Event | None = None, threads: int | None = None,
                       block_reads: bool | None = None, prepare=None, reopen_bytes: float = READER_REOPEN_BYTES,
                       reuse: bool = False, held: int = 1):
    """Yield ``(indices, patches, valid_fraction)`` batches in order, read by background threads.

    Each reader thread owns its own GDAL handle (GDAL releases the GIL while it reads), and
    together they stay at most ``threads + prefetch`` batches ahead of the consumer, so memory
    depends on the batch size, not on the number of cells.

    With ``reuse`` the patches of a batch are read into one of ``threads + prefetch + held``
    buffers made once, and a batch's buffer is read into again once the consumer has asked for
    ``held`` more batches (by default: once it asks for the next one): use (or copy) a batch's
    patches before then. A long search then
    allocates no batch-sized arrays: with fresh ones, each thread's malloc arena keeps tens of
    MB it freed (glibc), and the process's peak memory crept up over the first thousands of
    batches.

    Args:
        threads: reader threads (``None``: :func:`default_reader_threads`).
        block_reads: read cells that tile the raster in blocks (``None``: when possible).
        prepare: optional ``f(idx, patches, valid) -> item`` run in the reader thread (e.g.
            normalisation); its result is yielded instead of ``(idx, patches, valid)``.
        reopen_bytes: source bytes a reader reads before it reopens the raster.
    """
    from concurrent.futures import ThreadPoolExecutor

    stop = stop or threading.Event()
    n = len(grid)
    threads = max(1, int(threads or default_reader_threads()))
    info = describe_raster(raster)
    plan = ReadPlan(False)
    if block_reads is not False:
        plan = plan_reads(info, grid, size)
    with GreyReader(raster, band=band) as first:
        stretch = (first.lo, first.hi)  # computed once, shared by every reader thread
        bands = len(first.bands)
        block_h = int(first.ds.block_shapes[first.bands[0] - 1][0])
        item = max(np.dtype(first.ds.dtypes[b - 1]).itemsize for b in first.bands)
    # Source bytes a cell costs (roughly); a reader is reopened after ``reopen_bytes`` so
    # GDAL's block cache (global, up to 5 % of RAM by default) does not grow with the area:
    # closing a dataset drops its cached blocks. Grid rows read in blocks come down the raster,
    # so a reader is reopened, once past ``reopen_bytes``, when its next strip starts below
    # every row of blocks it has cached (none would be used again); past ``cap``, anyway.
    # Reopening every few strips read again the row of blocks the next strip shared.
    px_w, px_h = info.res
    cell_bytes = max(1.0, (grid.cell_w / px_w) * (grid.cell_h / px_h) * bands)
    strips = plan.mode != "cell"
    cap = max(reopen_bytes, 3.0 * block_h * info.width * bands * item) if strips else reopen_bytes
    local = threading.local()
    readers: list[GreyReader] = []
    lock = threading.Lock()
    depth = threads + max(0, prefetch)
    # One buffer per batch that can exist at once: ``depth`` submitted plus the ``held`` the consumer has.
    held = max(1, int(held))
    pool: queue.SimpleQueue | None = None
    if reuse:
        pool = queue.SimpleQueue()
        for _ in range(min(depth + held, -(-n // batch_size))):
            pool.put(np.empty((batch_size, size, size), dtype=np.float32))

    def job(start: int, buffer):
        if stop.is_set():
            return None
        reader = getattr(local, "reader", None)
        idx = np.arange(start, min(start + batch_size, n))
        first_row = plan.raster_rows(int(grid.rows[start]))[0] if strips else None
        if reader is None:
            reader = local.reader = GreyReader(raster, band=band, stretch=stretch)
            local.read_bytes, local.end_row = 0.0, None
            with lock:
                readers.append(reader)
        elif local.read_bytes > cap or (local.read_bytes > reopen_bytes and (
                first_row is None or first_row // block_h > (local.end_row - 1) // block_h)):
            reader.reopen()
            local.read_bytes = 0.0
        patches, valid = read_cells(reader, grid, idx, size, plan, out=buffer)
        local.read_bytes += idx.size * cell_bytes
        if strips:
            local.end_row = plan.raster_rows(int(grid.rows[idx[-1]]))[1]
        return prepare(idx, patches, valid) if prepare else (idx, patches, valid)

    starts = iter(range(0, n, batch_size))
    pending: collections.deque = collections.deque()
    executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="analog-reader")
    in_use: collections.deque = collections.deque()  # the buffers of the batches the consumer holds

    def submit(start: int) -> None:
        buffer = pool.get_nowait() if pool is not None else None
        pending.append((executor.submit(job, start, buffer), buffer))

    try:
        for start in itertools.islice(starts, depth):
            submit(start)
        while pending:
            fut, buffer = pending.popleft()
            item = fut.result()
            if buffer is not None:
                in_use.append(buffer)
                if len(in_use) > held:
                    pool.put(in_use.popleft())  # the consumer is done with the oldest batch it held
            nxt = next(starts, None)
            if nxt is not None:
                submit(nxt)
            if item is None:
                return
            yield item
    finally:
        stop.set()
        for fut, _ in pending:
            fut.cancel()
        executor.shutdown(wait=True)
        for reader in readers:
            reader.close()


def score_embeddings(embeddings: np.ndarray, reference_embeddings: np.ndarray,
                     aggregate: str = "nearest") -> tuple[np.ndarray, np.ndarray]:
    """Euclidean dissimilarity of each embedding to the reference(s) (:class:`~.queries.ReferenceQuery`).

    Returns:
        ``(dissimilarity, nearest)``: float32 distances and, for ``nearest``, the index of the
        closest reference (0 for ``mean``).
    """
    scored = ReferenceQuery(reference_embeddings, aggregate).score(embeddings)
    return scored["dissimilarity"], scored["nearest"]


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
               feedback: Feedback | None = None, encoder: AnalogEncoder | None = None,
               also_write: dict | None = None) -> SearchResult:
    """Run a search and (optionally) write its outputs.

    Args:
        params: what to search.
        out_raster: dissimilarity GeoTIFF to write (``None``: not written).
        out_cells: GeoPackage of cells to write (``None``: not written).
        feedback: progress, log and cancel.
        encoder: an already loaded encoder (else ``params.model`` is loaded).
        also_write: more outputs of the run, ``{name: (path, write(result, temporary_path))}``
            (e.g. the picture): written once every cell is scored, then moved into place with
            the raster and the cell layer, as one set.

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
    if params.scheduler:
        from .distributed import parse_scheduler

        parse_scheduler(params.scheduler)  # a bad one is named before anything loads
    also_write = {k: v for k, v in (also_write or {}).items() if v and v[0]}
    check_outputs({"raster": out_raster, "cell layer": out_cells, "embedding raster": params.keep_embeddings,
                   **{k: p for k, (p, _) in also_write.items()}},
                  {"raster": params.raster, "embeddings": params.embeddings, "reference": params.references,
                   "model": params.model, "cache folder": params.cache_dir})
    for path, what in ((out_raster, "output raster"), (out_cells, "output cell layer"),
                       (params.keep_embeddings, "embedding raster")):
        if path:
            check_destination(path, what)
    cache = EmbeddingCache(params.cache_dir) if params.cache_dir else None
    source = EmbeddingRaster.open(params.embeddings) if params.embeddings else None
    if source is not None:
        if params.raster:
            source.check_raster(params.raster)
        source.check_grid(params.cell_size_m, params.stride_m)
        if params.area is not None:
            raise InputError("An embedding raster fixes the area: an area cannot be given with it",
                             "Leave the area out, or embed the new area with 'embed-area'")
        source.check_nodata(1.0 - params.max_nodata)
        source.check_band(params.band)
        raster = source.facts.raster
    else:
        raster = params.raster
    info = describe_raster(raster) if source is None else None  # a bad raster is named before the model loads
    encoder = encoder or load_runtime(params.model or (source.facts.model_path if source else None) or None,
                                      params.runtime, params.device)
    if source is not None:
        source.check_model(encoder)
    size = encoder.input_size
    if params.examples is not None:
        example_names, example_emb, example_patches = params.examples
        references = [ReferenceImage(name, patch, None) for name, patch in zip(example_names, example_patches)]
    else:
        references = load_references(params.references, size, params.reference_resolution_m)
        example_emb = None
    if source is not None:
        grid = source.grid
    else:
        info, grid = plan_grid(params, references, feedback, info)
    n = len(grid)
    feedback.log(f"Device: {describe_device(encoder.device)}; model: {encoder.path or 'in memory'}")
    feedback.log(f"Cells: {n:,} of {grid.cell_size_m:g} m (grid {grid.n_rows} x {grid.n_cols}); "
                 f"references: {len(references)}")
    check_cancelled(feedback)

    ref_emb = example_emb if example_emb is not None else encoder.embed(np.stack([r.patch for r in references]))
    query = ReferenceQuery(quantise(ref_emb), params.aggregate)
    min_valid = 1.0 - params.max_nodata
    amp_dtype = _amp_dtype(encoder, params.amp)
    precision = f"amp-{str(amp_dtype).replace('torch.', '')}" if amp_dtype is not None else "fp32"
    dissimilarity = np.full(n, np.nan, dtype=np.float32)
    valid_fraction = np.zeros(n, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int32)
    per_reference = np.full((n, len(references)), np.nan, dtype=np.float32) if len(references) > 1 else None
    names = reference_names(references)
    extra: dict = {"cache": "off", "cells_read": 0, "precision": precision, "runtime": encoder.runtime,
                   "embeddings": params.embeddings or "", "raster": raster,
                   "query": "example" if params.examples is not None else "references"}
    facts = None
    if source is None and (cache is not None or params.keep_embeddings):
        facts = embedding_facts(encoder, raster, grid, params.band, min_valid, params.min_coverage)
        facts.precision = precision  # in the cache key: mixed-precision embeddings are not the float32 ones
    if cache is not None and source is None:
        source = cache.lookup(facts)
        extra["cache"] = "hit" if source is not None else "miss"
    with contextlib.ExitStack() as outputs:
        # Outputs are written while the cells are scored (under temporary names, moved into
        # place together at the end): each finished batch goes to a writer thread.
        tmp = outputs.enter_context(atomic_outputs({"raster": out_raster, "cells": out_cells,
                                                    "embeddings": params.keep_embeddings,
                                                    **{k: p for k, (p, _) in also_write.items()}}))
        sink = None
        if out_raster or out_cells:
            sink = outputs.enter_context(ResultStream(
                tmp["raster"], tmp["cells"], grid,
                lambda index: cell_columns(dissimilarity, valid_fraction, nearest, names, index,
                                           per_reference=per_reference),
                tags=_output_tags(encoder.path, str(encoder.device), references, grid, params.aggregate),
                fields=cell_fields(names), run_id=new_run_id()))
        writers = []
        if source is not None and tmp["embeddings"]:
            shutil.copyfile(source.path, tmp["embeddings"])  # the embeddings asked for are those
        if source is None and tmp["embeddings"]:
            writers.append(_embedding_writer(outputs, tmp["embeddings"], grid, facts))
        if source is None and cache is not None:
            writers.append(_embedding_writer(outputs, _cache_entry(outputs, cache, facts), grid, facts))

        def consume(idx, valid, ok, emb, scored) -> None:
            valid_fraction[idx] = valid
            if scored is not None:
                sel = idx[ok]
                dissimilarity[sel] = scored["dissimilarity"]
                nearest[sel] = scored["nearest"]
                if per_reference is not None:
                    per_reference[sel] = scored["per_reference"]
            for w in writers:
                w.store(idx, valid, ok, emb)
            if sink is not None:
                sink.put(int(idx[0]), int(idx[-1]) + 1)

        if source is not None:
            feedback.log(f"Embeddings of these {n:,} cells come from {source.path}; only distances are computed")
            encode_s = query_embedding_raster(source, query.score, min_valid, consume, feedback)
        elif params.scheduler:  # the cells are embedded on a Dask cluster (Dask imported only then)
            from .distributed import encode_on_cluster

            encode_s = encode_on_cluster(params, encoder, info, grid, query.score, min_valid, consume, extra,
                                         feedback, t0)
        else:
            encode_s = _encode_stream(params, encoder, info, grid, query.score, min_valid, amp_dtype, consume,
                                      extra, feedback, t0)
        for w in writers:
            w.close()
        rank, pct = rank_scores(dissimilarity)
        seconds = time.perf_counter() - t0
        result = SearchResult(grid, dissimilarity, valid_fraction, nearest, rank, pct, references,
                              str(encoder.device), encoder.path, seconds, encode_s, extra, per_reference)
        skipped = int((~result.scored).sum())
        feedback.log(f"Scored {n - skipped:,} cells ({skipped:,} skipped as mostly nodata) in {seconds:.1f} s: "
                     f"{result.cells_per_s:,.0f} cells/s on {encoder.device}")
        if skipped == n:
            raise InputError("Every cell in the area is mostly nodata, so nothing could be compared",
                             "Choose an area over valid imagery, or raise the largest nodata share")
        check_cancelled(feedback)
        if sink is not None:
            # The columns that need every cell: rank and percentile, and the best sites.
            scored = np.nonzero(rank > 0)[0]
            sites = best_cells(rank, params.top_k) if params.top_k > 0 else None
            sink.finish(scored, {"rank": rank[scored], "percentile": pct[scored]}, sites,
                        None if sites is None else result.columns(sites))
        for k, (_, write) in also_write.items():
            check_cancelled(feedback)
            write(result, tmp[k])
    return result


def cell_fields(names: np.ndarray) -> list[tuple[str, str]]:
    """The cell layer's fields: :data:`~.outputs.CELL_FIELDS`, and with several references each
    one's own dissimilarity after ``dissimilarity``."""
    from .outputs import CELL_FIELDS

    if len(names) <= 2:  # one reference (and "" for not scored)
        return CELL_FIELDS
    at = [f for f, _ in CELL_FIELDS].index("dissimilarity") + 1
    return CELL_FIELDS[:at] + [(c, "real") for c in reference_columns(list(names[:-1]))] + CELL_FIELDS[at:]


def _embedding_writer(stack: contextlib.ExitStack, path: str, grid: CellGrid, facts) -> EmbeddingRasterWriter:
    """An embedding-raster writer aborted when ``stack`` unwinds unfinished."""
    writer = EmbeddingRasterWriter(path, grid, facts)
    stack.callback(writer.abort)
    return writer


def _cache_entry(stack: contextlib.ExitStack, cache: EmbeddingCache, facts) -> str:
    """A temporary name for a new cache entry, moved into place when ``stack`` unwinds without
    an error (removed otherwise)."""
    final = cache.path_for(facts)
    remove_stale_partials(final)  # left by runs killed while writing this entry
    tmp = partial_name(final)

    def done(exc_type, exc, tb):
        if exc_type is None and tmp.exists():
            os.replace(tmp, final)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return False

    stack.push(done)
    return str(tmp)


def query_embedding_raster(source: EmbeddingRaster, score, min_valid: float, consume, feedback: Feedback) -> float:
    """Run ``score`` over an embedding raster's cells, chunk by chunk, handing each chunk to
    ``consume(idx, valid, ok, embeddings_of_ok, scored)`` in cell order; returns the seconds spent.

    A cell takes part when it was encoded and its valid share is at least ``min_valid`` (to the
    half-precision rounding of the stored share).
    """
    t = time.perf_counter()
    n = len(source.grid)
    tol = min_valid * 2.0 ** -10  # the stored share is rounded to half precision
    for idx, valid, emb in source.iter_chunks():
        check_cancelled(feedback)
        ok = np.isfinite(emb[:, 0]) & (valid >= min_valid - tol)
        e = emb if ok.all() else emb.T[:, ok].T  # stays band-first (see queries.distances_to)
        consume(idx, valid, ok, e, score(e) if score is not None and len(e) else None)
        stop = int(idx[-1]) + 1
        feedback.progress(stop / n, f"{stop:,}/{n:,} cells (embeddings)")
    return time.perf_counter() - t


def _output_tags(model_path: str | None, device: str, references: list[ReferenceImage], grid: CellGrid,
                 aggregate: str) -> dict:
    """Metadata written into the dissimilarity GeoTIFF."""
    return {"model": model_path or "", "device": device, "references": ";".join(r.path for r in references),
            "cell_size_m": grid.cell_size_m, "stride_m": grid.stride_m, "aggregate": aggregate,
            "meaning": "lower = more Mars-like"}


def describe_device(device) -> str:
    """The device in words for the log: its name, and the CPU threads torch uses (an ONNX
    Runtime device describes itself: torch is not imported)."""
    if hasattr(device, "describe"):
        return device.describe()
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def _to_tensor(encoder: AnalogEncoder, patches: np.ndarray):
    """``encoder.to_tensor(patches)``, normalising the batch's own array in place (it is not used
    afterwards): the same values without new batch-sized arrays (for ONNX Runtime, an array)."""
    if patches.dtype != np.float32 or not patches.flags.c_contiguous or not patches.flags.writeable:
        return encoder.to_tensor(patches)
    if encoder.runtime != "torch":
        return normalise_in_place(patches, encoder.metadata.normalisation)[:, None]
    import torch

    return torch.from_numpy(normalise_in_place(patches, encoder.metadata.normalisation)[:, None])


def _amp_dtype(encoder: AnalogEncoder, amp: bool):
    """Mixed-precision type on CUDA when asked for (bfloat16 where supported), else ``None``."""
    if not amp or encoder.device.type != "cuda" or encoder.runtime != "torch":
        return None
    import torch

    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _embed_batch(encoder: AnalogEncoder, x, amp_dtype) -> np.ndarray:
    """Embed a normalised ``(N, 1, S, S)`` CPU tensor (pinned on CUDA); ``(N, D)`` float32."""
    if amp_dtype is None:
        return encoder.embed_tensor(x)
    import torch

    with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=amp_dtype):
        z = encoder.inference_network(x.to(encoder.device, non_blocking=True))
    return z.float().cpu().numpy()


def _encode_stream(params: SearchParams, encoder: AnalogEncoder, info: RasterInfo, grid: CellGrid,
                   score, min_valid: float, amp_dtype, consume, extra: dict, feedback: Feedback,
                   t0: float) -> float:
    """Read, normalise, encode and query every cell, batch by batch; returns the encoding seconds
    (summed over the encoder threads).

    Reader threads read and normalise (and pin, on CUDA) the next batches while encoder
    threads (see :class:`_EncoderThreads`) embed the batches read, round the embeddings to half
    precision (as an embedding raster keeps them) and run ``score(embeddings) -> columns`` on
    them (``None``: no query); this thread hands them out and, in cell order, calls
    ``consume(idx, valid, ok, embeddings_of_ok, columns)``. Only ``readers + prefetch +
    encoders`` batches of pixels exist at any time.
    """
    from concurrent.futures import ThreadPoolExecutor

    n = len(grid)
    size = encoder.input_size
    pin = encoder.device.type == "cuda" and encoder.runtime == "torch"

    def prepare(idx, patches, valid):
        ok = valid >= min_valid
        x = None
        if ok.any():
            x = _to_tensor(encoder, patches if ok.all() else patches[ok])
        if x is not None and pin:
            x = x.pin_memory()
        return idx, valid, ok, x

    def encode(x):
        t = time.perf_counter()
        emb = quantise(_embed_batch(encoder, x, amp_dtype))
        return emb, score(emb) if score is not None else None, time.perf_counter() - t

    threads = params.reader_threads or default_reader_threads(encoder.device.type)
    extra["reader_threads"] = threads
    extra["read_mode"] = plan_reads(info, grid, size).mode if params.block_reads else "cell"
    block = extra["read_mode"] != "cell"
    stop = threading.Event()
    encoders = _EncoderThreads(encoder.device, params.torch_threads) if encoder.runtime == "torch" else \
        encoder.thread_plan(params.torch_threads)
    extra["encoder_threads"] = encoders.workers
    extra["torch_threads"] = encoders.per_worker
    feedback.log(f"Reading with {threads} thread(s), {extra['read_mode']} reads; encoding with "
                 f"{encoders.describe()}; precision {extra['precision']}")
    encode_s = waited = 0.0
    done = 0
    if encoder.runtime == "torch":
        _ = encoder.inference_network  # built here, once, not by the encoder threads at once
    pool = ThreadPoolExecutor(max_workers=encoders.workers, thread_name_prefix="analog-encoder",
                              initializer=encoders.enter_worker)
    # The batches being encoded are held (their patches are the encoder's input) until stored.
    batches = iter_patch_batches(params.raster, grid, size, params.batch_size, params.band, stop=stop,
                                 threads=threads, block_reads=block, prepare=prepare, reuse=True,
                                 held=encoders.workers)
    pending: collections.deque = collections.deque()

    def store(idx, valid, ok, job) -> None:
        nonlocal encode_s, done
        emb = scored = None
        if job is not None:
            emb, scored, seconds = job.result()
            encode_s += seconds
        consume(idx, quantise(valid), ok, emb, scored)
        done += idx.size
        extra["cells_read"] = done
        feedback.progress(done / n, f"{done:,}/{n:,} cells, {done / max(time.perf_counter() - t0, 1e-9):,.0f} cells/s")

    try:
        ready = time.perf_counter()
        for idx, valid, ok, x in batches:
            waited += time.perf_counter() - ready  # waiting for the readers
            check_cancelled(feedback)
            pending.append((idx, valid, ok, pool.submit(encode, x) if x is not None else None))
            while len(pending) >= encoders.workers:  # fewer than ``held`` before the next is asked for
                store(*pending.popleft())
            ready = time.perf_counter()
        while pending:
            store(*pending.popleft())
    finally:
        stop.set()
        batches.close()
        pool.shutdown(wait=True, cancel_futures=True)
        encoders.restore()
    extra["encode_seconds"] = round(encode_s, 3)
    extra["wait_seconds"] = round(waited, 3)
    return encode_s


class _EncoderThreads:
    """How the encoder uses the CPU during a search.

    Torch runs a batch on one thread per core by default, but its threads meet at a barrier
    after each operation: while a reader thread holds a core, the encoder thread waiting for
    that core stalls all the others (on 2 cores the encoder ran ~35 % slower beside the
    readers). So on CPU several batches are encoded at once instead, by ``workers`` threads of
    ``per_worker`` torch threads each: one per core, up to :attr:`MAX_WORKERS` (each holds a
    batch's activations), the cores shared out between them. Independent threads do not wait
    for one another, and the operating system fits the readers in between. On CUDA one
    thread feeds the device. Torch's thread setting is restored afterwards.
    """

    MAX_WORKERS = 4

    def __init__(self, device, total: int | None) -> None:
        import torch

        self._torch = torch
        self.before = torch.get_num_threads()
        total = max(1, int(total or self.before))
        if device.type == "cpu":
            self.workers = min(total, self.MAX_WORKERS)
            self.per_worker = max(1, total // self.workers)
        else:
            self.workers, self.per_worker = 1, self.before
        torch.set_num_threads(self.per_worker)

    def enter_worker(self) -> None:
        """Run in each encoder thread first: its own torch (OpenMP) thread count."""
        self._torch.set_num_threads(self.per_worker)

    def describe(self) -> str:
        if self.workers == 1:
            return f"1 thread ({self.per_worker} torch thread(s))"
        return f"{self.workers} threads of {self.per_worker} torch thread(s) each"

    def restore(self) -> None:
        self._torch.set_num_threads(self.before)


def write_outputs(result: SearchResult, out_raster: str | None, out_cells: str | None,
                  params: SearchParams | None = None) -> None:
    """Write the GeoTIFF and GeoPackage of a finished result at once (atomically, both or neither).

    :func:`run_search` writes the same files while it runs; this writes them again from a
    result (e.g. to other destinations).
    """
    run = {RUN_ID: new_run_id()}
    tags = _output_tags(result.model_path, result.device, result.references, result.grid,
                        params.aggregate if params else "nearest")
    with atomic_outputs({"raster": out_raster, "cells": out_cells}) as tmp:
        if tmp["raster"]:
            write_cell_raster(tmp["raster"], result.grid, result.dissimilarity, {**tags, **run})
        if tmp["cells"]:
            write_cells_gpkg(tmp["cells"], result.grid, result.columns(), top_k=params.top_k if params else 10,
                             fields=cell_fields(reference_names(result.references)), metadata=run)
