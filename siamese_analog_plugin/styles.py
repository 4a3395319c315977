"""How analog results look in QGIS: hot (red) where the ground is most Mars-like.

Shared by the Processing algorithms (through a layer post-processor) and the map tool. Every
function takes a loaded layer and restyles it in place; call them on the main thread.
"""

from __future__ import annotations

from qgis.core import (
    QgsColorRampLegendNodeSettings,
    QgsColorRampShader,
    QgsFillSymbol,
    QgsGradientColorRamp,
    QgsMarkerSymbol,
    QgsPalLayerSettings,
    QgsProject,
    QgsProperty,
    QgsRasterBandStats,
    QgsRasterLayer,
    QgsRasterShader,
    QgsRuleBasedRenderer,
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
    "RESULT_PROPERTY",
    "is_result_layer",
    "mark_result_layer",
    "arrange_result_layers",
    "raise_layer",
]

# Custom layer properties on every layer the plugin loads: what it is and which run made it.
RESULT_PROPERTY = "siamese_analog/result"
RUN_PROPERTY = "siamese_analog/run"
# Top to bottom in the layer tree: points and their labels, then outlines, then rasters.
RESULT_ORDER = ("sites", "examples", "cells", "classes_cells", "raster", "classes_raster")

MORE_MARS_LIKE = "more Mars-like"
LESS_MARS_LIKE = "less Mars-like"
RASTER_LAYER_NAME = "Dissimilarity (red = more Mars-like)"
CELLS_LAYER_NAME = "Analog cells (red = more Mars-like)"
SITES_LAYER_NAME = "Top analog sites"
BEST_CELLS = 10  # cells outlined as the best ones (rank 1..BEST_CELLS)


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

    A continuous ramp whose colours fade out towards the less Mars-like end, so the imagery
    stays visible under most of the map and the best places stand out. The legend is a
    continuous bar labelled "more Mars-like" at the low end.
    """
    lo, hi = _raster_range(layer)
    ramp = analog_ramp()
    stops = 7
    items = []
    for i in range(stops):
        t = i / (stops - 1)
        color = QColor(ramp.color(t))
        color.setAlpha(int(round(235 - t * (235 - 45))))  # opaque red -> faint blue
        items.append(QgsColorRampShader.ColorRampItem(lo + t * (hi - lo), color, f"{lo + t * (hi - lo):.3g}"))
    ramp_shader = QgsColorRampShader(lo, hi, ramp, QgsColorRampShader.Interpolated)
    ramp_shader.setColorRampItemList(items)
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
    renderer.setOpacity(0.85)
    layer.setRenderer(renderer)
    if name:
        layer.setName(name)
    mark_result_layer(layer, "raster")
    layer.triggerRepaint()
    return layer


def style_cells(layer: QgsVectorLayer, field: str = "rank", name: str | None = CELLS_LAYER_NAME,
                best: int = BEST_CELLS) -> QgsVectorLayer:
    """Outlines only (the raster shows the same values in colour): the best ``best`` cells in
    a bold red outline, the others a faint grid; skipped cells (rank NULL) are not drawn."""
    root = QgsRuleBasedRenderer.Rule(None)
    top = QgsFillSymbol.createSimple({"style": "no", "outline_color": "215,25,28,255", "outline_width": "0.7"})
    rest = QgsFillSymbol.createSimple({"style": "no", "outline_color": "60,60,60,60", "outline_width": "0.1"})
    root.appendChild(QgsRuleBasedRenderer.Rule(top, 0, 0, f'"{field}" >= 1 AND "{field}" <= {best}',
                                               f"best {best} cells ({MORE_MARS_LIKE})"))
    root.appendChild(QgsRuleBasedRenderer.Rule(rest, 0, 0, f'"{field}" > {best}', "other scored cells"))
    layer.setRenderer(QgsRuleBasedRenderer(root))
    _percent_alias(layer)
    if name:
        layer.setName(name)
    mark_result_layer(layer, "cells")
    layer.triggerRepaint()
    return layer


def _percent_alias(layer: QgsVectorLayer) -> None:
    index = layer.fields().indexOf("percentile")
    if index >= 0:
        layer.setFieldAlias(index, "percentile (% of scored cells at most this dissimilar)")


def style_sites(layer: QgsVectorLayer, name: str | None = SITES_LAYER_NAME) -> QgsVectorLayer:
    """Red stars labelled "#rank" (1 = most Mars-like), labels placed around the star and never
    over one another (better ranks win the space)."""
    symbol = QgsMarkerSymbol.createSimple({"name": "star", "color": "255,230,0", "size": "5",
                                           "outline_color": "0,0,0", "outline_width": "0.4"})
    layer.renderer().setSymbol(symbol)
    settings = QgsPalLayerSettings()
    settings.fieldName = "'#' || \"rank\""
    settings.isExpression = True
    settings.placement = _placement("OrderedPositionsAroundPoint")
    settings.dist = 1.0
    settings.displayAll = False  # no overlapping labels
    props = settings.dataDefinedProperties()
    props.setProperty(QgsPalLayerSettings.Priority, QgsProperty.fromExpression('10 - least(9, "rank" - 1)'))
    settings.setDataDefinedProperties(props)
    text = QgsTextFormat()
    text.setSize(10)
    text.setColor(QColor("black"))
    text.buffer().setEnabled(True)
    text.buffer().setSize(1.2)
    text.buffer().setColor(QColor("white"))
    settings.setFormat(text)
    layer.setLabeling(QgsVectorLayerSimpleLabeling(settings))
    layer.setLabelsEnabled(True)
    _percent_alias(layer)
    if name:
        layer.setName(name)
    mark_result_layer(layer, "sites")
    layer.triggerRepaint()
    return layer


def _placement(name: str):
    """A label placement enum value on QGIS 3.22 (QgsPalLayerSettings.X) and later (Qgis.LabelPlacement.X)."""
    from qgis.core import Qgis

    scoped = getattr(Qgis, "LabelPlacement", None)
    if scoped is not None and hasattr(scoped, name):
        return getattr(scoped, name)
    return getattr(QgsPalLayerSettings, name)


def mark_result_layer(layer, kind: str, run: str | None = None) -> None:
    """Tag ``layer`` as one of the plugin's results (never offered as input imagery)."""
    layer.setCustomProperty(RESULT_PROPERTY, kind)
    if run:
        layer.setCustomProperty(RUN_PROPERTY, run)


def is_result_layer(layer) -> bool:
    """Whether ``layer`` was loaded by the plugin as a result."""
    return bool(layer is not None and layer.customProperty(RESULT_PROPERTY, ""))


def arrange_result_layers(project: QgsProject | None = None, run: str | None = None) -> None:
    """Put one run's result layers together in a fixed order (sites on top, then cells, then
    rasters), where the highest of them was; the imagery stays below them."""
    project = project or QgsProject.instance()
    root = project.layerTreeRoot()
    nodes = [n for n in root.findLayers() if n.layer() is not None and is_result_layer(n.layer())
             and (run is None or n.layer().customProperty(RUN_PROPERTY, "") == run)]
    by_parent: dict = {}
    for node in nodes:
        by_parent.setdefault(id(node.parent()), (node.parent(), []))[1].append(node)
    for parent, members in by_parent.values():
        children = parent.children()
        start = min(children.index(n) for n in members)
        # An input raster above the results (inserted there by the user's insertion point) goes below.
        ordered = sorted(members, key=lambda n: (_order(n.layer()), children.index(n)))
        if [children[start + i] for i in range(len(ordered)) if start + i < len(children)] == ordered:
            continue
        # Insert the copies before removing the originals: a layer that is in the tree nowhere,
        # even for a moment, is removed from the project by QGIS (the layer-tree bridge).
        for offset, node in enumerate(ordered):
            parent.insertChildNode(start + offset, node.clone())
        for n in members:
            parent.removeChildNode(n)


def raise_layer(project: QgsProject, layer_id: str) -> None:
    """Move a layer to the top of its group (the few-shot examples above the class map)."""
    node = project.layerTreeRoot().findLayer(layer_id)
    if node is None or node.parent() is None:
        return
    parent = node.parent()
    if parent.children().index(node) == 0:
        return
    clone = node.clone()
    parent.insertChildNode(0, clone)
    parent.removeChildNode(node)


def _order(layer) -> int:
    kind = layer.customProperty(RESULT_PROPERTY, "")
    return RESULT_ORDER.index(kind) if kind in RESULT_ORDER else len(RESULT_ORDER)


def style_result_layer(layer, kind: str):
    """Style a result layer by kind: ``raster``, ``cells`` or ``sites``."""
    if kind == "raster":
        return style_dissimilarity_raster(layer)
    if kind == "cells":
        return style_cells(layer)
    if kind == "sites":
        return style_sites(layer)
    raise ValueError(f"unknown result kind {kind!r}")
