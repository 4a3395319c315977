"""Pure helpers behind the canvas tool: the dialog's parameters and the cell estimate.

Nothing here touches widgets, so tests check what the Find Mars analog sites dialog would
receive without showing it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..engine.errors import AnalogFinderError
from ..engine.grid import DEFAULT_MAX_CELLS, estimate_cell_count

__all__ = [
    "ALGORITHM_ID",
    "REMEMBERED_PARAMETERS",
    "build_dialog_parameters",
    "reference_paths",
    "reference_value",
    "estimate_cell_size",
    "area_status_message",
]

ALGORITHM_ID = "siameseanalog:findanalogs"
# The dialog's reference and settings that the tool remembers from one search to the next
# (never the input raster, the area or the outputs: those belong to the place being searched).
REMEMBERED_PARAMETERS = ("REFERENCE", "CELL_SIZE", "STRIDE", "MIN_COVERAGE", "MODEL", "DEVICE", "BATCH_SIZE")


def reference_paths(value) -> list[str]:
    """The reference file(s) of a REFERENCE value (a path, ``;``-joined paths or a list)."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        items = [p for p in str(value).split(";")]
    else:
        items = [str(v) for v in value]
    return [p.strip() for p in items if p and p.strip()]


def reference_value(value, multiple: bool = True):
    """A REFERENCE value in the shape the algorithm's parameter takes: a list of files for a
    multiple-layer/file parameter, else one string (several files ``;``-joined)."""
    paths = reference_paths(value)
    if not paths:
        return None
    return paths if multiple else ";".join(paths)


def build_dialog_parameters(raster: object = None, area: object = None, last_used: Mapping | None = None,
                            reference_multiple: bool = True) -> dict:
    """Initial parameters of the Find Mars analog sites dialog.

    Args:
        raster: the INPUT raster (a layer id, a layer or a path); ``None`` leaves it to the user.
        area: the AREA (a layer id or a ``QgsProcessingFeatureSourceDefinition``).
        last_used: remembered reference and settings (see :mod:`.settings`).
        reference_multiple: whether REFERENCE takes a list (else one ``;``-joined string).

    Returns:
        Only the keys with a value, so the dialog keeps its own defaults for the others.
    """
    params: dict = {}
    if raster is not None and raster != "":
        params["INPUT"] = raster
    if area is not None and area != "":
        params["AREA"] = area
    for key, value in (last_used or {}).items():
        if key not in REMEMBERED_PARAMETERS or value is None or value == "":
            continue
        if key == "REFERENCE":
            value = reference_value(value, reference_multiple)
            if value is None:
                continue
        params[key] = value
    return params


def _positive(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def estimate_cell_size(last_used: Mapping | None, raster_path: str | None) -> tuple[float | None, str]:
    """The cell size (metres) the next search would most likely use, and why.

    The last-used cell size when there is one; otherwise the engine's own default, the same
    function as the search (:func:`engine.search.default_cell_size_m`: the reference's ground
    size but at least 32 raster pixels; before any reference is chosen, that minimum);
    ``(None, reason)`` when neither can be known yet.
    """
    last_used = last_used or {}
    cell = _positive(last_used.get("CELL_SIZE"))
    if cell:
        return cell, "last used"
    if not raster_path:
        return None, "choose a cell size in the dialog"
    from ..engine.imagery import GreyReader, ReferenceImage, describe_raster, list_images
    from ..engine.search import MIN_CELL_PIXELS, default_cell_size_m, raster_pixel_m

    refs = []
    for p in reference_paths(last_used.get("REFERENCE")):
        files = list_images(p) if Path(p).is_dir() else [Path(p)]
        for f in files[:8]:  # a few are enough for a median ground size
            try:
                with GreyReader(f, what="reference image") as r:
                    res = r.ground_resolution_m()
                    side = min(r.ds.width, r.ds.height)
            except AnalogFinderError:
                continue
            refs.append(ReferenceImage(str(f), np.empty(0), res * side if res else None))
    try:
        info = describe_raster(raster_path)
        if not info.georeferenced:
            return None, "the raster is not georeferenced"
        if not reference_paths(last_used.get("REFERENCE")):
            # No reference chosen yet: the run's default is its ground size but at least
            # MIN_CELL_PIXELS pixels, so that minimum bounds the cell count from above.
            return MIN_CELL_PIXELS * raster_pixel_m(info), (f"at least {MIN_CELL_PIXELS} imagery pixels; the Mars "
                                                            "reference's ground size decides")
        size, why = default_cell_size_m(info, refs)
    except AnalogFinderError:
        return None, "choose a cell size in the dialog"
    return size, why


def _format_area(area_m2: float) -> str:
    if area_m2 >= 1e6:
        return f"{area_m2 / 1e6:,.1f} km²"
    return f"{area_m2:,.0f} m²"


def area_status_message(area_m2: float | None, n_vertices: int, cell_size_m: float | None,
                        stride_m: float | None = None, cell_size_why: str = "",
                        max_cells: int = DEFAULT_MAX_CELLS,
                        on_raster_m2: float | None = None) -> tuple[str, int | None, bool]:
    """Status-bar text while drawing: area, estimated cells and a warning when too many.

    Args:
        on_raster_m2: the part of the area over the input raster, when known: the search only
            makes cells there, so the estimate counts that part.

    Returns:
        ``(text, cells, too_many)``; ``cells`` is ``None`` while no estimate is possible.
    """
    keys = "left-click: add a corner, right-click/Enter: finish, Backspace: undo, Esc: cancel"
    if n_vertices < 3 or area_m2 is None:
        corners = f"{n_vertices} corner" + ("" if n_vertices == 1 else "s")
        return f"Mars analog search area: {corners} ({keys})", None, False
    # The status bar shares its width with QGIS's coordinate and scale boxes: the count first,
    # the short reason (before any ":") in brackets, then the area.
    where = _format_area(area_m2)
    searched = area_m2
    if on_raster_m2 is not None and on_raster_m2 < 0.999 * area_m2:
        searched = max(on_raster_m2, 0.0)
        where += (f", {_format_area(searched)} over the input raster" if searched > 0
                  else ", OUTSIDE the input raster: draw over the raster")
    cells = None
    too_many = False
    short_why = cell_size_why.split(":")[0].split(";")[0].strip()
    if cell_size_m:
        stride = _positive(stride_m) or cell_size_m
        cells = estimate_cell_count(searched, cell_size_m, stride)
        why = f" ({short_why})" if short_why else ""
        text = f"Mars analog search: ≈ {cells:,} cells of {cell_size_m:,.0f} m{why} in {where}"
        too_many = cells > max_cells
        if too_many:
            text += (f". TOO LARGE: more than the limit of {max_cells:,} cells; draw a smaller area "
                     "or use a larger cell size")
    else:
        text = f"Mars analog search area: {where}" + (f" (cells: {cell_size_why})" if cell_size_why else "")
    return f"{text} ({keys})", cells, too_many
