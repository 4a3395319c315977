"""Reading an area polygon from a vector file (GeoPackage, GeoJSON, Shapefile...)."""

from __future__ import annotations

import os

from shapely import wkb
from shapely.geometry import MultiPolygon, Polygon
from shapely.ops import unary_union

from .errors import InputError
from .grid import Area

__all__ = ["open_vector_layer", "read_area"]


def open_vector_layer(path: str | os.PathLike, layer: str | None = None, what: str = "area file",
                      kinds: str = "polygons"):
    """Open a vector file's layer with OGR: ``(dataset, layer)`` (keep the dataset alive).

    Raises:
        InputError: missing or unreadable file, unknown layer.
    """
    from osgeo import ogr

    ogr.UseExceptions()
    path = str(path)
    if not os.path.exists(path):
        raise InputError(f"The {what} '{path}' does not exist", "Check the path")
    try:
        ds = ogr.Open(path)
    except Exception as exc:
        raise InputError(f"The {what} '{path}' cannot be read as a vector layer: {exc}",
                         f"Give a GeoPackage, GeoJSON or Shapefile of {kinds}") from exc
    if ds is None:
        raise InputError(f"The {what} '{path}' cannot be read as a vector layer",
                         f"Give a GeoPackage, GeoJSON or Shapefile of {kinds}")
    lyr = ds.GetLayerByName(layer) if layer else ds.GetLayer(0)
    if lyr is None:
        names = [ds.GetLayer(i).GetName() for i in range(ds.GetLayerCount())]
        raise InputError(f"The {what} '{path}' has no layer '{layer}'", f"Its layers are: {', '.join(names)}")
    return ds, lyr


def read_area(path: str | os.PathLike, layer: str | None = None, where: str | None = None) -> Area:
    """Union of the polygons of a vector layer, with the layer's CRS.

    Args:
        path: any OGR-readable vector file.
        layer: layer name (default: the first layer).
        where: optional OGR attribute filter, e.g. ``"name = 'Qaidam'"``.

    Raises:
        InputError: missing/unreadable file, unknown layer, no polygon, no CRS.
    """
    path = str(path)
    ds, lyr = open_vector_layer(path, layer)
    if where:
        lyr.SetAttributeFilter(where)
    srs = lyr.GetSpatialRef()
    if srs is None:
        raise InputError(f"The area layer in '{path}' has no CRS", "Assign it a CRS (e.g. in QGIS: Layer CRS)")
    if (srs.GetName() or "").lower().startswith("undefined"):
        # A GeoPackage layer with srs_id 0 or -1: GDAL makes up a stand-in CRS for it.
        raise InputError(f"The area layer in '{path}' has an undefined CRS ({srs.GetName()})",
                         "Assign it its real CRS (e.g. in QGIS: Layer CRS, then save it)")
    polys = []
    for feat in lyr:
        g = feat.GetGeometryRef()
        if g is None:
            continue
        shp = wkb.loads(bytes(g.ExportToIsoWkb()))
        parts = getattr(shp, "geoms", [shp])
        polys += [p for p in parts if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    if not polys:
        raise InputError(f"The area file '{path}' holds no polygon", "Give polygon features as the area")
    geom = unary_union([p if p.is_valid else p.buffer(0) for p in polys])
    return Area(geom, srs.ExportToWkt())
