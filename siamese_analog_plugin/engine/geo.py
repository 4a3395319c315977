"""Coordinate helpers: CRS parsing, ground units, reprojection of polygons.

Works for any body: metres per degree come from the CRS's own ellipsoid, so a Mars
geographic CRS measures Mars metres.
"""

from __future__ import annotations

import math
from typing import Any

from pyproj import CRS, Geod, Transformer
from shapely.geometry import MultiPolygon, Polygon, mapping, shape
from shapely.geometry.base import BaseGeometry

from .errors import InputError

__all__ = [
    "to_crs",
    "metres_per_unit",
    "metres_per_degree",
    "reproject_geometry",
    "transformer",
]


def to_crs(value: Any) -> CRS:
    """Parse a CRS from a pyproj/rasterio CRS, EPSG code, 'EPSG:n', WKT or PROJ string."""
    if isinstance(value, CRS):
        return value
    if value is None or value == "":
        raise InputError("No coordinate reference system was given", "Set the layer's CRS")
    if hasattr(value, "to_wkt"):  # rasterio.crs.CRS, QgsCoordinateReferenceSystem-like
        value = value.to_wkt()
    try:
        return CRS.from_user_input(value)
    except Exception as exc:
        raise InputError(f"'{str(value)[:80]}' is not a coordinate reference system I can read",
                         "Give an EPSG code (e.g. EPSG:32618), WKT or a PROJ string") from exc


# Mars reference bodies: the IAU 2000 sphere/ellipsoid (3,396,190 m equatorial, 3,376,200 m polar)
# and the mean-radius spheres (3,389,500-3,390,000 m) that HiRISE, CTX and MOLA products use.
MARS_RADII_M = (3_370_000.0, 3_400_000.0)


def is_mars_crs(value: Any) -> bool:
    """Whether a CRS (WKT, ``EPSG:...``, pyproj CRS) lies on Mars, judged by its body's radius."""
    try:
        crs = to_crs(value)
        radius = crs.ellipsoid.semi_major_metre if crs.ellipsoid is not None else None
    except Exception:  # no CRS, or one pyproj cannot read: not known to be Mars
        return False
    return radius is not None and MARS_RADII_M[0] <= radius <= MARS_RADII_M[1]


def _geod(crs: CRS) -> Geod:
    ell = crs.ellipsoid
    if ell is None:
        return Geod(ellps="WGS84")
    return Geod(a=ell.semi_major_metre, b=ell.semi_minor_metre)


def metres_per_degree(crs: CRS, latitude: float) -> tuple[float, float]:
    """Ground metres per degree of longitude and of latitude at a latitude, on the CRS's ellipsoid."""
    geod = _geod(crs)
    lat = max(min(latitude, 89.0), -89.0)
    d = 0.01
    _, _, dx = geod.inv(0.0, lat, d, lat)
    _, _, dy = geod.inv(0.0, lat - d / 2, 0.0, lat + d / 2)
    return dx / d, dy / d


def metres_per_unit(crs: CRS) -> float:
    """Metres per unit of a projected CRS's x axis (1 for metres, 0.3048 for feet...)."""
    factor = crs.axis_info[0].unit_conversion_factor if crs.axis_info else 1.0
    return float(factor or 1.0)


def transformer(src: CRS, dst: CRS) -> Transformer:
    """An always-xy transformer (x = easting/longitude first)."""
    return Transformer.from_crs(src, dst, always_xy=True)


def _densify_ring(coords, max_segments: int = 64):
    out = []
    coords = list(coords)
    for (x0, y0), (x1, y1) in zip(coords[:-1], coords[1:]):
        for k in range(max_segments):
            t = k / max_segments
            out.append((x0 + (x1 - x0) * t, y0 + (y1 - y0) * t))
    out.append(coords[-1])
    return out


def reproject_geometry(geom: BaseGeometry, src: Any, dst: Any) -> BaseGeometry:
    """Reproject a (multi)polygon, densifying its edges first so curved edges stay faithful."""
    src_crs, dst_crs = to_crs(src), to_crs(dst)
    if src_crs == dst_crs:
        return geom
    tr = transformer(src_crs, dst_crs)

    def project_ring(ring):
        pts = _densify_ring([(c[0], c[1]) for c in ring])
        xs, ys = tr.transform([p[0] for p in pts], [p[1] for p in pts])
        if not all(math.isfinite(v) for v in list(xs) + list(ys)):
            raise InputError("The area polygon cannot be reprojected into the raster's CRS (it lies "
                             "outside where that projection is defined)",
                             "Draw the area over the raster, or check the polygon layer's CRS")
        return list(zip(xs, ys))

    def project_polygon(poly: Polygon) -> Polygon:
        return Polygon(project_ring(poly.exterior.coords), [project_ring(r.coords) for r in poly.interiors])

    if isinstance(geom, Polygon):
        out = project_polygon(geom)
    elif isinstance(geom, MultiPolygon):
        out = MultiPolygon([project_polygon(p) for p in geom.geoms])
    else:
        out = shape(mapping(geom))  # GeometryCollection etc.: keep polygonal parts only
        polys = [g for g in getattr(out, "geoms", [out]) if isinstance(g, (Polygon, MultiPolygon))]
        if not polys:
            raise InputError("The area is not a polygon", "Give polygon features as the area")
        return reproject_geometry(MultiPolygon([p for g in polys for p in getattr(g, "geoms", [g])]), src, dst)
    return out if out.is_valid else out.buffer(0)
