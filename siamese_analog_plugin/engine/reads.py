"""Windowed reads of a grid's cells: how their pixels are read (:class:`ReadPlan`) and the reads.

Shared by the single-process pipeline (:mod:`.search`) and the tasks of a distributed run
(:mod:`.distributed`), so both read the same values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .grid import CellGrid
from .imagery import GreyReader, RasterInfo

__all__ = ["ROWS_READ_PIXELS", "ReadPlan", "plan_reads", "read_cells"]


@dataclass(frozen=True)
class ReadPlan:
    """How the cells' pixels are read.

    ``block``: every cell is an axis-aligned, whole-pixel window of exactly ``size`` x ``size``
    raster pixels (no resampling), at whole-pixel steps, inside the raster; then the cells of
    one grid row in a batch are read with one windowed read and sliced (identical values,
    one GDAL call instead of one per cell).

    ``rows``: the cells are axis-aligned windows (any size and fraction of a pixel), inside
    the raster: the cells of a grid row in a batch are read as one strip at full resolution
    and averaged down, or interpolated up when smaller than ``size``
    (:meth:`GreyReader.read_row_resampled`; the values of GDAL reading each cell, to GDAL's
    rounding).

    Otherwise (cells of more than :data:`ROWS_READ_PIXELS`, which GDAL can read from
    overviews; cells shrunk on one axis and enlarged on the other; a rotated raster; cells
    that leave it) each cell is read and resampled by GDAL on its own.
    """

    block: bool
    col0: int = 0
    row0: int = 0
    step_px: int = 0
    step_py: int = 0
    rows: bool = False
    x0: float = 0.0  # the rows plan: cell (0, 0)'s top-left, cell size and steps, in pixels
    y0: float = 0.0
    cell_px: float = 0.0
    cell_py: float = 0.0
    sx: float = 0.0
    sy: float = 0.0

    @property
    def mode(self) -> str:
        return "block" if self.block else "rows" if self.rows else "cell"

    def raster_rows(self, grid_row: int) -> tuple[int, int] | None:
        """The raster rows ``[first, end)`` a strip of grid row ``grid_row`` reads (``None``
        when cells are read one by one)."""
        if self.block:
            first = self.row0 + grid_row * self.step_py
            return first, first + int(self.cell_py)
        if self.rows:
            top = self.y0 + grid_row * self.sy
            return int(math.floor(top)), int(math.ceil(top + self.cell_py))
        return None


ROWS_READ_PIXELS = 1_000_000  # source pixels a strip read holds at most (per band; roughly)


def plan_reads(info: RasterInfo, grid: CellGrid, size: int, transform=None) -> ReadPlan:
    """Decide whether the cells can be read in blocks (see :class:`ReadPlan`)."""
    if transform is None:
        import rasterio

        with rasterio.open(info.path) as ds:
            transform = ds.transform
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    if b != 0 or d != 0 or a <= 0 or e >= 0 or len(grid) == 0:
        return ReadPlan(False)

    def whole(v: float) -> int | None:
        r = round(v)
        return int(r) if abs(v - r) < 1e-6 else None

    x0, y0 = (grid.origin_x - c) / a, (f - grid.origin_y) / -e
    cell_px, cell_py, step_px, step_py = grid.cell_w / a, grid.cell_h / -e, grid.step_x / a, grid.step_y / -e
    eps = 1e-6
    if x0 < -eps or y0 < -eps or x0 + int(grid.cols.max()) * step_px + cell_px > info.width + eps or \
            y0 + int(grid.rows.max()) * step_py + cell_py > info.height + eps:
        return ReadPlan(False)  # cells leave the raster
    col0, row0, cw, ch, sx, sy = (whole(v) for v in (x0, y0, cell_px, cell_py, step_px, step_py))
    if None not in (col0, row0, cw, ch, sx, sy) and cw == size and ch == size and sx >= 1 and sy >= 1:
        return ReadPlan(True, col0, row0, sx, sy, cell_px=float(size), cell_py=float(size))
    # Both axes shrunk (averaged) or both enlarged (interpolated).
    same_way = (cell_px >= size - eps) == (cell_py >= size - eps)
    if same_way and step_px > 0 and step_py > 0 and \
            cell_px * cell_py <= ROWS_READ_PIXELS:  # larger cells: GDAL reads them reduced (overviews)
        return ReadPlan(False, rows=True, x0=max(x0, 0.0), y0=max(y0, 0.0), cell_px=cell_px, cell_py=cell_py,
                        sx=step_px, sy=step_py)
    return ReadPlan(False)


def read_cells(reader: GreyReader, grid: CellGrid, idx: np.ndarray, size: int,
               plan: ReadPlan, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Grey patches ``(n, size, size)`` in [0, 1] and valid fractions ``(n,)`` of cells ``idx``.

    ``out``: a float32 C-contiguous buffer of at least ``n`` patches to read into (its first
    ``n`` are returned) instead of a new array.

    Raises:
        InputError: GDAL could not read the pixels (a damaged block, a lost connection): the
            same line in this process and on a Dask worker.
    """
    try:
        return _read_cells(reader, grid, idx, size, plan, out)
    except Exception as exc:
        from rasterio.errors import RasterioError, RasterioIOError

        if not isinstance(exc, (RasterioError, RasterioIOError)):
            raise
        raise InputError(f"Cannot read the pixels of the raster '{reader.path}': {exc}",
                         "Check that the file is whole and still reachable (a damaged block, a lost connection)"
                         ) from exc


def _read_cells(reader: GreyReader, grid: CellGrid, idx: np.ndarray, size: int,
                plan: ReadPlan, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    patches = out[:idx.size] if out is not None else np.empty((idx.size, size, size), dtype=np.float32)
    valid = np.empty(idx.size, dtype=np.float32)
    if plan.rows:
        return patches, _read_rows_resampled(reader, grid, idx, size, plan, patches, valid)
    if not plan.block:
        for j, b in enumerate(grid.bounds_array(idx)):
            patches[j], valid[j] = reader.read_bounds(tuple(b), size)
        return patches, valid
    rows, cols = grid.rows[idx], grid.cols[idx]
    # One read per grid row of the batch (or per stretch of it, see _strips): the strip from its
    # first to its last cell, each cell a window of it, converted straight from the strip's
    # pixels into its patch.
    for a, b in _strips(rows, cols, max(1, int(ROWS_READ_PIXELS / (size * plan.step_px)))):
        c = cols[a:b]
        c_lo, c_hi = int(c[0]), int(c[-1])
        # When the columns span exactly as many columns as there are cells, they are every cell
        # from the first to the last, read as a view.
        at = slice(0, b - a) if c_hi - c_lo == b - a - 1 else c - c_lo
        valid[a:b] = reader.read_row_cells(plan.col0 + c_lo * plan.step_px, plan.row0 + int(rows[a]) * plan.step_py,
                                           (c_hi - c_lo) * plan.step_px + size, size, plan.step_px, at,
                                           patches[a:b])
    return patches, valid


def _strips(rows: np.ndarray, cols: np.ndarray, span: int):
    """``(start, stop)`` ranges of a batch's cells read as one strip: cells of one grid row
    (consecutive in the batch, the grid being row-major, their columns rising) within ``span``
    grid columns of the first, kept or not (a row with a gap is not read across it whole)."""
    bounds = np.flatnonzero(np.diff(rows)) + 1
    for a, b in zip(np.r_[0, bounds], np.r_[bounds, rows.size]):
        s = int(a)
        while s < b:
            e = max(s + 1, s + int(np.searchsorted(cols[s:b], cols[s] + span)))
            yield s, e
            s = e


def _read_rows_resampled(reader: GreyReader, grid: CellGrid, idx: np.ndarray, size: int, plan: ReadPlan,
                         patches: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """:func:`read_cells` for a ``rows`` plan: each grid row of the batch in strips of about
    :data:`ROWS_READ_PIXELS` source pixels at most, resampled cell by cell."""
    rows, cols = grid.rows[idx], grid.cols[idx]
    for s, e in _strips(rows, cols, max(1, int(ROWS_READ_PIXELS / (plan.cell_py * max(plan.sx, 1.0))))):
        c = cols[s:e]
        c_lo = int(c[0])
        valid[s:e] = reader.read_row_resampled(plan.x0 + c_lo * plan.sx, plan.y0 + int(rows[s]) * plan.sy,
                                               plan.cell_px, plan.cell_py, plan.sx, int(c[-1]) - c_lo + 1, size,
                                               c - c_lo, patches[s:e])
    return valid
