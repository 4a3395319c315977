"""The ``siameseanalog`` Processing provider: every algorithm of the plugin in the toolbox."""

from __future__ import annotations

import importlib

from qgis.core import QgsMessageLog, QgsProcessingModelAlgorithm, QgsProcessingProvider

from .base import plugin_icon, resource_path

__all__ = ["PROVIDER_ID", "SiameseAnalogProvider", "optional_algorithm"]

PROVIDER_ID = "siameseanalog"
EXAMPLE_MODEL = ("models", "find_analogs_example.model3")


def optional_algorithm(module: str, class_name: str):
    """An algorithm class from a module that may not be written yet (``None`` then).

    Only the module itself being absent is tolerated; an import error inside it is a real bug
    and propagates.
    """
    full = f"{__package__}.{module}"
    try:
        mod = importlib.import_module(full)
    except ModuleNotFoundError as exc:
        if exc.name == full:
            return None
        raise
    return getattr(mod, class_name)


class SiameseAnalogProvider(QgsProcessingProvider):
    """Find Mars analog sites, train and use the Siamese encoder."""

    def id(self) -> str:
        return PROVIDER_ID

    def name(self) -> str:
        return "Siamese Analog Finder"

    def longName(self) -> str:
        from .. import __version__

        return f"Siamese Analog Finder {__version__}"

    def icon(self):
        return plugin_icon()

    def loadAlgorithms(self) -> None:
        from .embed_images import EmbedImagesAlgorithm
        from .find_analogs import FindAnalogsAlgorithm
        from .train_encoder import TrainEncoderAlgorithm

        for cls in (FindAnalogsAlgorithm, TrainEncoderAlgorithm, EmbedImagesAlgorithm):
            self.addAlgorithm(cls())
        fewshot = optional_algorithm("fewshot_algorithm", "FewShotLandformAlgorithm")
        if fewshot is not None:
            self.addAlgorithm(fewshot())
        from .compare_regions import CompareRegionsAlgorithm
        from .embed_area import EmbedAreaAlgorithm

        for cls in (EmbedAreaAlgorithm, CompareRegionsAlgorithm):
            self.addAlgorithm(cls())
        self._load_example_model()

    def _load_example_model(self) -> None:
        """The shipped example model (a graphical model chaining QGIS's buffer with the search)."""
        path = resource_path(*EXAMPLE_MODEL)
        if not path.exists():
            return
        model = QgsProcessingModelAlgorithm()
        if model.fromFile(str(path)):
            self.addAlgorithm(model)
        else:
            QgsMessageLog.logMessage(f"Cannot read the example model {path}", "Siamese Analog Finder")

    # The engine writes GeoTIFF rasters and GeoPackage cells: offer exactly those.
    def supportedOutputRasterLayerExtensions(self) -> list[str]:
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self) -> list[str]:
        return ["gpkg"]

    def defaultVectorFileExtension(self, hasGeometry: bool = True) -> str:
        return "gpkg"

    def defaultRasterFileFormat(self) -> str:
        return "GTiff"

    def defaultRasterFileExtension(self) -> str:
        return "tif"
