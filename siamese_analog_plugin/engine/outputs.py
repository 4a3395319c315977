"""Writing results: the dissimilarity GeoTIFF and the GeoPackage of cells.

Outputs are first written under temporary names beside their destination and renamed into
place only once every output is complete, so a failure or a cancel never leaves a half file.

A search writes its outputs while it runs (:class:`ResultStream`): each batch of scored cells
goes to the GeoTIFF (a strip of blocks at a time, each block written once) and to the
GeoPackage (one transaction per batch) from a background thread, so the encoder never waits
for the disk and nothing but a strip of the raster is held. The columns that need every cell
(rank, percentile) and the ``analog_sites`` layer are completed in one cheap final pass.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import sqlite3
import threading
import uuid
from pathlib import Path

import numpy as np

from .errors import AnalogFinderError, OutputError
from .safety import SIDECARS, hold_destinations, note_committed, partial_name, signals_deferred

__all__ = [
    "NODATA",
    "CELLS_LAYER",
    "SITES_LAYER",
    "CELL_FIELDS",
    "check_destination",
    "atomic_outputs",
    "best_cells",
    "RasterStream",
    "CellLayerWriter",
    "ResultStream",
    "write_cell_raster",
    "write_cells_gpkg",
    "new_run_id",
    "same_run",
]

NODATA = -9999.0
CELLS_LAYER = "cells"
SITES_LAYER = "analog_sites"


def check_destination(path: str | os.PathLike, what: str) -> Path:
    """Fail early, before any work, when ``path`` cannot be written.

    Raises:
        OutputError: the folder does not exist or is not writable, or the path is a folder.
    """
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"The {what} '{p}' is a folder", "Give a file name, e.g. result.tif")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"Cannot write the {what} '{p}': the folder '{parent}' does not exist",
                          "Create the folder or choose another destination")
    if not os.access(parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"Cannot write the {what} '{p}': permission denied",
                          "Choose a destination in a folder you can write to")
    return p


_CHECK = "Check the destination (free disk space, permissions)"


def _why(exc: BaseException) -> str:
    """The reason GDAL or SQLite gave, or a plain guess when they gave none (a full disk makes
    OGR fail without a message)."""
    return str(exc).strip().rstrip(".") or "the file could not be written (is the disk full?)"


def _temp_name(path: Path, tag: str = "") -> Path:
    return partial_name(path, tag)


def _remove_with_sidecars(path: Path) -> None:
    for extra in SIDECARS:
        with contextlib.suppress(OSError):
            Path(str(path) + extra).unlink()


def _move_with_sidecars(src: Path, dst: Path) -> None:
    for extra in SIDECARS:
        side = Path(str(src) + extra)
        if extra == "" or side.exists():
            os.replace(side, Path(str(dst) + extra))


def _name_destination(exc: BaseException, tmp: dict[str, Path], final: dict[str, Path]) -> BaseException:
    """An error that names a hidden temporary file names the user's destination instead."""
    message = str(exc)
    for k, t in tmp.items():
        message = message.replace(str(t), str(final[k]))
    if type(exc) in (OSError, PermissionError) and exc.errno is not None:  # disk full, quota, I/O
        dest = next((str(final[k]) for k, t in tmp.items() if exc.filename and str(t) == str(exc.filename)),
                    ", ".join(str(p) for p in final.values()))
        return OutputError(f"Cannot write '{dest}': {exc.strerror or exc}",
                           "Free some disk space or choose another destination")
    if isinstance(exc, AnalogFinderError) and message != str(exc):
        exc.args = (message,)
    return exc


def _commit(tmp: dict[str, Path], final: dict[str, Path]) -> None:
    """Move every output into place, or none: older files are set aside first and put back
    when a move fails; Ctrl-C and SIGTERM wait until the set is in place."""
    backups: dict[str, Path] = {}
    moved: list[str] = []
    with signals_deferred():
        try:
            for k, p in final.items():
                if p.exists() or p.is_symlink():
                    backups[k] = _temp_name(p, "old")
                    _move_with_sidecars(p, backups[k])
                else:
                    for extra in SIDECARS[1:]:  # sidecars of a file that is gone
                        with contextlib.suppress(OSError):
                            Path(str(p) + extra).unlink()
                os.replace(tmp[k], p)
                moved.append(k)
                side = Path(str(tmp[k]) + ".aux.xml")
                if side.exists():
                    os.replace(side, Path(str(p) + ".aux.xml"))
        except OSError as exc:
            for k in moved:
                _remove_with_sidecars(final[k])
            for k, b in backups.items():
                with contextlib.suppress(OSError):
                    _move_with_sidecars(b, final[k])
            for t in tmp.values():
                _remove_with_sidecars(t)
            raise OutputError(f"Cannot move the results into place ({exc.strerror or exc}); the older files are "
                              "kept", "Check the destination folder") from exc
        for b in backups.values():
            _remove_with_sidecars(b)
        note_committed(final.values())


@contextlib.contextmanager
def atomic_outputs(paths: dict[str, str | os.PathLike | None]):
    """Give temporary paths for each named output; move them all into place on success.

    Usage::

        with atomic_outputs({"raster": out_tif, "cells": out_gpkg}) as tmp:
            write(tmp["raster"]); write(tmp["cells"])

    Outputs whose destination is ``None`` are skipped (``tmp[name]`` is ``None``). The
    destinations are locked for the block (:func:`.safety.hold_destinations`: a second run
    to them refuses; partial files of dead runs are removed). On any exception (including a
    cancel, Ctrl-C or SIGTERM) every temporary file is removed and nothing is replaced; errors
    that named a temporary file name its destination.
    """
    final = {k: Path(v) for k, v in paths.items() if v}
    with hold_destinations(list(final.values())):
        tmp = {k: _temp_name(p) for k, p in final.items()}
        try:
            yield {k: (str(tmp[k]) if k in tmp else None) for k in paths}
        except BaseException as exc:
            for t in tmp.values():
                _remove_with_sidecars(t)
            named = _name_destination(exc, tmp, final)
            if named is exc:
                raise
            raise named from exc
        _commit(tmp, final)


def best_cells(rank: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best-ranked cells (rank 1 first; rank 0 = not scored), in O(N)."""
    rank = np.asarray(rank)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    sel = np.nonzero((rank > 0) & (rank <= k))[0]
    return sel[np.argsort(rank[sel], kind="stable")][:k]


# -- GeoTIFF -------------------------------------------------------------------------------
class RasterStream:
    """A float32 GeoTIFF with one pixel per grid position, written as the cells come.

    Cells must arrive in grid order (row-major, as the grid keeps them). Their values go into a
    buffer of one strip of blocks (block height x grid width); a strip is written once every
    cell above its last row has come, so each compressed block is written exactly once and
    memory does not depend on the number of cells. Pixels of cells that were not kept (outside
    the area) or not scored (NaN) hold :data:`NODATA`.
    """

    def __init__(self, path: str, grid, tags: dict | None = None, description: str = "dissimilarity",
                 dtype: str = "float32", nodata: float = NODATA, colours: dict | None = None,
                 categories: list[str] | None = None) -> None:
        import rasterio

        self.path = path
        self._grid = grid
        self._nodata = nodata
        profile = dict(driver="GTiff", width=grid.n_cols, height=grid.n_rows, count=1, dtype=dtype,
                       crs=grid.crs_wkt, transform=grid.output_transform, nodata=nodata, compress="deflate")
        if grid.n_rows >= 256 and grid.n_cols >= 256:
            profile.update(tiled=True, blockxsize=256, blockysize=256)
        try:
            self._ds = rasterio.open(path, "w", **profile)
            self._ds.set_band_description(1, description)
            self._ds.update_tags(**{k: str(v) for k, v in (tags or {}).items()})
            if colours:  # a class raster: a colour table (and category names) any GIS shows as is
                self._ds.write_colormap(1, colours)
        except Exception as exc:
            raise OutputError(f"Cannot write the raster '{path}': {_why(exc)}", _CHECK) from exc
        self._categories = categories
        self._block_h = int(self._ds.block_shapes[0][0])
        self._strip = np.full((self._block_h, grid.n_cols), nodata, dtype=dtype)
        self._row0 = 0  # first grid row of the strip in the buffer

    def write(self, start: int, stop: int, values: np.ndarray) -> None:
        """Set the pixels of kept cells ``start..stop-1`` (values aligned with them)."""
        rows, cols = self._grid.rows[start:stop], self._grid.cols[start:stop]
        values = np.asarray(values)
        if rows.size == 0:
            return
        if rows[0] < self._row0 or (rows.size > 1 and (np.diff(rows) < 0).any()):
            raise OutputError(f"Cells reached the raster '{self.path}' out of grid order",
                              "Write the cells in the grid's order (this is a bug: please report it)")
        pos = 0
        while pos < rows.size:
            while rows[pos] >= self._row0 + self._block_h:
                self._flush()
            end = pos + int(np.searchsorted(rows[pos:], self._row0 + self._block_h, side="left"))
            seg_rows, seg_cols, seg = rows[pos:end], cols[pos:end], values[pos:end]
            ok = np.isfinite(seg) if seg.dtype.kind == "f" else seg != self._nodata
            self._strip[seg_rows[ok] - self._row0, seg_cols[ok]] = seg[ok]
            pos = end

    def _flush(self) -> None:
        from rasterio.windows import Window

        height = min(self._block_h, self._grid.n_rows - self._row0)
        if height > 0:
            try:
                self._ds.write(self._strip[:height], 1, window=Window(0, self._row0, self._grid.n_cols, height))
            except Exception as exc:
                raise OutputError(f"Cannot write the raster '{self.path}': {_why(exc)}",
                                  "Check the destination (free disk space, permissions)") from exc
        self._strip.fill(self._nodata)
        self._row0 += self._block_h

    def close(self) -> None:
        """Write the strips not written yet and close the file."""
        while self._row0 < self._grid.n_rows:
            self._flush()
        try:
            self._ds.close()
            if self._categories:  # rasterio cannot write category names; GDAL can, on the closed file
                from osgeo import gdal

                ds = gdal.Open(self.path, gdal.GA_Update)
                band = ds.GetRasterBand(1)  # held: a band outliving its dataset crashes GDAL's bindings
                band.SetCategoryNames(self._categories)
                band = ds = None
        except Exception as exc:
            raise OutputError(f"Cannot write the raster '{self.path}': {_why(exc)}", _CHECK) from exc

    def abort(self) -> None:
        """Close without completing (the caller removes the file)."""
        with contextlib.suppress(Exception):
            self._ds.close()


def write_cell_raster(path: str, grid, values: np.ndarray, tags: dict | None = None, **options) -> None:
    """Write a GeoTIFF with one pixel per grid position at once (float32 dissimilarity by default;
    ``options`` as :class:`RasterStream` takes them, e.g. a class raster's type and colours).

    Pixels of cells that were not kept (outside the area) or not scored (nodata) hold the
    nodata value (:data:`NODATA`).
    """
    stream = RasterStream(path, grid, tags, **options)
    try:
        stream.write(0, len(grid), values)
    except BaseException:
        stream.abort()
        raise
    stream.close()


# -- GeoPackage ----------------------------------------------------------------------------
def _ogr():
    from osgeo import ogr, osr

    ogr.UseExceptions()
    osr.UseExceptions()
    return ogr, osr


CELL_FIELDS = [
    ("id", "int64"), ("row", "int"), ("col", "int"), ("dissimilarity", "real"), ("rank", "int"),
    ("percentile", "real"), ("lon", "real"), ("lat", "real"), ("status", "str"), ("coverage", "real"),
    ("valid_fraction", "real"), ("reference", "str"),
]
GRID_COLUMNS = ("id", "row", "col", "lon", "lat", "coverage")


def _grid_columns(grid, index) -> dict[str, np.ndarray]:
    """The columns that come from the grid, for kept cells ``index`` (a slice or indices)."""
    return {"id": grid.ids[index], "row": grid.rows[index], "col": grid.cols[index], "lon": grid.lon[index],
            "lat": grid.lat[index], "coverage": grid.coverage[index]}


class CellLayerWriter:
    """A GeoPackage with the cells as polygons, appended chunk by chunk (one transaction each).

    GDAL creates the file, the layer, its fields and its spatial index (an R-tree kept up to
    date by triggers); the cells are then inserted with SQLite itself, their geometries built as
    GeoPackage blobs with NumPy: through OGR, setting each field of each feature from Python
    cost more than the rest of a search's writing. The R-tree triggers call GDAL's SQL
    functions, which plain SQLite lacks: while the cells are appended they are set aside and
    the R-tree rows written with the cells (by the writer thread, while the search runs, not
    after it); :meth:`finish` puts the triggers back. The file is the one OGR would write: a
    test compares them.

    Args:
        path: the GeoPackage to create.
        grid: the :class:`~.grid.CellGrid`.
        fields: ``(name, kind)`` pairs, kind in int/int64/real/str (default :data:`CELL_FIELDS`);
            id/row/col/lon/lat/coverage come from the grid, the others from the columns given.
        layer_name: name of the polygon layer.
        late_columns: allow :meth:`finish` to set columns (e.g. rank, once every cell is scored).
        metadata: items of the layer's metadata (e.g. the run id the raster also carries).
    """

    # GDAL makes the (empty) R-tree and its triggers with the layer; one that makes them later
    # (or never) gets its index from CreateSpatialIndex in finish().
    LAYER_OPTIONS = ["FID=fid", "SPATIAL_INDEX=YES"]

    def __init__(self, path: str, grid, fields: list[tuple[str, str]] | None = None,
                 layer_name: str = CELLS_LAYER, late_columns: bool = False, metadata: dict | None = None) -> None:
        ogr, osr = _ogr()
        self.path = path
        self._metadata = metadata or {}
        self._grid = grid
        self._fields = fields or CELL_FIELDS
        self._layer_name = layer_name
        self._late = late_columns
        self._ogr = ogr
        self._types = {"int": ogr.OFTInteger, "int64": ogr.OFTInteger64, "real": ogr.OFTReal, "str": ogr.OFTString}
        self._srs = osr.SpatialReference()
        self._srs.ImportFromWkt(grid.crs_wkt)
        self._srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
        self._con: sqlite3.Connection | None = None
        self._count = 0
        self._extent = [np.inf, np.inf, -np.inf, -np.inf]
        try:
            ds = ogr.GetDriverByName("GPKG").CreateDataSource(path)
            layer = ds.CreateLayer(layer_name, self._srs, ogr.wkbPolygon, options=self.LAYER_OPTIONS)
            for name, kind in self._fields:
                layer.CreateField(ogr.FieldDefn(name, self._types[kind]))
            layer = ds = None  # written and closed: the rows go in through SQLite
            # The writer thread of a ResultStream appends: one thread at a time, not this one.
            self._con = con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            # No disk sync at each batch's commit: the file is a temporary one until the search
            # completes (atomic_outputs); finish() commits with a full sync.
            con.execute("PRAGMA synchronous = OFF")
            self._srs_id, geom = con.execute("SELECT srs_id, column_name FROM gpkg_geometry_columns "
                                             "WHERE table_name = ?", (layer_name,)).fetchone()
            self._rtree = f"rtree_{layer_name}_{geom}"
            if not con.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (self._rtree,)).fetchone():
                self._rtree = None  # a GDAL that makes the index later: finish() asks it to
            triggers = con.execute("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = ? "
                                   "AND substr(name, 1, ?) = ?",
                                   (layer_name, len(f"rtree_{layer_name}_"), f"rtree_{layer_name}_")).fetchall()
            self._triggers = [sql for _, sql in triggers]
            con.execute("BEGIN")
            for name, _ in triggers:
                con.execute(f'DROP TRIGGER "{name}"')
            con.execute("COMMIT")
            self._insert = (f'INSERT INTO "{layer_name}" ("fid", "geom"'
                            + "".join(f', "{n}"' for n, _ in self._fields) + ") VALUES (?, ?"
                            + ", ?" * len(self._fields) + ")")
        except Exception as exc:
            self.abort()
            raise OutputError(f"Cannot write the cell layer '{path}': {_why(exc)}", _CHECK) from exc

    def append(self, start: int, stop: int, columns: dict[str, np.ndarray]) -> None:
        """Write kept cells ``start..stop-1``; ``columns`` holds their values (aligned with them).

        ``None`` values, NaN and infinities are written as NULL; fields with no column are NULL.
        """
        values = {**_grid_columns(self._grid, slice(start, stop)), **columns}
        try:
            self._con.execute("BEGIN")
            # Chunks keep the Python values of a few thousand cells alive at a time, not all.
            for lo in range(start, stop, _CHUNK):
                hi = min(lo + _CHUNK, stop)
                part = slice(lo - start, hi - start)
                bounds = self._grid.bounds_array(np.arange(lo, hi))
                self._extent = [min(self._extent[0], float(bounds[:, 0].min())),
                                min(self._extent[1], float(bounds[:, 1].min())),
                                max(self._extent[2], float(bounds[:, 2].max())),
                                max(self._extent[3], float(bounds[:, 3].max()))]
                cols = [_sql_values(values[n][part]) if n in values else itertools.repeat(None, hi - lo)
                        for n, _ in self._fields]
                fids = self._grid.ids[lo:hi].tolist()
                self._con.executemany(self._insert, zip(fids, _gpkg_polygons(bounds, self._srs_id), *cols))
                if self._rtree is not None:  # what GDAL's trigger inserts: id, min x, max x, min y, max y
                    self._con.executemany(f'INSERT INTO "{self._rtree}" VALUES (?, ?, ?, ?, ?)',
                                          zip(fids, *(bounds[:, k].tolist() for k in (0, 2, 1, 3))))
                self._count += hi - lo
            self._con.execute("COMMIT")
        except Exception as exc:
            raise OutputError(f"Cannot write the cell layer '{self.path}': {_why(exc)}",
                              "Check the destination (free disk space, permissions)") from exc

    def finish(self, update_index: np.ndarray | None = None, update_columns: dict[str, np.ndarray] | None = None,
               sites_index: np.ndarray | None = None, sites_columns: dict[str, np.ndarray] | None = None) -> None:
        """Complete and close the file.

        Args:
            update_index / update_columns: kept cells whose ``update_columns`` (arrays aligned
                with ``update_index``) are set now, e.g. rank and percentile once every cell
                is scored (needs ``late_columns``).
            sites_index / sites_columns: cells also written as points in a layer
                :data:`SITES_LAYER`, in this order, with these column values.
        """
        try:
            if update_columns:
                if not self._late:
                    raise OutputError("Cell columns can only be updated at the end of a layer made with late "
                                      "columns", "Create the CellLayerWriter with late_columns=True (a bug)")
                self._update(np.asarray(update_index), update_columns)
            # What OGR keeps of a layer it wrote: its extent and feature count.
            extent = self._extent if self._count else [None] * 4
            self._con.execute("PRAGMA synchronous = FULL")  # this commit syncs everything written
            self._con.execute("BEGIN")
            self._con.execute("UPDATE gpkg_contents SET min_x = ?, min_y = ?, max_x = ?, max_y = ? "
                              "WHERE lower(table_name) = lower(?)", (*extent, self._layer_name))
            self._con.execute("UPDATE gpkg_ogr_contents SET feature_count = ? WHERE lower(table_name) = lower(?)",
                              (self._count, self._layer_name))
            for sql in self._triggers:  # the R-tree is complete: GDAL's triggers keep it so from now on
                self._con.execute(sql)
            self._con.execute("COMMIT")
            self._con.close()
            self._con = None
            ds = self._ogr.Open(self.path, update=1)
            for key, value in self._metadata.items():
                ds.GetLayerByName(self._layer_name).SetMetadataItem(key, str(value))
            if sites_index is not None:
                self._write_sites(ds, np.asarray(sites_index), sites_columns or {})
            if self._rtree is None:
                done = ds.ExecuteSQL(f"SELECT CreateSpatialIndex('{self._layer_name}', 'geom')")
                if done is not None:
                    ds.ReleaseResultSet(done)
            ds = None
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(f"Cannot write the cell layer '{self.path}': {_why(exc)}", _CHECK) from exc

    def _update(self, index: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        """Set columns of the cells ``index`` with one SQL UPDATE per cell, in one transaction.

        Values are converted as :meth:`append` converts them (NaN -> NULL), so the file is what
        writing them at once gives.
        """
        kinds = dict(self._fields)
        names = [n for n in columns if n in kinds]
        sql = (f'UPDATE "{self._layer_name}" SET ' + ", ".join(f'"{n}" = ?' for n in names) + ' WHERE "fid" = ?')
        fids = self._grid.ids[index]
        con = self._con
        con.execute("BEGIN")
        for lo in range(0, index.size, _CHUNK):
            hi = min(lo + _CHUNK, index.size)
            cols = [_sql_values(columns[n][lo:hi]) for n in names] + [fids[lo:hi].tolist()]
            con.executemany(sql, zip(*cols))
        con.execute("COMMIT")

    def _write_sites(self, ds, index: np.ndarray, columns: dict[str, np.ndarray]) -> None:
        ogr = self._ogr
        values = {**_grid_columns(self._grid, index), **columns}
        names = [n for n, _ in self._fields if n in values]
        layer = ds.CreateLayer(SITES_LAYER, self._srs, ogr.wkbPoint, options=["FID=fid"])
        for name, kind in self._fields:
            if name in values:
                layer.CreateField(ogr.FieldDefn(name, self._types[kind]))
        cx, cy = self._grid.centres(index)
        layer.StartTransaction()
        for j in range(index.size):
            f = ogr.Feature(layer.GetLayerDefn())
            for name in names:
                set_field(f, name, values[name][j])
            f.SetGeometryDirectly(ogr.CreateGeometryFromWkt(f"POINT({float(cx[j])!r} {float(cy[j])!r})"))
            layer.CreateFeature(f)
        layer.CommitTransaction()

    def abort(self) -> None:
        """Close without completing (the caller removes the file)."""
        if self._con is not None:
            with contextlib.suppress(sqlite3.Error):
                self._con.close()
            self._con = None


def _sql_values(column) -> list:
    """Python values for SQLite, converted as the OGR setters convert them (NaN/inf -> NULL)."""
    arr = np.asarray(column)
    if arr.dtype.kind == "f":
        ok = np.isfinite(arr)
        if ok.all():
            return arr.tolist()
        if not ok.any():
            return [None] * arr.size
        return [v if good else None for v, good in zip(arr.tolist(), ok.tolist())]
    values = arr.tolist()
    if arr.dtype.kind in "iuU":
        return values
    out = []
    for v in values:
        if isinstance(v, float) and not np.isfinite(v):
            out.append(None)
        elif v is None or isinstance(v, (int, float)):
            out.append(v)
        else:
            out.append(str(v))
    return out


def write_cells_gpkg(path: str, grid, columns: dict[str, np.ndarray], top_k: int = 10,
                     layer_name: str = CELLS_LAYER, fields: list[tuple[str, str]] | None = None,
                     metadata: dict | None = None) -> None:
    """Write the cells as polygons (layer ``cells``) and the ``top_k`` best as points (``analog_sites``).

    Args:
        path: the GeoPackage to create.
        grid: the :class:`~.grid.CellGrid`.
        columns: arrays, one value per kept cell, for the fields other than
            id/row/col/lon/lat/coverage (which come from the grid). ``None`` values, NaN and
            infinities are written as NULL.
        top_k: best cells (by the ``rank`` column) also written as points; 0 for none.
        layer_name: name of the polygon layer.
        fields: ``(name, kind)`` pairs, kind in int/int64/real/str (default :data:`CELL_FIELDS`).
        metadata: items of the layer's metadata (e.g. the run id, see :func:`same_run`).
    """
    fields = [(name, kind) for name, kind in (fields or CELL_FIELDS) if name in GRID_COLUMNS or name in columns]
    writer = CellLayerWriter(path, grid, fields, layer_name, metadata=metadata)
    try:
        n = len(grid)
        for start in range(0, n, _CHUNK):
            stop = min(start + _CHUNK, n)
            writer.append(start, stop, {k: v[start:stop] for k, v in columns.items()})
        sites = None
        if columns.get("rank") is not None and top_k > 0:
            sites = best_cells(columns["rank"], top_k)
        writer.finish(sites_index=sites,
                      sites_columns=None if sites is None else {k: np.asarray(v)[sites] for k, v in columns.items()})
    except BaseException:
        writer.abort()
        raise


_CHUNK = 4096


# -- both, while a search runs ---------------------------------------------------------------
class ResultStream:
    """Writes a search's raster and cell layer while it runs, from a background thread.

    The search calls :meth:`put` with each range of cells it has finished; a writer thread
    asks ``columns_of(slice)`` for their values (the search's own arrays: they are final once
    put) and appends them to the GeoTIFF (:class:`RasterStream`) and the GeoPackage
    (:class:`CellLayerWriter`, one transaction per range). A bounded queue keeps the writer at
    most ``queue_size`` ranges behind. :meth:`finish` then writes the columns that need every
    cell and the best sites; on any exception, leave the ``with`` block (or call
    :meth:`abort`): the files are closed unfinished, for :func:`atomic_outputs` to remove.

    Args:
        raster_path / cells_path: files to create (either may be ``None``).
        grid: the :class:`~.grid.CellGrid`.
        columns_of: ``f(index) -> {name: array}`` for kept cells ``index`` (a slice), with the
            raster's ``value_column`` and the cell layer's fields.
        tags: metadata of the raster.
        fields: the cell layer's fields (default :data:`CELL_FIELDS`).
        run_id: written into both files (a raster tag and the cell layer's metadata), so a
            reader can tell that they come from one run (:func:`same_run`).
    """

    def __init__(self, raster_path: str | None, cells_path: str | None, grid, columns_of,
                 tags: dict | None = None, fields: list[tuple[str, str]] | None = None,
                 value_column: str = "dissimilarity", queue_size: int = 8, run_id: str | None = None) -> None:
        self._columns_of = columns_of
        self._value_column = value_column
        self._raster = self._cells = None
        self._error: BaseException | None = None
        self._aborting = False
        self._done = False
        try:
            run = {RUN_ID: run_id} if run_id else {}
            self._raster = RasterStream(raster_path, grid, {**(tags or {}), **run}) if raster_path else None
            self._cells = CellLayerWriter(cells_path, grid, fields, late_columns=True, metadata=run) \
                if cells_path else None
        except BaseException:
            self._close_files()
            raise
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._run, name="analog-writer", daemon=True)
        self._thread.start()

    def put(self, start: int, stop: int) -> None:
        """Cells ``start..stop-1`` are final: write them (waits while the writer is far behind)."""
        while True:
            self._raise_error()
            try:
                self._queue.put((start, stop), timeout=0.1)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None or self._aborting:
                continue  # keep draining so that put() never blocks for good
            try:
                start, stop = item
                columns = self._columns_of(slice(start, stop))
                if self._raster is not None:
                    self._raster.write(start, stop, columns[self._value_column])
                if self._cells is not None:
                    self._cells.append(start, stop, columns)
            except BaseException as exc:  # handed to the search's thread by put() / finish()
                self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop_thread(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self, update_index: np.ndarray | None = None, update_columns: dict[str, np.ndarray] | None = None,
               sites_index: np.ndarray | None = None, sites_columns: dict[str, np.ndarray] | None = None) -> None:
        """Wait for the writer, then complete both files (see :meth:`CellLayerWriter.finish`)."""
        self._stop_thread()
        self._raise_error()
        if self._raster is not None:
            raster, self._raster = self._raster, None
            raster.close()
        if self._cells is not None:
            cells, self._cells = self._cells, None
            cells.finish(update_index, update_columns, sites_index, sites_columns)
        self._done = True

    def abort(self) -> None:
        """Stop the writer and close the files unfinished."""
        self._aborting = True
        self._stop_thread()
        self._close_files()

    def _close_files(self) -> None:
        for out in (self._raster, self._cells):
            if out is not None:
                out.abort()
        self._raster = self._cells = None

    def __enter__(self) -> ResultStream:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._done:
            self.abort()
        if exc_type is None and not self._done:
            raise OutputError("The outputs were left unfinished", "Call finish() before leaving (this is a bug)")


RUN_ID = "run_id"


def new_run_id() -> str:
    """An id for one run's outputs: the process and a random part."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:12]}"


def same_run(raster: str | os.PathLike, cells: str | os.PathLike, layer: str = CELLS_LAYER) -> bool:
    """Whether a dissimilarity GeoTIFF and a cell GeoPackage were written by the same run (the
    run id each carries): a reader that must never pair the outputs of two runs checks this."""
    import rasterio

    ogr, _ = _ogr()
    with rasterio.open(raster) as ds:
        a = ds.tags().get(RUN_ID)
    ds = ogr.Open(str(cells))
    lyr = ds.GetLayerByName(layer) if ds is not None else None
    b = lyr.GetMetadataItem(RUN_ID) if lyr is not None else None
    return bool(a) and a == b


def _gpkg_polygons(bounds: np.ndarray, srs_id: int) -> list[bytes]:
    """GeoPackage geometry blobs of the rectangles ``bounds`` (N, 4), as OGR writes them.

    Each is the GeoPackage header (``GP``, version 0, little-endian, an XY envelope), the SRS
    id and the envelope, then the little-endian WKB of the closed ring. Built at once with
    NumPy: a geometry object per cell cost more than writing the cell.
    """
    n = len(bounds)
    head = (b"GP\x00\x03" + np.array([srs_id], "<i4").tobytes())
    wkb_head = np.array([1], "<u1").tobytes() + np.array([3, 1, 5], "<u4").tobytes()
    x0, y0, x1, y1 = (bounds[:, k].astype("<f8") for k in range(4))
    envelope = np.stack([x0, x1, y0, y1], axis=1)
    ring = np.stack([x0, y0, x1, y0, x1, y1, x0, y1, x0, y0], axis=1)  # closed, counter-clockwise
    size = len(head) + 32 + len(wkb_head) + 80
    out = np.empty((n, size), dtype=np.uint8)
    out[:, :8] = np.frombuffer(head, dtype=np.uint8)
    out[:, 8:40] = np.ascontiguousarray(envelope).view(np.uint8).reshape(n, 32)
    out[:, 40:40 + len(wkb_head)] = np.frombuffer(wkb_head, dtype=np.uint8)
    out[:, 40 + len(wkb_head):] = np.ascontiguousarray(ring).view(np.uint8).reshape(n, 80)
    raw = out.tobytes()
    return [raw[i:i + size] for i in range(0, n * size, size)]


def set_field(feature, name, value) -> None:
    if isinstance(value, (float, np.floating)):
        if np.isfinite(value):
            feature.SetField(name, float(value))
        else:
            feature.SetFieldNull(name)
    elif isinstance(value, (int, np.integer)):
        feature.SetField(name, int(value))
    elif value is None:
        feature.SetFieldNull(name)
    else:
        feature.SetField(name, str(value))
