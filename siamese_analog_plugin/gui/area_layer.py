"""The temporary polygon layer that holds a drawn area, so the algorithm's AREA can name it."""

from __future__ import annotations

from qgis.core import (
    QgsFeature,
    QgsFillSymbol,
    QgsGeometry,
    QgsProject,
    QgsVectorLayer,
)

from .map_tool import DrawnArea

__all__ = ["TEMPORARY_PROPERTY", "AREA_LAYER_NAME", "TemporaryAreaLayer"]

TEMPORARY_PROPERTY = "siamese_analog/temporary_area"
AREA_LAYER_NAME = "Mars analog search area"


class TemporaryAreaLayer:
    """Owns at most one memory layer with the drawn polygon, in the CRS it was drawn in.

    :meth:`replace` puts a new drawing in place of the previous one; :meth:`remove` takes it
    out of the project (also when the user removed it already or started a new project).
    """

    def __init__(self, project: QgsProject | None = None) -> None:
        self._project = project
        self._layer_id: str | None = None

    @property
    def project(self) -> QgsProject:
        return self._project or QgsProject.instance()

    @property
    def layer(self) -> QgsVectorLayer | None:
        """The layer while it is in the project, else ``None``."""
        if self._layer_id is None:
            return None
        return self.project.mapLayer(self._layer_id)

    def replace(self, drawn: DrawnArea) -> QgsVectorLayer:
        """Remove the previous area layer and add one holding ``drawn``."""
        self.remove()
        # Fields in the URI: no QVariant/QMetaType type codes, which differ between Qt5 and Qt6.
        layer = QgsVectorLayer("MultiPolygon?field=area_km2:double", AREA_LAYER_NAME, "memory")
        layer.setCrs(drawn.crs)  # any CRS, custom ones too (an authid may not exist)
        provider = layer.dataProvider()
        geometry = QgsGeometry(drawn.geometry)
        geometry.convertToMultiType()
        feature = QgsFeature(layer.fields())
        feature.setGeometry(geometry)
        feature.setAttribute("area_km2", round(drawn.area_m2 / 1e6, 3) if drawn.area_m2 else None)
        provider.addFeatures([feature])
        layer.updateExtents()
        layer.setCustomProperty(TEMPORARY_PROPERTY, True)
        symbol = QgsFillSymbol.createSimple({"color": "230,80,0,40", "outline_color": "230,80,0,255",
                                             "outline_width": "0.6", "outline_style": "dash"})
        layer.renderer().setSymbol(symbol)
        self.project.addMapLayer(layer)
        self._layer_id = layer.id()
        return layer

    def remove(self) -> None:
        """Take the area layer out of the project, if it is still there."""
        layer = self.layer
        self._layer_id = None
        if layer is not None:
            self.project.removeMapLayer(layer.id())
