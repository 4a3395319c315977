"""How analog results look in QGIS: hot (red) where the ground is most Mars-like.

Shared by the Processing algorithms (through a layer post-processor) and the map tool. Every
function takes a loaded layer and restyles it in place; call them on the main thread.
"""

from __future__ import annotations

from qgis.core import (
    QgsClassificationQuantile,
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsGraduatedSymbolRenderer,
    QgsMarkerSymbol,
    QgsPalLayerSettings,
    QgsRasterBandStats,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRendererRange,
    QgsSingleBandPseudoColorRenderer,
    QgsStyle,
    QgsTextFormat,
    QgsVectorLayer,
    QgsVectorLayerSimpleLabeling,
)
from qgis.PyQt.QtGui import QColor

__all__ = [
    "MORE_MARS_LIKE",
    "LESS_MARS_LIKE",
    "RASTER_LAYER_NAME",
    "CELLS_LAYER_NAME",
    "SITES_LAYER_NAME",
    "analog_ramp",
    "style_dissimilarity_raster",
    "style_cells",
    "style_sites",
    "style_result_layer",
]

MORE_MARS_LIKE = "more Mars-like"
LESS_MARS_LIKE = "less Mars-like"
RASTER_LAYER_NAME = "Dissimilarity (red = more Mars-like)"
CELLS_LAYER_NAME = "Analog cells (red = more Mars-like)"
SITES_LAYER_NAME = "Top analog sites"
CELL_CLASSES = 5


def analog_ramp() -> QgsGradientColorRamp:
    """Red (low dissimilarity, Mars-like) through yellow to blue (high), as in the paper's maps."""
    ramp = QgsStyle.defaultStyle().colorRamp("RdYlBu")
    if ramp is None:  # a style database without ColorBrewer ramps
        ramp = QgsGradientColorRamp(QColor("#d7191c"), QColor("#2c7bb6"))
    return ramp


def _raster_range(layer: QgsRasterLayer) -> tuple[float, float]:
    """2-98 % of the valid pixels (robust to a few outliers), else the full range."""
    provider = layer.dataProvider()
    lo, hi = provider.cumulativeCut(1, 0.02, 0.98, layer.extent(), 0)
    if not (hi > lo):
        stats = provider.bandStatistics(1, QgsRasterBandStats.Min | QgsRasterBandStats.Max)
        lo, hi = stats.minimumValue, stats.maximumValue
        if not (hi > lo):
            hi = lo + 1e-6
    return float(lo), float(hi)


def style_dissimilarity_raster(layer: QgsRasterLayer, name: str | None = RASTER_LAYER_NAME) -> QgsRasterLayer:
    """Single-band pseudocolour: red = low dissimilarity (more Mars-like), blue = high.

    The legend is a continuous bar labelled "more Mars-like" at the low end.
    """
    lo, hi = _raster_range(layer)
    ramp_shader = QgsColorRampShader(lo, hi, analog_ramp(), QgsColorRampShader.Interpolated)
    ramp_shader.classifyColorRamp(7, 1, layer.extent(), layer.dataProvider())
    legend = QgsColorRampLegendNodeSettings()
    legend.setUseContinuousLegend(True)
    legend.setMinimumLabel(f"{lo:.3g} ({MORE_MARS_LIKE})")
    legend.setMaximumLabel(f"{hi:.3g} ({LESS_MARS_LIKE})")
    ramp_shader.setLegendSettings(legend)
    shader = QgsRasterShader(lo, hi)
    shader.setRasterShaderFunction(ramp_shader)
    renderer = QgsSingleBandPseudoColorRenderer(layer.dataProvider(), 1, shader)
    renderer.setClassificationMin(lo)
    renderer.setClassificationMax(hi)
    renderer.setOpacity(0.8)  # the imagery underneath stays readable
    layer.setRenderer(renderer)
    if name:
        layer.setName(name)
    layer.triggerRepaint()
    return layer


def style_cells(layer: QgsVectorLayer, field: str = "dissimilarity", name: str | None = CELLS_LAYER_NAME,
                classes: int = CELL_CLASSES) -> QgsVectorLayer:
    """Graduated (quantile) fill on dissimilarity: the lowest class red and labelled "more Mars-like".

    Classes come from the scored cells only: unscored cells (NULL) would otherwise count as 0
    and squash the lowest class.
    """
    index = layer.fields().indexOf(field)
    values = sorted(float(v) for v in layer.uniqueValues(index) if v is not None and not _is_null(v)) \
        if index >= 0 else []
    symbol = QgsFillSymbol.createSimple({"color": "200,200,200,180", "outline_style": "no"})
    method = QgsClassificationQuantile()
    renderer = QgsGraduatedSymbolRenderer(field)
    renderer.setClassificationMethod(method)
    renderer.setSourceSymbol(symbol.clone())
    ramp = analog_ramp()
    renderer.setSourceColorRamp(ramp.clone())
    if values:
        for cls in method.classes(values, min(classes, len(values))):
            renderer.addClassRange(QgsRendererRange(cls, symbol.clone()))
        renderer.updateColorRamp(ramp.clone())
    ranges = renderer.ranges()
    if ranges:
        renderer.updateRangeLabel(0, f"{ranges[0].label()} ({MORE_MARS_LIKE})")
        if len(ranges) > 1:
            renderer.updateRangeLabel(len(ranges) - 1, f"{ranges[-1].label()} ({LESS_MARS_LIKE})")
    layer.setRenderer(renderer)
    layer.setOpacity(0.75)
    if name:
        layer.setName(name)
    layer.triggerRepaint()
    return layer


def _is_null(value) -> bool:
    """QVariant NULLs come back from uniqueValues as NULL objects (3.x) or None (Qt6)."""
    return hasattr(value, "isNull") and value.isNull()


def style_sites(layer: QgsVectorLayer, name: str | None = SITES_LAYER_NAME) -> QgsVectorLayer:
    """Red stars labelled with their rank (1 = most Mars-like)."""
    symbol = QgsMarkerSymbol.createSimple({"name": "star", "color": "215,25,28", "size": "5",
                                           "outline_color": "0,0,0", "outline_width": "0.3"})
    layer.renderer().setSymbol(symbol)
    settings = QgsPalLayerSettings()
    settings.fieldName = "rank"
    text = QgsTextFormat()
    text.setSize(9)
    text.buffer().setEnabled(True)
    settings.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    if name:
        layer.setName(name)
    layer.triggerRepaint()
    return layer


def style_result_layer(layer, kind: str):
    """Style a result layer by kind: ``raster``, ``cells`` or ``sites``."""
    if kind == "raster":
        return style_dissimilarity_raster(layer)
    if kind == "cells":
        return style_cells(layer)
    if kind == "sites":
        return style_sites(layer)
    raise ValueError(f"unknown result kind {kind!r}")
