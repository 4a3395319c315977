"""Cutting an area into a grid of square, georeferenced cells.

The grid lives in the raster's CRS. Cells are ``cell_size_m`` metres on the ground; in a
geographic CRS (degrees) they are square on the ground at the area's central latitude. Cell
(0, 0) has its top-left corner at the top-left of the area's bounding box (the area being
the polygon clipped to the raster); columns go east and rows south, ``stride_m`` apart
(default: the cell size, i.e. no overlap). Cells that extend past the area's bounding box are
not made. A cell is kept when at least ``min_coverage`` of it lies inside the area.

Everything is held in NumPy arrays (a few dozen bytes a cell), so a grid of a million cells
is cheap, and the cell count is known before a single pixel is read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from shapely.geometry import box
from shapely.geometry.base import BaseGeometry
from shapely.prepared import prep

from .errors import InputError
from .geo import metres_per_degree, metres_per_unit, reproject_geometry, to_crs, transformer
from .imagery import RasterInfo

__all__ = ["Area", "CellGrid", "build_grid", "cell_size_in_crs", "estimate_cell_count", "DEFAULT_MAX_CELLS"]

DEFAULT_MAX_CELLS = 1_000_000


@dataclass
class Area:
    """An area to search: a (multi)polygon and its CRS (any CRS; reprojected as needed)."""

    geometry: BaseGeometry
    crs: object  # anything geo.to_crs accepts


@dataclass
class CellGrid:
    """The kept cells of a regular grid, in the raster's CRS.

    Attributes:
        crs_wkt: the raster CRS.
        origin_x, origin_y: top-left corner of cell (0, 0).
        cell_w, cell_h: cell width and height in CRS units.
        step_x, step_y: distance between neighbouring cells in CRS units.
        n_rows, n_cols: shape of the full grid (kept and dropped cells).
        rows, cols: grid row/column of each kept cell.
        coverage: share of each kept cell inside the area.
        lon, lat: centre of each kept cell in the body's geographic CRS (degrees).
        cell_size_m, stride_m: the ground sizes asked for.
        area: the area polygon in the raster CRS (clipped to the raster).
    """

    crs_wkt: str
    origin_x: float
    origin_y: float
    cell_w: float
    cell_h: float
    step_x: float
    step_y: float
    n_rows: int
    n_cols: int
    rows: np.ndarray
    cols: np.ndarray
    coverage: np.ndarray
    lon: np.ndarray = field(repr=False)
    lat: np.ndarray = field(repr=False)
    cell_size_m: float = 0.0
    stride_m: float = 0.0
    area: BaseGeometry | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def ids(self) -> np.ndarray:
        """Cell ids, 1..N in row-major order."""
        return np.arange(1, len(self) + 1, dtype=np.int64)

    def bounds_array(self, index=None) -> np.ndarray:
        """``(N, 4)`` array of (minx, miny, maxx, maxy) of the kept cells (or of ``index``)."""
        r = self.rows if index is None else self.rows[index]
        c = self.cols if index is None else self.cols[index]
        minx = self.origin_x + c * self.step_x
        maxy = self.origin_y - r * self.step_y
        return np.stack([minx, maxy - self.cell_h, minx + self.cell_w, maxy], axis=-1)

    def bounds(self, i: int) -> tuple[float, float, float, float]:
        """Bounds of kept cell ``i`` (0-based)."""
        return tuple(float(v) for v in self.bounds_array([i])[0])

    def centres(self, index=None) -> tuple[np.ndarray, np.ndarray]:
        """Centre x, y of the kept cells (or of ``index``) in the raster CRS."""
        b = self.bounds_array(index)
        return (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2

    @property
    def output_transform(self):
        """Affine transform of the per-cell raster: one pixel per grid position, centred on
        the cell centre, ``step`` wide (with no overlap the pixel is exactly the cell)."""
        from affine import Affine

        x0 = self.origin_x + self.cell_w / 2 - self.step_x / 2
        y0 = self.origin_y - self.cell_h / 2 + self.step_y / 2
        return Affine(self.step_x, 0.0, x0, 0.0, -self.step_y, y0)


def cell_size_in_crs(crs, size_m: float, centre_lat: float) -> tuple[float, float]:
    """A ground length in metres as (x, y) lengths in the CRS's units (degrees: at ``centre_lat``)."""
    if crs.is_geographic:
        mx, my = metres_per_degree(crs, centre_lat)
        return size_m / mx, size_m / my
    unit = metres_per_unit(crs)
    return size_m / unit, size_m / unit


def _area_in_raster_crs(info: RasterInfo, area: Area | None, raster_crs):
    footprint = box(*info.bounds)
    if area is None:
        return footprint, True
    geom = area.geometry
    if geom is None or geom.is_empty:
        raise InputError("The area polygon is empty",
                         "Draw or select a polygon, or leave the area empty to use the raster's extent")
    geom = reproject_geometry(geom, area.crs, raster_crs) if area.crs is not None else geom
    if not geom.is_valid:
        geom = geom.buffer(0)
    clipped = geom.intersection(footprint)
    if clipped.is_empty or clipped.area <= 0:
        gb = [round(v, 4) for v in geom.bounds]
        rb = [round(v, 4) for v in info.bounds]
        raise InputError(
            f"The area polygon does not overlap the raster (polygon bounds {gb} vs raster bounds {rb} "
            "in the raster's CRS)",
            "Draw the area over the imagery, or check that the polygon layer has the right CRS")
    return clipped, clipped.equals(footprint)


def estimate_cell_count(area_m2: float, cell_size_m: float, stride_m: float | None = None) -> int:
    """Rough number of cells an area of ``area_m2`` square metres makes (for status bars)."""
    stride = stride_m or cell_size_m
    if cell_size_m <= 0 or stride <= 0:
        return 0
    return int(round(area_m2 / (stride * stride)))


def build_grid(info: RasterInfo, cell_size_m: float, area: Area | None = None, stride_m: float | None = None,
               min_coverage: float = 0.5, max_cells: int = DEFAULT_MAX_CELLS, force: bool = False) -> CellGrid:
    """Cut an area of a raster into georeferenced cells.

    Args:
        info: the raster (see :func:`imagery.describe_raster`).
        cell_size_m: side of a cell on the ground, in metres.
        area: the polygon to search; ``None`` = the raster's extent.
        stride_m: distance between cells in metres (default: ``cell_size_m``; smaller overlaps).
        min_coverage: keep cells at least this share inside the area (0 < x <= 1).
        max_cells: refuse grids larger than this (a wrong unit, usually) ...
        force: ... unless this is True.

    Raises:
        InputError: no CRS, polygon off the raster, cell smaller than a pixel or larger than
            the area, absurd cell count, no cell inside the area.
    """
    if not info.georeferenced or not info.crs_wkt:
        raise InputError(f"The raster '{info.path}' is not georeferenced (no CRS or geotransform)",
                         "Georeference it first (QGIS: Raster > Georeferencer) so cells get coordinates")
    if not (cell_size_m and math.isfinite(cell_size_m) and cell_size_m > 0):
        raise InputError(f"The cell size must be a positive number of metres, not {cell_size_m}",
                         "Give e.g. --cell-size 500")
    stride_m = float(stride_m) if stride_m else float(cell_size_m)
    if stride_m <= 0 or not math.isfinite(stride_m):
        raise InputError(f"The stride must be a positive number of metres, not {stride_m}",
                         "Leave it empty for no overlap")
    if not 0 < min_coverage <= 1:
        raise InputError(f"The minimum coverage must be in (0, 1], not {min_coverage}", "Use e.g. 0.5")
    crs = to_crs(info.crs_wkt)
    geom, whole = _area_in_raster_crs(info, area, crs)
    minx, miny, maxx, maxy = geom.bounds
    centre_lat = 0.0
    if crs.is_geographic:
        centre_lat = (miny + maxy) / 2
    cell_w, cell_h = cell_size_in_crs(crs, cell_size_m, centre_lat)
    step_x, step_y = cell_size_in_crs(crs, stride_m, centre_lat)
    px_w, px_h = info.res
    px_m = cell_size_in_crs(crs, 1.0, centre_lat)  # CRS units per metre
    pixel_m = max(px_w / px_m[0], px_h / px_m[1])
    if cell_w < px_w * 0.999 or cell_h < px_h * 0.999:
        raise InputError(f"The cell size {cell_size_m:g} m is smaller than one pixel of the raster ({pixel_m:.3g} m)",
                         f"Use a cell size of at least {pixel_m:.3g} m (the encoder sees ~100 pixels a side at best: "
                         f"{100 * pixel_m:.3g} m)")
    width, height = maxx - minx, maxy - miny
    # A cell may overhang the area by 0.1 % of its side: reprojected polygons come back a hair
    # smaller than drawn, and a column should not vanish for a fraction of a millimetre.
    slack = 1e-3
    if cell_w > width + slack * cell_w or cell_h > height + slack * cell_h:
        raise InputError(f"The cell size {cell_size_m:g} m is larger than the area "
                         f"({width * cell_size_m / cell_w:.4g} m x {height * cell_size_m / cell_h:.4g} m)",
                         "Use a smaller cell size or a larger area")
    n_cols = int(math.floor((width - cell_w + slack * cell_w) / step_x)) + 1
    n_rows = int(math.floor((height - cell_h + slack * cell_h) / step_y)) + 1
    # Known before reading anything: the cells the area would make.
    full = n_rows * n_cols
    estimate = full if whole else int(round(geom.area / (step_x * step_y)))
    if not force and (estimate > max_cells or full > 20 * max_cells):
        raise InputError(
            f"This search would make about {estimate:,} cells of {cell_size_m:g} m (more than the limit of "
            f"{max_cells:,}); is the cell size in metres?",
            "Use a larger cell size or a smaller area, or insist (--force / 'allow large grids') to run it anyway")

    rows_all, cols_all = np.divmod(np.arange(full, dtype=np.int64), n_cols)
    if whole:
        keep = np.ones(full, dtype=bool)
        coverage = np.ones(full, dtype=np.float32)
    else:
        coverage = _coverage(geom, minx, maxy, cell_w, cell_h, step_x, step_y, rows_all, cols_all)
        keep = coverage >= min_coverage - 1e-9
    if not keep.any():
        raise InputError(f"No cell of {cell_size_m:g} m lies at least {min_coverage:.0%} inside the area",
                         "Use a smaller cell size, a larger area, or a lower minimum coverage")
    rows = rows_all[keep].astype(np.int32)
    cols = cols_all[keep].astype(np.int32)
    grid = CellGrid(crs.to_wkt(), minx, maxy, cell_w, cell_h, step_x, step_y, n_rows, n_cols, rows, cols,
                    coverage[keep].astype(np.float32), np.empty(0), np.empty(0), float(cell_size_m), stride_m, geom)
    cx, cy = grid.centres()
    geodetic = crs.geodetic_crs or crs
    if crs.is_geographic:
        grid.lon, grid.lat = cx, cy
    else:
        lon, lat = transformer(crs, geodetic).transform(cx, cy)
        grid.lon, grid.lat = np.asarray(lon, dtype=np.float64), np.asarray(lat, dtype=np.float64)
    return grid


def _coverage(geom, minx, maxy, cell_w, cell_h, step_x, step_y, rows, cols) -> np.ndarray:
    """Share of each cell inside ``geom`` (exact: shapely intersections on boundary cells only)."""
    prepared = prep(geom)
    cell_area = cell_w * cell_h
    out = np.zeros(rows.size, dtype=np.float32)
    # Quick reject per row strip: cells of rows whose strip misses the polygon are skipped.
    for r in np.unique(rows):
        top = maxy - r * step_y
        strip = box(minx, top - cell_h, minx + cols.max() * step_x + cell_w, top)
        if not prepared.intersects(strip):
            continue
        strip_geom = geom.intersection(strip)
        strip_prep = prep(strip_geom)
        idx = np.nonzero(rows == r)[0]
        for i in idx:
            x0 = minx + cols[i] * step_x
            cell = box(x0, top - cell_h, x0 + cell_w, top)
            if strip_prep.contains(cell):
                out[i] = 1.0
            elif strip_prep.intersects(cell):
                out[i] = strip_geom.intersection(cell).area / cell_area
    return out
