"""From QGIS layers and feature sources to what the engine reads: files and shapely areas.

The engine reads rasters through rasterio/GDAL. A layer whose data GDAL can open directly
(a GeoTIFF, a VRT...) is handed over by path. Anything else QGIS can draw (XYZ/WMS/WMTS tile
layers such as satellite basemaps, database rasters...) is rendered by QGIS's own provider
over the search extent, at the resolution the encoder needs, into a temporary GeoTIFF.
"""

from __future__ import annotations

import math
import os

from qgis.core import (
    QgsCoordinateReferenceSystem,
    QgsCoordinateTransform,
    QgsFeatureRequest,
    QgsGeometry,
    QgsProcessingException,
    QgsProcessingFeatureSource,
    QgsProject,
    QgsProviderRegistry,
    QgsRasterFileWriter,
    QgsRasterLayer,
    QgsRasterPipe,
    QgsRectangle,
    QgsUnitTypes,
    QgsWkbTypes,
)

__all__ = [
    "MAX_EXPORT_PIXELS",
    "gdal_path",
    "area_from_source",
    "reference_paths",
    "RenderedRasterSource",
]

# A rendered export larger than this is refused (a wrong cell size or a whole-world tile layer).
MAX_EXPORT_PIXELS = 200_000_000


def gdal_path(layer: QgsRasterLayer) -> str | None:
    """The file GDAL can open for ``layer``, or ``None`` when the layer is not a plain GDAL raster."""
    if layer is None or layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    path = parts.get("path") or layer.source()
    if parts.get("layerName") or not os.path.exists(path):  # sub-datasets, /vsicurl/...: let GDAL try the URI
        path = layer.source()
    from osgeo import gdal

    with _gdal_quiet(gdal):
        ds = gdal.OpenEx(path, gdal.OF_RASTER)
    if ds is None:
        return None
    ds = None
    return path


class _gdal_quiet:  # noqa: N801 - a tiny context manager
    """Silence GDAL error printing while probing a path."""

    def __init__(self, gdal) -> None:
        self.gdal = gdal

    def __enter__(self):
        self.gdal.PushErrorHandler("CPLQuietErrorHandler")
        return self

    def __exit__(self, *exc) -> None:
        self.gdal.PopErrorHandler()


def reference_paths(layers) -> list[str]:
    """Files of the reference layers (or strings) given to ``REFERENCE``."""
    paths = []
    for item in layers or []:
        if isinstance(item, str):
            paths.append(item)
            continue
        path = gdal_path(item) if isinstance(item, QgsRasterLayer) else None
        if path is None:
            raise QgsProcessingException(
                f"The reference layer '{item.name()}' is not an image file (provider '{item.providerType()}'). "
                "Give a PNG, JPEG or GeoTIFF of the Mars terrain as the reference.")
        paths.append(path)
    if not paths:
        raise QgsProcessingException("No Mars reference image was given. Give a PNG, JPEG or GeoTIFF of the "
                                     "Mars terrain to match.")
    return paths


def area_from_source(source: QgsProcessingFeatureSource | None, feedback=None):
    """The union of a polygon source's features as an engine ``Area`` (``None`` without a source).

    ``source`` comes from ``parameterAsSource``, so "selected features only" is already applied.
    """
    if source is None:
        return None
    from shapely import wkb
    from shapely.geometry import MultiPolygon, Polygon
    from shapely.ops import unary_union

    from ..engine.grid import Area

    crs = source.sourceCrs()
    if not crs.isValid():
        raise QgsProcessingException("The area layer has no coordinate reference system. Set its CRS "
                                     "(Layer Properties > Source) and run again.")
    polys = []
    request = QgsFeatureRequest().setNoAttributes()
    for feature in source.getFeatures(request):
        if feedback is not None and feedback.isCanceled():
            break
        geom = feature.geometry()
        if geom is None or geom.isNull() or geom.isEmpty():
            continue
        if QgsWkbTypes.isCurvedType(geom.wkbType()):
            geom = QgsGeometry(geom.constGet().segmentize())
        shp = wkb.loads(bytes(geom.asWkb()))
        parts = getattr(shp, "geoms", [shp])
        polys += [p for p in parts if isinstance(p, (Polygon, MultiPolygon)) and not p.is_empty]
    if not polys:
        raise QgsProcessingException(
            "The area layer holds no polygon (or none is selected while 'Selected features only' is on). "
            "Select or draw at least one polygon, or leave the area empty to search the whole raster.")
    geom = unary_union([p if p.is_valid else p.buffer(0) for p in polys])
    return Area(geom, crs.toWkt())


def _metres_to_crs_units(crs: QgsCoordinateReferenceSystem) -> float:
    """CRS units per metre (degrees at the equator for geographic CRSs: slightly finer, never coarser)."""
    return QgsUnitTypes.fromUnitToUnitFactor(QgsUnitTypes.DistanceMeters, crs.mapUnits()) or 1.0


class RenderedRasterSource:
    """A raster layer QGIS draws (XYZ, WMS, ...), prepared on the main thread, rendered later.

    The provider and renderer are cloned in :meth:`__init__` (called from ``prepareAlgorithm``,
    on the main thread) so the worker thread never touches the project's layer.
    """

    def __init__(self, layer: QgsRasterLayer) -> None:
        self.name = layer.name()
        self.provider_type = layer.providerType()
        self.crs = QgsCoordinateReferenceSystem(layer.crs())
        self.extent = QgsRectangle(layer.extent())
        self.provider = layer.dataProvider().clone()
        renderer = layer.renderer()
        self.renderer = renderer.clone() if renderer is not None else None
        if self.provider is None or self.renderer is None:
            raise QgsProcessingException(f"The raster layer '{self.name}' cannot be drawn by QGIS (no provider "
                                         "or renderer). Check that the layer displays on the map.")
        self.transform_context = QgsProject.instance().transformContext()

    def export_extent(self, area) -> QgsRectangle:
        """The part of the layer to render: the area's bounding box (layer CRS) within the layer's extent."""
        if area is None:
            return QgsRectangle(self.extent)
        minx, miny, maxx, maxy = area.geometry.bounds
        area_crs = QgsCoordinateReferenceSystem.fromWkt(area.crs) if isinstance(area.crs, str) else area.crs
        rect = QgsRectangle(minx, miny, maxx, maxy)
        if area_crs.isValid() and area_crs != self.crs:
            tr = QgsCoordinateTransform(area_crs, self.crs, self.transform_context)
            try:
                rect = tr.transformBoundingBox(rect)
            except Exception as exc:  # QgsCsException
                raise QgsProcessingException(f"The area cannot be reprojected into the CRS of '{self.name}' "
                                             f"({self.crs.authid()}): {exc}. Check the area layer's CRS.") from exc
        clipped = rect.intersect(self.extent)
        if clipped.isEmpty():
            raise QgsProcessingException(f"The area does not overlap the raster layer '{self.name}'. Draw the area "
                                         "over the imagery, or check that the area layer has the right CRS.")
        return clipped

    def render(self, path: str, area, cell_size_m: float, input_size: int, feedback=None) -> str:
        """Render the search extent at ``cell_size_m / input_size`` metres per pixel into a GeoTIFF."""
        extent = self.export_extent(area)
        pixel = cell_size_m / max(input_size, 1) * _metres_to_crs_units(self.crs)
        n_cols = max(1, int(math.ceil(extent.width() / pixel)))
        n_rows = max(1, int(math.ceil(extent.height() / pixel)))
        if n_cols * n_rows > MAX_EXPORT_PIXELS:
            raise QgsProcessingException(
                f"Reading '{self.name}' over this area at {cell_size_m / input_size:.3g} m per pixel would need an "
                f"image of {n_cols:,} x {n_rows:,} pixels. Choose a smaller area (the AREA parameter: a tile "
                "layer covers the whole world) or a larger cell size.")
        # Square pixels exactly `pixel` wide: grow the extent to a whole number of pixels.
        extent = QgsRectangle(extent.xMinimum(), extent.yMaximum() - n_rows * pixel,
                              extent.xMinimum() + n_cols * pixel, extent.yMaximum())
        if feedback is not None:
            feedback.pushInfo(f"Rendering '{self.name}' ({self.provider_type} provider) through QGIS: "
                              f"{n_cols} x {n_rows} pixels at {cell_size_m / input_size:.3g} m per pixel")
        pipe = QgsRasterPipe()
        if not pipe.set(self.provider.clone()) or not pipe.set(self.renderer.clone()):
            raise QgsProcessingException(f"The raster layer '{self.name}' cannot be read through QGIS.")
        writer = QgsRasterFileWriter(path)
        writer.setOutputFormat("GTiff")
        writer.setOutputProviderKey("gdal")
        writer.setCreateOptions(["COMPRESS=DEFLATE", "TILED=YES"])
        block_feedback = _BlockFeedback(feedback)
        error = writer.writeRaster(pipe, n_cols, n_rows, extent, self.crs, self.transform_context,
                                   block_feedback.inner)
        if block_feedback.inner.isCanceled():
            from ..engine.errors import SearchCancelled

            raise SearchCancelled()
        if error != QgsRasterFileWriter.NoError or not os.path.exists(path):
            raise QgsProcessingException(f"QGIS could not read '{self.name}' over the area (writer error {error}). "
                                         "Check that the layer draws on the map over this area (network, "
                                         "tile URL) and try again.")
        return path


class _BlockFeedback:
    """A QgsRasterBlockFeedback that follows the Processing feedback's cancel button."""

    def __init__(self, feedback) -> None:
        from qgis.core import QgsRasterBlockFeedback
        from qgis.PyQt.QtCore import Qt

        self.inner = QgsRasterBlockFeedback()
        if feedback is not None:
            # Direct: the cancel button lives on the main thread, the writer polls from the worker.
            feedback.canceled.connect(self.inner.cancel, Qt.ConnectionType.DirectConnection)
            if feedback.isCanceled():
                self.inner.cancel()
