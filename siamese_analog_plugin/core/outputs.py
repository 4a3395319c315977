"""Writing results: the dissimilarity GeoTIFF and the GeoPackage of cells.

Outputs are first written under temporary names beside their destination and renamed into
place only once every output is complete, so a failure or a cancel never leaves a half file.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import numpy as np

from .errors import OutputError

__all__ = [
    "NODATA",
    "CELLS_LAYER",
    "SITES_LAYER",
    "check_destination",
    "atomic_outputs",
    "write_dissimilarity_raster",
    "write_cells_gpkg",
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


def _temp_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.partial-{uuid.uuid4().hex[:8]}{path.suffix}")


def _remove_with_sidecars(path: Path) -> None:
    for extra in ("", "-journal", "-wal", "-shm", ".aux.xml"):
        with contextlib.suppress(OSError):
            Path(str(path) + extra).unlink()


@contextlib.contextmanager
def atomic_outputs(paths: dict[str, str | os.PathLike | None]):
    """Give temporary paths for each named output; move them all into place on success.

    Usage::

        with atomic_outputs({"raster": out_tif, "cells": out_gpkg}) as tmp:
            write(tmp["raster"]); write(tmp["cells"])

    Outputs whose destination is ``None`` are skipped (``tmp[name]`` is ``None``). On any
    exception (including a cancel) every temporary file is removed and nothing is replaced.
    """
    final = {k: Path(v) for k, v in paths.items() if v}
    tmp = {k: _temp_name(p) for k, p in final.items()}
    try:
        yield {k: (str(tmp[k]) if k in tmp else None) for k in paths}
    except BaseException:
        for t in tmp.values():
            _remove_with_sidecars(t)
        raise
    try:
        for k, p in final.items():
            if p.exists():
                _remove_with_sidecars(p)
            os.replace(tmp[k], p)
            side = Path(str(tmp[k]) + ".aux.xml")
            if side.exists():
                os.replace(side, Path(str(p) + ".aux.xml"))
    except OSError as exc:
        for t in tmp.values():
            _remove_with_sidecars(t)
        raise OutputError(f"Cannot move the results into place: {exc}", "Check the destination folder") from exc


def write_dissimilarity_raster(path: str, grid, values: np.ndarray, tags: dict | None = None) -> None:
    """Write a float32 GeoTIFF with one pixel per grid position.

    Pixels of cells that were not kept (outside the area) or not scored (nodata) hold
    :data:`NODATA`.
    """
    import rasterio

    data = np.full((grid.n_rows, grid.n_cols), NODATA, dtype=np.float32)
    ok = np.isfinite(values)
    data[grid.rows[ok], grid.cols[ok]] = values[ok]
    profile = dict(driver="GTiff", width=grid.n_cols, height=grid.n_rows, count=1, dtype="float32",
                   crs=grid.crs_wkt, transform=grid.output_transform, nodata=NODATA, compress="deflate")
    if grid.n_rows >= 256 and grid.n_cols >= 256:
        profile.update(tiled=True, blockxsize=256, blockysize=256)
    try:
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data, 1)
            dst.set_band_description(1, "dissimilarity")
            dst.update_tags(**{k: str(v) for k, v in (tags or {}).items()})
    except Exception as exc:
        raise OutputError(f"Cannot write the raster '{path}': {exc}", "Check the destination") from exc


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


def write_cells_gpkg(path: str, grid, columns: dict[str, np.ndarray], top_k: int = 10,
                     layer_name: str = CELLS_LAYER, fields: list[tuple[str, str]] | None = None) -> None:
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
    """
    fields = fields or CELL_FIELDS
    ogr, osr = _ogr()
    types = {"int": ogr.OFTInteger, "int64": ogr.OFTInteger64, "real": ogr.OFTReal, "str": ogr.OFTString}
    srs = osr.SpatialReference()
    srs.ImportFromWkt(grid.crs_wkt)
    srs.SetAxisMappingStrategy(osr.OAMS_TRADITIONAL_GIS_ORDER)
    values = {"id": grid.ids, "row": grid.rows, "col": grid.cols, "lon": grid.lon, "lat": grid.lat,
              "coverage": grid.coverage, **columns}
    names = [n for n, _ in fields if n in values]
    try:
        driver = ogr.GetDriverByName("GPKG")
        ds = driver.CreateDataSource(path)
        cells = ds.CreateLayer(layer_name, srs, ogr.wkbPolygon, options=["FID=fid", "SPATIAL_INDEX=YES"])
        for name, kind in fields:
            if name in values:
                cells.CreateField(ogr.FieldDefn(name, types[kind]))
        defn = cells.GetLayerDefn()
        indices = [defn.GetFieldIndex(name) for name in names]
        n = len(grid)
        cells.StartTransaction()
        # Chunks keep the Python values of a few thousand cells alive at a time, not all.
        for start in range(0, n, _CHUNK):
            sl = slice(start, min(start + _CHUNK, n))
            setters = [_column_setter(k, values[name][sl]) for k, name in zip(indices, names)]
            wkb = _polygon_wkb(grid.bounds_array(np.arange(sl.start, sl.stop)))
            fids = grid.ids[sl].tolist()
            for i in range(sl.stop - sl.start):
                f = ogr.Feature(defn)
                f.SetFID(fids[i])
                for setter in setters:
                    setter(f, i)
                f.SetGeometryDirectly(ogr.CreateGeometryFromWkb(wkb[i].tobytes()))
                cells.CreateFeature(f)
        cells.CommitTransaction()
        _write_sites(ds, srs, grid, values, names, top_k, types, ogr)
        ds = None  # close: flushes and releases the SQLite file
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"Cannot write the cell layer '{path}': {exc}", "Check the destination") from exc


_CHUNK = 4096


def _polygon_wkb(bounds: np.ndarray) -> np.ndarray:
    """Little-endian WKB of the rectangles ``bounds`` (N, 4), one row of bytes per polygon.

    Built at once with NumPy: parsing a WKT string per cell cost more than writing the cell.
    """
    n = len(bounds)
    head = np.frombuffer(np.array([1], "<u1").tobytes() + np.array([3, 1, 5], "<u4").tobytes(), dtype=np.uint8)
    x0, y0, x1, y1 = (bounds[:, k].astype("<f8") for k in range(4))
    ring = np.stack([x0, y0, x1, y0, x1, y1, x0, y1, x0, y0], axis=1)  # closed ring, as the WKT was
    out = np.empty((n, head.size + 80), dtype=np.uint8)
    out[:, : head.size] = head
    out[:, head.size:] = np.ascontiguousarray(ring).view(np.uint8).reshape(n, 80)
    return out


def _column_setter(index: int, column):
    """A ``f(feature, i)`` that sets field ``index`` from ``column[i]`` with the typed OGR call.

    Same values as :func:`set_field` (NaN and None become NULL), without its per-value name
    lookup and type dispatch.
    """
    arr = np.asarray(column)
    values = arr.tolist()
    if arr.dtype.kind == "f":
        def set_real(f, i):
            v = values[i]
            if v == v and v not in (float("inf"), float("-inf")):
                f.SetField(index, v)
            else:
                f.SetFieldNull(index)
        return set_real
    if arr.dtype.kind in "iu":
        return lambda f, i: f.SetFieldInteger64(index, int(values[i]))

    def set_other(f, i):
        v = values[i]
        if v is None:
            f.SetFieldNull(index)
        elif isinstance(v, float):
            if v == v and v not in (float("inf"), float("-inf")):
                f.SetField(index, v)
            else:
                f.SetFieldNull(index)
        elif isinstance(v, int):
            f.SetFieldInteger64(index, v)
        else:
            f.SetFieldString(index, str(v))
    return set_other


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


def _write_sites(ds, srs, grid, values, names, top_k, types, ogr) -> None:
    rank = values.get("rank")
    if rank is None or top_k <= 0:
        return
    order = [i for i in np.argsort(np.where(rank > 0, rank, np.iinfo(np.int32).max), kind="stable")
             if rank[i] > 0][:top_k]
    layer = ds.CreateLayer(SITES_LAYER, srs, ogr.wkbPoint, options=["FID=fid"])
    for name, kind in CELL_FIELDS:
        if name in values:
            layer.CreateField(ogr.FieldDefn(name, types[kind]))
    cx, cy = grid.centres()
    layer.StartTransaction()
    for i in order:
        f = ogr.Feature(layer.GetLayerDefn())
        for name in names:
            set_field(f, name, values[name][i])
        f.SetGeometryDirectly(ogr.CreateGeometryFromWkt(f"POINT({cx[i]!r} {cy[i]!r})"))
        layer.CreateFeature(f)
    layer.CommitTransaction()
