"""Embedding rasters as QGIS layers: recognise them, draw them, and remember the latest one.

Shared by the Processing algorithms (which write or read embedding rasters) and the *Find
similar cells* map tool (which queries one). Which embedding raster a click queries:

1. the active layer, when it *is* an embedding raster (its GeoTIFF carries the
   ``SIAMESE_EMBEDDINGS`` metadata tag);
2. the embedding raster a result layer came from (the custom layer property
   :data:`EMBEDDINGS_PROPERTY`, set when *Find Mars analog sites* ran with EMBEDDINGS or
   KEEP_EMBEDDINGS);
3. the last embedding raster written or used by the plugin (QgsSettings
   :data:`LAST_EMBEDDINGS_KEY`), while the file still exists.

Layer work here belongs to the main thread (post-processors run there).
"""

from __future__ import annotations

import os

from qgis.core import (
    QgsContrastEnhancement,
    QgsMultiBandColorRenderer,
    QgsProviderRegistry,
    QgsRasterBandStats,
    QgsRasterLayer,
    QgsSettings,
    QgsSingleBandGrayRenderer,
)

__all__ = [
    "EMBEDDINGS_PROPERTY",
    "EMBEDDINGS_TAG",
    "LAST_EMBEDDINGS_KEY",
    "EMBEDDINGS_LAYER_NAME",
    "is_embedding_raster",
    "layer_file",
    "embeddings_of_layer",
    "remember_embeddings",
    "last_embeddings",
    "forget_embeddings",
    "style_embedding_raster",
]

EMBEDDINGS_TAG = "SIAMESE_EMBEDDINGS"  # as engine.embeddings.TAG (not imported: it needs numpy only, but
# this module must load when the engine's dependencies are missing)
EMBEDDINGS_PROPERTY = "siamese_analog/embeddings"
LAST_EMBEDDINGS_KEY = "siamese_analog/last_embeddings"
EMBEDDINGS_LAYER_NAME = "Cell embeddings"


def is_embedding_raster(path: str | None) -> bool:
    """Whether ``path`` is a GeoTIFF written as an embedding raster (it has the metadata tag)."""
    if not path or not (os.path.exists(path) or str(path).startswith("/vsi")):
        return False
    from osgeo import gdal

    gdal.PushErrorHandler("CPLQuietErrorHandler")
    try:
        ds = gdal.Open(str(path))
        return ds is not None and bool(ds.GetMetadataItem(EMBEDDINGS_TAG))
    finally:
        gdal.PopErrorHandler()


def layer_file(layer) -> str | None:
    """The file behind a GDAL raster layer (``None`` for other layers)."""
    if not isinstance(layer, QgsRasterLayer) or not layer.isValid() or layer.providerType() != "gdal":
        return None
    parts = QgsProviderRegistry.instance().decodeUri("gdal", layer.source())
    return parts.get("path") or layer.source()


def embeddings_of_layer(layer) -> str | None:
    """The embedding raster ``layer`` is, or the one it was computed from (``None``: neither)."""
    if layer is None:
        return None
    path = layer_file(layer)
    if path and is_embedding_raster(path):
        return path
    tagged = layer.customProperty(EMBEDDINGS_PROPERTY)
    if tagged and is_embedding_raster(str(tagged)):
        return str(tagged)
    return None


def remember_embeddings(path: str, settings: QgsSettings | None = None) -> None:
    """Make ``path`` the embedding raster the similar-cells tool queries by default."""
    (settings or QgsSettings()).setValue(LAST_EMBEDDINGS_KEY, os.path.abspath(path))


def last_embeddings(settings: QgsSettings | None = None) -> str | None:
    """The last embedding raster remembered, while it is still an embedding raster on disk."""
    path = (settings or QgsSettings()).value(LAST_EMBEDDINGS_KEY, None)
    return str(path) if path and is_embedding_raster(str(path)) else None


def forget_embeddings(settings: QgsSettings | None = None) -> None:
    (settings or QgsSettings()).remove(LAST_EMBEDDINGS_KEY)


def _stretch(layer: QgsRasterLayer, band: int) -> QgsContrastEnhancement:
    """A 2-98 % min/max stretch of ``band`` (its full range when the cut is flat)."""
    provider = layer.dataProvider()
    lo, hi = provider.cumulativeCut(band, 0.02, 0.98, layer.extent(), 0)
    if not (hi > lo):
        stats = provider.bandStatistics(band, QgsRasterBandStats.Min | QgsRasterBandStats.Max)
        lo, hi = stats.minimumValue, stats.maximumValue
        if not (hi > lo):
            hi = lo + 1e-6
    enhancement = QgsContrastEnhancement(provider.dataType(band))
    enhancement.setContrastEnhancementAlgorithm(QgsContrastEnhancement.StretchToMinimumMaximum, True)
    enhancement.setMinimumValue(lo)
    enhancement.setMaximumValue(hi)
    return enhancement


def style_embedding_raster(layer: QgsRasterLayer, name: str | None = EMBEDDINGS_LAYER_NAME) -> QgsRasterLayer:
    """Draw the first three embedding dimensions as red, green and blue (stretched 2-98 %).

    Cells of similar texture get similar embeddings, so they get similar colours: the layer is a
    quick picture of which parts of the area the encoder sees alike. With fewer than three
    dimensions (plus the valid-share band), the first dimension in grey.
    """
    dims = layer.bandCount() - 1  # the last band is the valid share
    provider = layer.dataProvider()
    if dims >= 3:
        renderer = QgsMultiBandColorRenderer(provider, 1, 2, 3)
        renderer.setRedContrastEnhancement(_stretch(layer, 1))
        renderer.setGreenContrastEnhancement(_stretch(layer, 2))
        renderer.setBlueContrastEnhancement(_stretch(layer, 3))
    else:
        renderer = QgsSingleBandGrayRenderer(provider, 1)
        renderer.setContrastEnhancement(_stretch(layer, 1))
    renderer.setOpacity(0.8)
    layer.setRenderer(renderer)
    if name:
        layer.setName(name)
    layer.triggerRepaint()
    return layer
