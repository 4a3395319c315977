"""Labelled examples (support sets): from image folders or from labelled points/polygons on a raster."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .feedback import Feedback, check_cancelled
from .grid import Area
from .imagery import IMAGE_EXTENSIONS, GreyReader, describe_raster, list_images, load_image_patch


@dataclass
class SupportSet:
    """Labelled patches: the few examples the classifier learns from.

    Attributes:
        patches: ``(N, S, S)`` float32 grey patches in [0, 1].
        labels: ``(N,)`` int class index.
        class_names: the classes, in index order.
        sources: where each patch came from (a file path, or ``feature <fid>``), for messages.
    """

    patches: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    sources: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {name: int((self.labels == i).sum()) for i, name in enumerate(self.class_names)}


def _class_folders(folder: Path) -> list[tuple[str, list[Path]]]:
    out = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = list_images(sub)
        if files:
            out.append((sub.name, files))
    return out


def load_labelled_folder(folder: str | os.PathLike, size: int, classes: list[str] | None = None,
                         files: dict[str, list[Path]] | None = None, band: int | None = None,
                         what: str = "support folder", feedback: Feedback | None = None) -> SupportSet:
    """Load ``folder/<class>/*`` images as grey patches (the largest centred square of each).

    Args:
        folder: one sub-folder per class, images inside (searched recursively).
        size: the encoder's input size.
        classes: keep only these classes, in this order (default: every class folder, sorted).
        files: instead of listing the folder, these files per class.
        what: the word used in error messages.

    Raises:
        InputError: missing folder, no class folder with images, an unknown class, fewer than 2 classes.
    """
    folder = Path(folder)
    if files is None:
        if not folder.is_dir():
            raise InputError(f"The {what} '{folder}' does not exist or is not a folder", "Check the path")
        found = dict(_class_folders(folder))
    else:
        found = {k: list(v) for k, v in files.items() if v}
    if not found:
        raise InputError(f"The {what} '{folder}' holds no class folders with images",
                         f"Put the images of each class in its own sub-folder: {folder}/<class>/*.png "
                         f"({', '.join(IMAGE_EXTENSIONS[:4])}...)")
    names = list(classes) if classes else sorted(found)
    missing = [c for c in names if c not in found]
    if missing:
        raise InputError(f"The {what} '{folder}' has no images for the class(es) {', '.join(missing)}",
                         f"Its classes are: {', '.join(sorted(found))}")
    if len(names) < 2:
        raise InputError(f"The {what} '{folder}' has a single class ('{names[0]}'); mapping needs at least two",
                         "Add a folder of examples of another landform (or of 'other' ground)")
    paths = [(i, p) for i, c in enumerate(names) for p in found[c]]
    patches = np.empty((len(paths), size, size), dtype=np.float32)
    for j, (_, p) in enumerate(paths):
        patches[j] = load_image_patch(p, size, band=band, what="image")[0]
        if feedback is not None and j % 64 == 0:
            check_cancelled(feedback)
            feedback.progress((j + 1) / len(paths), f"{j + 1}/{len(paths)} images read")
    labels = np.array([i for i, _ in paths], dtype=np.int64)
    return SupportSet(patches, labels, names, [str(p) for _, p in paths])


@dataclass
class LabelledFeatures:
    """Labelled points or polygons (any CRS) from which support patches are read.

    Attributes:
        items: ``(geometry, class name)`` pairs; shapely points, polygons or multi-parts.
        crs: the geometries' CRS (anything :func:`geo.to_crs` accepts).
        ids: an id per item for messages (default: 1..N).
    """

    items: list[tuple[object, str]]
    crs: object
    ids: list = field(default_factory=list)


def read_labelled_features(path: str | os.PathLike, class_field: str, layer: str | None = None) -> LabelledFeatures:
    """Read labelled points/polygons from a vector file (GeoPackage, GeoJSON, Shapefile...).

    Raises:
        InputError: missing file, unknown layer or field, no CRS, no labelled feature.
    """
    from shapely import wkb

    from .vector import open_vector_layer

    path = str(path)
    # ``ds`` stays referenced while ``lyr`` is read: OGR layers die with their dataset.
    ds, lyr = open_vector_layer(path, layer, "labelled examples file", "points or polygons")
    defn = lyr.GetLayerDefn()
    fields = [defn.GetFieldDefn(i).GetName() for i in range(defn.GetFieldCount())]
    if class_field not in fields:
        raise InputError(f"The labelled examples have no field '{class_field}'",
                         f"Choose the class field among: {', '.join(fields) or '(no fields)'}")
    srs = lyr.GetSpatialRef()
    if srs is None:
        raise InputError(f"The labelled examples in '{path}' have no CRS", "Assign the layer a CRS")
    items, ids = [], []
    for feat in lyr:
        g = feat.GetGeometryRef()
        value = feat.GetField(class_field)
        if g is None or value is None or str(value).strip() == "":
            continue
        items.append((wkb.loads(bytes(g.ExportToIsoWkb())), str(value).strip()))
        ids.append(feat.GetFID())
    return LabelledFeatures(items, srs.ExportToWkt(), ids)


def _square_around(x: float, y: float, half_w: float, half_h: float) -> tuple[float, float, float, float]:
    return (x - half_w, y - half_h, x + half_w, y + half_h)


def support_from_features(raster: str, features: LabelledFeatures, cell_size_m: float, size: int,
                          band: int | None = None, max_nodata: float = 0.5, max_cells_per_polygon: int = 64,
                          feedback: Feedback | None = None) -> SupportSet:
    """Read one patch per labelled point, and the cells inside each labelled polygon.

    A point gives the cell-sized square centred on it; a polygon gives the grid cells of its
    own grid lying at least half inside it (evenly thinned to ``max_cells_per_polygon``), or
    the square around its centroid when it is smaller than a cell.

    Raises:
        InputError: no labelled feature, fewer than two classes, a class whose examples all
            lie off the raster or over nodata.
    """
    from shapely.geometry import Point
    from shapely.ops import transform as shapely_transform

    from .geo import reproject_geometry, to_crs, transformer
    from .grid import build_grid, cell_size_in_crs

    if not features.items:
        raise InputError("No labelled example was given (or none has a class value)",
                         "Label a few cells per landform: points or polygons with a class field")
    info = describe_raster(raster)
    if not info.georeferenced or not info.crs_wkt:
        raise InputError(f"The raster '{raster}' has no coordinate reference system",
                         "Georeference it first so labelled examples can be placed on it")
    raster_crs = to_crs(info.crs_wkt)
    src_crs = to_crs(features.crs) if features.crs is not None else raster_crs
    names = sorted({c for _, c in features.items})
    if len(names) < 2:
        raise InputError(f"All labelled examples have the same class ('{names[0]}'); mapping needs at least two",
                         "Label a few cells of another landform (or of 'other' ground) too")
    ids = features.ids or list(range(1, len(features.items) + 1))
    centre_lat = (info.bounds[1] + info.bounds[3]) / 2 if raster_crs.is_geographic else 0.0
    cw, ch = cell_size_in_crs(raster_crs, cell_size_m, centre_lat)
    tr = transformer(src_crs, raster_crs) if src_crs != raster_crs else None
    boxes: list[tuple[tuple[float, float, float, float], int, str]] = []
    for (geom, cls), fid in zip(features.items, ids):
        label = names.index(cls)
        if geom is None or geom.is_empty:
            continue
        if geom.geom_type in ("Point", "MultiPoint"):
            pts = list(getattr(geom, "geoms", [geom]))
            for p in pts:
                q = shapely_transform(tr.transform, p) if tr else p
                boxes.append((_square_around(q.x, q.y, cw / 2, ch / 2), label, f"feature {fid}"))
            continue
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            raise InputError(f"Labelled example {fid} is a {geom.geom_type}", "Give points or polygons")
        poly = reproject_geometry(geom, src_crs, raster_crs) if tr else geom
        try:
            sub = build_grid(info, cell_size_m, Area(poly, raster_crs.to_wkt()), min_coverage=0.5,
                             max_cells=100_000, force=False)
            b = sub.bounds_array()
            if len(b) > max_cells_per_polygon:
                b = b[np.linspace(0, len(b) - 1, max_cells_per_polygon).round().astype(int)]
            boxes += [(tuple(float(v) for v in bb), label, f"feature {fid}") for bb in b]
        except InputError:  # smaller than a cell (or partly off the raster): its centroid's square
            c = poly.centroid if not poly.is_empty else Point(0, 0)
            boxes.append((_square_around(c.x, c.y, cw / 2, ch / 2), label, f"feature {fid}"))
    patches, labels, sources = [], [], []
    with GreyReader(raster, band=band) as reader:
        for j, (bounds, label, src) in enumerate(boxes):
            patch, valid = reader.read_bounds(bounds, size)
            if valid >= 1.0 - max_nodata:
                patches.append(patch)
                labels.append(label)
                sources.append(src)
            if feedback is not None and j % 32 == 0:
                check_cancelled(feedback)
    if feedback is not None and len(patches) < len(boxes):
        feedback.log(f"{len(boxes) - len(patches)} of {len(boxes)} labelled cells were skipped: off the raster or "
                     f"more than {max_nodata:.0%} nodata")
    support = SupportSet(np.array(patches, dtype=np.float32).reshape(-1, size, size),
                         np.array(labels, dtype=np.int64), names, sources)
    empty = [n for n, k in support.counts().items() if k == 0]
    if empty:
        raise InputError(f"Every labelled example of {', '.join(repr(e) for e in empty)} lies off the raster "
                         "or over nodata", "Label cells over valid imagery (and check the layer's CRS)")
    return support
