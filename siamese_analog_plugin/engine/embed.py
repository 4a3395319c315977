"""Embed an area once: cells -> patches -> embeddings -> an embedding raster (``embed-area``).

The same pipeline as the search (:func:`~.search._encode_stream`: reader threads, encoder
threads, batches in cell order), with no query: every batch goes to an
:class:`~.embeddings.EmbeddingRasterWriter`, written under a temporary name and moved into
place at the end. Every question afterwards (Mars references, a cell by example, landform
classes, regions x references) is a cheap query over that file.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from .embeddings import EmbeddingRasterWriter, embedding_facts
from .encoder import AnalogEncoder
from .errors import InputError
from .feedback import Feedback, check_cancelled
from .grid import DEFAULT_MAX_CELLS, Area
from .imagery import describe_raster
from .outputs import atomic_outputs, check_destination
from .runtime import load_runtime

__all__ = ["EmbedParams", "EmbedResult", "run_embed_area"]


@dataclass
class EmbedParams:
    """What ``embed-area`` needs (the grid and model fields of :class:`~.search.SearchParams`)."""

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
    max_cells: int = DEFAULT_MAX_CELLS
    force: bool = False
    reader_threads: int | None = None
    torch_threads: int | None = None
    block_reads: bool = True
    runtime: str = "auto"
    scheduler: str | None = None  # embed on Dask (see :mod:`.distributed`); None: this process


@dataclass
class EmbedResult:
    """An embedding run: where it went and how it went."""

    path: str | None
    grid: object
    encoded: int
    device: str
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def cells_per_s(self) -> float:
        return len(self.grid) / self.seconds if self.seconds > 0 else float("nan")


def run_embed_area(params: EmbedParams, out: str | None, feedback: Feedback | None = None,
                   encoder: AnalogEncoder | None = None) -> EmbedResult:
    """Encode every cell of an area into the embedding raster ``out``.

    The cell size defaults to 100 raster pixels (there is no reference to match). Raises
    InputError, ModelError, OutputError; SearchCancelled when cancelled (nothing written).
    """
    from .search import SearchParams, _encode_stream, plan_grid

    feedback = feedback or Feedback()
    t0 = time.perf_counter()
    if params.batch_size < 1:
        raise InputError(f"The batch size must be at least 1, not {params.batch_size}", "Use e.g. 128")
    if not 0 <= params.max_nodata < 1:
        raise InputError(f"The largest nodata share must be in [0, 1), not {params.max_nodata}", "Use e.g. 0.5")
    if out:
        if not str(out).lower().endswith((".tif", ".tiff")):
            raise InputError(f"The embedding raster '{out}' is not a GeoTIFF name", "Give a .tif file name")
        check_destination(out, "embedding raster")
    sp = SearchParams(raster=params.raster, references=None, area=params.area, cell_size_m=params.cell_size_m,
                      stride_m=params.stride_m, min_coverage=params.min_coverage, max_nodata=params.max_nodata,
                      band=params.band, model=params.model, device=params.device, batch_size=params.batch_size,
                      max_cells=params.max_cells, force=params.force, reader_threads=params.reader_threads,
                      torch_threads=params.torch_threads, block_reads=params.block_reads, runtime=params.runtime,
                      scheduler=params.scheduler)
    if params.scheduler:
        from .distributed import parse_scheduler

        parse_scheduler(params.scheduler)  # a bad one is named before anything loads
    info = describe_raster(params.raster)
    encoder = encoder or load_runtime(params.model, params.runtime, params.device)
    info, grid = plan_grid(sp, None, feedback, info)
    n = len(grid)
    feedback.log(f"Cells: {n:,} of {grid.cell_size_m:g} m (grid {grid.n_rows} x {grid.n_cols}); "
                 f"model: {encoder.path or 'in memory'}; embedding: {encoder.embedding_dim} values a cell")
    check_cancelled(feedback)
    min_valid = 1.0 - params.max_nodata
    facts = embedding_facts(encoder, params.raster, grid, params.band, min_valid, params.min_coverage)
    extra: dict = {"precision": "fp32", "cells_read": 0}
    encoded = 0
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_outputs({"embeddings": out}))
        writer = None
        if tmp["embeddings"]:
            writer = EmbeddingRasterWriter(tmp["embeddings"], grid, facts)
            stack.callback(writer.abort)

        def consume(idx, valid, ok, emb, scored) -> None:
            nonlocal encoded
            encoded += int(ok.sum())
            if writer is not None:
                writer.store(idx, valid, ok, emb)

        if params.scheduler:  # Dask imported only then
            from .distributed import encode_on_cluster

            encode_on_cluster(sp, encoder, info, grid, None, min_valid, consume, extra, feedback, t0)
        else:
            _encode_stream(sp, encoder, info, grid, None, min_valid, None, consume, extra, feedback, t0)
        if encoded == 0:
            raise InputError("Every cell in the area is mostly nodata, so nothing could be encoded",
                             "Choose an area over valid imagery, or raise the largest nodata share")
        check_cancelled(feedback)
        if writer is not None:
            writer.close()
    seconds = time.perf_counter() - t0
    feedback.log(f"Encoded {encoded:,} of {n:,} cells in {seconds:.1f} s ({n / max(seconds, 1e-9):,.0f} cells/s)")
    return EmbedResult(out, grid, encoded, str(encoder.device), seconds, extra)
