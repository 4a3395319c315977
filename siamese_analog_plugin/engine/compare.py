"""Regions x references (``compare``): the paper's table of Earth regions against Mars references.

For every region (a polygon of a vector layer, named by a field) and every Mars reference: the
minimum, quartiles, median and maximum dissimilarity over the region's cells and the lon/lat of
its best cell, as in the paper's comparison of four Earth regions with four Mars regions. One
grid covers all the regions (their union is the area; a cell belongs to every region that holds
its centre), the cells are embedded once (or come from an embedding raster) and every
reference is a query over the same embeddings. Outputs: a CSV (columns :data:`CSV_COLUMNS`), an
HTML page with the heatmap matrix of minimum dissimilarity and a box plot per region, and
optionally the cell layer (one dissimilarity column per reference).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from shapely import wkb
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union
from shapely.prepared import prep

from .errors import InputError
from .feedback import Feedback
from .grid import DEFAULT_MAX_CELLS, Area
from .queries import region_statistics

__all__ = ["CSV_COLUMNS", "CompareParams", "CompareResult", "Region", "read_regions", "run_compare",
           "write_compare_csv", "write_compare_html"]

CSV_COLUMNS = ("region", "reference", "min", "q1", "median", "q3", "max", "best_lon", "best_lat", "cells")


@dataclass
class Region:
    name: str
    geometry: object  # shapely (multi)polygon in the layer's CRS


def read_regions(path: str | os.PathLike, name_field: str, layer: str | None = None) -> tuple[list[Region], str]:
    """Named polygons of a vector layer and the layer's CRS (WKT); features of one name are merged.

    Raises:
        InputError: missing file or layer, no such field (its fields are listed), no polygon, no CRS.
    """
    from .vector import open_vector_layer

    ds, lyr = open_vector_layer(path, layer, "region layer")
    defn = lyr.GetLayerDefn()
    fields = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    if name_field not in fields:
        raise InputError(f"The region layer '{path}' has no field '{name_field}'",
                         f"Name the field that holds each region's name: one of {', '.join(fields) or '(none)'}")
    srs = lyr.GetSpatialRef()
    if srs is None:
        raise InputError(f"The region layer '{path}' has no CRS", "Assign it a CRS (e.g. in QGIS: Layer CRS)")
    parts: dict[str, list] = {}
    for feat in lyr:
        g = feat.GetGeometryRef()
        if g is None:
            continue
        shp = wkb.loads(bytes(g.ExportToIsoWkb()))
        polys = [p for p in getattr(shp, "geoms", [shp]) if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
        if polys:
            name = feat.GetField(name_field)
            parts.setdefault("" if name is None else str(name), []).extend(
                p if p.is_valid else p.buffer(0) for p in polys)
    if not parts:
        raise InputError(f"The region layer '{path}' holds no polygon", "Give one polygon per region")
    return [Region(n, unary_union(g)) for n, g in parts.items()], srs.ExportToWkt()


@dataclass
class CompareParams:
    """What ``compare`` needs; grid and model fields as in :class:`~.search.SearchParams`."""

    raster: str | None
    regions: str
    name_field: str
    references: object
    regions_layer: str | None = None
    embeddings: str | None = None
    cell_size_m: float | None = None
    stride_m: float | None = None
    min_coverage: float = 0.5
    max_nodata: float = 0.5
    band: int | None = None
    reference_resolution_m: float | None = None
    model: str | None = None
    device: str = "auto"
    batch_size: int = 128
    max_cells: int = DEFAULT_MAX_CELLS
    force: bool = False
    runtime: str = "auto"


@dataclass
class CompareResult:
    rows: list[dict]  # one per (region, reference), columns CSV_COLUMNS
    regions: list[str]
    references: list[str]
    search: object  # the SearchResult over all the regions' cells
    membership: list[np.ndarray] = field(repr=False, default_factory=list)  # cells of each region


def _cells_in(region_geom, grid) -> np.ndarray:
    """Indices of the kept cells whose centre lies in ``region_geom`` (raster CRS)."""
    try:
        from shapely import contains_xy  # shapely 2
    except ImportError:  # shapely 1.8 (Debian 12)
        from shapely.vectorized import contains as contains_xy

    cx, cy = grid.centres()
    return np.nonzero(contains_xy(region_geom, cx, cy))[0]


def run_compare(params: CompareParams, out_csv: str | None = None, out_html: str | None = None,
                out_cells: str | None = None, feedback: Feedback | None = None, encoder=None) -> CompareResult:
    """Compare every region with every reference (see the module docstring)."""
    from .embeddings import EmbeddingRaster
    from .geo import reproject_geometry, to_crs
    from .imagery import describe_raster
    from .outputs import atomic_outputs, check_destination
    from .search import SearchParams, run_search

    feedback = feedback or Feedback()
    for path, what, ext in ((out_csv, "table", ".csv"), (out_html, "report", (".html", ".htm")),
                            (out_cells, "cell layer", ".gpkg")):
        if path:
            if not str(path).lower().endswith(ext):
                raise InputError(f"The {what} '{path}' must be a {ext if isinstance(ext, str) else ext[0]} file",
                                 f"Give a name ending in {ext if isinstance(ext, str) else ext[0]}")
            check_destination(path, what)
    regions, regions_crs = read_regions(params.regions, params.name_field, params.regions_layer)
    source = EmbeddingRaster.open(params.embeddings) if params.embeddings else None
    raster = source.facts.raster if source is not None and not params.raster else params.raster
    if not raster:
        raise InputError("Give the raster to compare (or an embedding raster)", "Use --raster FILE or --embeddings")
    raster_crs = source.grid.crs_wkt if source is not None else describe_raster(raster).crs_wkt
    if not raster_crs:
        raise InputError(f"The raster '{raster}' is not georeferenced", "Georeference it first")
    in_raster_crs = [reproject_geometry(r.geometry, regions_crs, to_crs(raster_crs)) for r in regions]
    if source is not None:
        extent = source.grid
        from shapely.geometry import box

        b = extent.bounds_array()
        footprint = box(b[:, 0].min(), b[:, 1].min(), b[:, 2].max(), b[:, 3].max())
    else:
        from shapely.geometry import box

        footprint = box(*describe_raster(raster).bounds)
    for r, g in zip(regions, in_raster_crs):
        if not prep(footprint).intersects(g):
            raise InputError(f"The region '{r.name}' does not overlap the raster"
                             + (" embeddings" if source is not None else f" '{raster}'"),
                             "Remove it from the region layer, or check the layer's CRS")
    area = None if source is not None else Area(unary_union(in_raster_crs), raster_crs)
    sp = SearchParams(raster=params.raster if source is not None else raster, references=params.references,
                      area=area, cell_size_m=params.cell_size_m, stride_m=params.stride_m,
                      min_coverage=params.min_coverage, max_nodata=params.max_nodata, band=params.band,
                      reference_resolution_m=params.reference_resolution_m, model=params.model,
                      device=params.device, batch_size=params.batch_size, max_cells=params.max_cells,
                      force=params.force, embeddings=params.embeddings, top_k=0, runtime=params.runtime)
    # The cell layer is written under a temporary name too, and moved with the table and the page.
    with atomic_outputs({"csv": out_csv, "html": out_html, "cells": out_cells}) as tmp:
        result = run_search(sp, None, tmp["cells"], feedback, encoder)
        grid = result.grid
        per_ref = result.per_reference if result.per_reference is not None else result.dissimilarity[:, None]
        ref_names = [Path(r.path).name for r in result.references]
        membership = [_cells_in(g, grid) for g in in_raster_crs]
        rows = []
        for name, cells in zip([r.name for r in regions], membership):
            region_of_cell = np.full(len(grid), -1, dtype=np.int32)
            region_of_cell[cells] = 0
            for k, ref in enumerate(ref_names):
                stats = region_statistics(per_ref[:, k], region_of_cell, 1, grid.lon, grid.lat)[0]
                rows.append({"region": name, "reference": ref, **stats})
        for r in regions:
            if not any(row["cells"] for row in rows if row["region"] == r.name):
                feedback.log(f"Warning: the region '{r.name}' holds no scored cell (too small for "
                             f"{grid.cell_size_m:g} m cells, or mostly nodata)")
        out = CompareResult(rows, [r.name for r in regions], ref_names, result, membership)
        if tmp["csv"]:
            write_compare_csv(tmp["csv"], rows)
        if tmp["html"]:
            write_compare_html(tmp["html"], out, per_ref, raster, grid.cell_size_m)
    return out


def write_compare_csv(path: str, rows: list[dict]) -> None:
    """The table, one row per (region, reference); empty fields where a region has no cell."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for row in rows:
            w.writerow({k: ("" if isinstance(v, float) and not np.isfinite(v) else
                            (f"{v:.6f}" if isinstance(v, float) else v)) for k, v in row.items()})


def _figure_png(result: CompareResult, per_ref: np.ndarray) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regions, refs = result.regions, result.references
    table = np.full((len(regions), len(refs)), np.nan)
    for row in result.rows:
        table[regions.index(row["region"]), refs.index(row["reference"])] = row["min"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(6 + 1.2 * len(refs) + 0.9 * len(regions), 4.2 + 0.3 * len(regions)),
                                   gridspec_kw={"width_ratios": [max(len(refs), 1.5), max(len(regions), 2)]})
    im = ax1.imshow(table, cmap="RdYlBu", aspect="auto")  # low (red) = more Mars-like
    ax1.set_xticks(range(len(refs)), [Path(r).stem for r in refs], rotation=30, ha="right")
    ax1.set_yticks(range(len(regions)), regions)
    for i in range(len(regions)):
        for j in range(len(refs)):
            if np.isfinite(table[i, j]):
                ax1.text(j, i, f"{table[i, j]:.3f}", ha="center", va="center", fontsize=8)
    ax1.set_title("minimum dissimilarity\n(region x Mars reference)")
    fig.colorbar(im, ax=ax1, fraction=0.046, pad=0.04, label="lower = more Mars-like")
    data, labels, positions, colours = [], [], [], []
    cmap = plt.get_cmap("tab10")
    width = 0.8 / max(len(refs), 1)
    for i, cells in enumerate(result.membership):
        for k in range(len(refs)):
            v = per_ref[cells, k]
            v = v[np.isfinite(v)]
            data.append(v if v.size else np.array([np.nan]))
            positions.append(i + (k - (len(refs) - 1) / 2) * width)
            colours.append(cmap(k % 10))
        labels.append(regions[i])
    bp = ax2.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
    for patch, c in zip(bp["boxes"], colours):
        patch.set_facecolor(c)
        patch.set_alpha(0.7)
    ax2.set_xticks(range(len(regions)), labels, rotation=30, ha="right")
    ax2.set_ylabel("dissimilarity")
    ax2.set_title("dissimilarity of each region's cells")
    if len(refs) > 1:
        from matplotlib.patches import Patch

        ax2.legend(handles=[Patch(color=cmap(k % 10), alpha=0.7, label=Path(r).stem) for k, r in enumerate(refs)],
                   fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_compare_html(path: str, result: CompareResult, per_ref: np.ndarray, raster: str, cell_size_m: float) -> None:
    """A self-contained page: the heatmap matrix and box plots, then the table."""
    png = base64.b64encode(_figure_png(result, per_ref)).decode()
    head = "".join(f"<th>{html.escape(c)}</th>" for c in CSV_COLUMNS)
    body = []
    for row in result.rows:
        cells = []
        for c in CSV_COLUMNS:
            v = row[c]
            text = "" if isinstance(v, float) and not np.isfinite(v) else (
                f"{v:.6f}" if c in ("best_lon", "best_lat") else f"{v:.4f}" if isinstance(v, float) else str(v))
            cells.append(f"<td>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Regions x Mars references</title>
<style>body{{font-family:sans-serif;margin:1.5em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #bbb;padding:3px 8px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}</style>
</head><body>
<h1>Earth regions x Mars references</h1>
<p>Imagery: {html.escape(str(raster))}; cells of {cell_size_m:g} m; dissimilarity = Euclidean distance between
embeddings, lower = more Mars-like. Per region and reference: minimum, quartiles and maximum over the region's
cells, and the longitude/latitude of its best cell.</p>
<img alt="heatmap and box plots" src="data:image/png;base64,{png}">
<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
