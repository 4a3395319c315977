"""Processing algorithm ``siameseanalog:embedarea``: embed an area's cells once into an embedding raster.

Also the post-processors that make embedding rasters known to the rest of the plugin (styled
when loaded, remembered for the *Find similar cells* tool, recorded on the result layers made
from them): see :mod:`..embedding_layers`.
"""

from __future__ import annotations

from qgis.core import (
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterDistance,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsUnitTypes,
)

from .base import (
    AnalogAlgorithm,
    KeptAlivePostProcessor,
    ProcessingFeedbackAdapter,
    device_parameter,
    device_value,
    engine_errors,
)
from .layers import area_from_source, gdal_path

__all__ = ["EmbedAreaAlgorithm", "EmbeddingsStyler", "EmbeddingsTagger", "tag_layers_with_embeddings",
           "embeddings_parameter_path"]


class EmbeddingsStyler(KeptAlivePostProcessor):
    """Styles a loaded embedding raster (first three dimensions as RGB) and remembers it."""

    def postProcessLayer(self, layer, context, feedback) -> None:
        from ..embedding_layers import remember_embeddings, style_embedding_raster

        if layer is not None and layer.isValid():
            style_embedding_raster(layer)
            remember_embeddings(layer.source())


class EmbeddingsTagger(KeptAlivePostProcessor):
    """Runs the layer's previous post-processor, then records the embedding raster it came from
    (a custom layer property) and remembers that raster for the *Find similar cells* tool."""

    def __init__(self, inner, embeddings: str) -> None:
        super().__init__()
        self.inner = inner
        self.embeddings = embeddings

    def postProcessLayer(self, layer, context, feedback) -> None:
        from ..embedding_layers import EMBEDDINGS_PROPERTY, remember_embeddings

        if self.inner is not None:
            self.inner.postProcessLayer(layer, context, feedback)
        if layer is not None and layer.isValid():
            layer.setCustomProperty(EMBEDDINGS_PROPERTY, self.embeddings)
            remember_embeddings(self.embeddings)


def tag_layers_with_embeddings(context: QgsProcessingContext, outputs: list[str], embeddings: str | None) -> None:
    """Record ``embeddings`` on the ``outputs`` QGIS loads on completion (keeping their styling)."""
    if not embeddings:
        return
    for output in outputs:
        if context.willLoadLayerOnCompletion(output):
            details = context.layerToLoadOnCompletionDetails(output)
            details.setPostProcessor(EmbeddingsTagger.create(details.postProcessor(), embeddings))


def embeddings_parameter_path(alg: AnalogAlgorithm, parameters: dict, name: str, context) -> str | None:
    """The file of an optional EMBEDDINGS raster-layer parameter (main thread: it resolves a layer)."""
    value = parameters.get(name)
    if value is None or value == "":
        return None
    layer = alg.parameterAsRasterLayer(parameters, name, context)
    path = gdal_path(layer) if layer is not None and layer.isValid() else None
    if path is None:
        raise QgsProcessingException(f"The embedding raster '{value}' cannot be read as a GeoTIFF file. Give a "
                                     "GeoTIFF written by 'Embed area' (or by 'Keep the embeddings' of Find Mars "
                                     "analog sites).")
    return path


class EmbedAreaAlgorithm(AnalogAlgorithm):
    """Embed once: every cell of an area -> its embedding, stored as a raster on the cell grid."""

    ALG_ID = "embedarea"
    DISPLAY_NAME = "Embed area"
    SHORT_DESCRIPTION = ("Encode every cell of an area once into an embedding raster; searches, landform maps, "
                         "region comparisons and 'find similar cells' then answer from it at once.")

    INPUT = "INPUT"
    AREA = "AREA"
    CELL_SIZE = "CELL_SIZE"
    STRIDE = "STRIDE"
    MIN_COVERAGE = "MIN_COVERAGE"
    MAX_NODATA = "MAX_NODATA"
    BAND = "BAND"
    MODEL = "MODEL"
    DEVICE = "DEVICE"
    RUNTIME = "RUNTIME"
    BATCH_SIZE = "BATCH_SIZE"
    ALLOW_LARGE = "ALLOW_LARGE"
    OUTPUT = "OUTPUT"
    CELL_COUNT = "CELL_COUNT"
    ENCODED_COUNT = "ENCODED_COUNT"
    DEVICE_USED = "DEVICE_USED"

    HELP = """<p>Cuts an area of Earth imagery into square <b>cells</b> and runs the Siamese encoder on every cell
<b>once</b>. The result is an <b>embedding raster</b>: a GeoTIFF with one pixel per cell (the grid of the
dissimilarity raster) and one band per embedding value, plus a last band with each cell's share of valid
pixels.</p>
<p>Give it as <b>Embedding raster</b> to <i>Find Mars analog sites</i>, <i>Map landforms from a few
examples</i> or <i>Compare regions with Mars references</i>: they then skip the encoding (seconds instead of
minutes) and give the same numbers. The <i>Find similar cells</i> map tool queries it by clicking a cell.</p>
<h3>How to use it</h3>
<p><b>Imagery</b>: a raster file (GeoTIFF...). <b>Area</b> (optional): polygons; empty = the whole raster.
<b>Cell size</b> in metres (empty: 100 raster pixels); use the cell size you will search with (e.g. the
ground size of the Mars reference). <b>Model</b>: empty for the shipped encoder; queries must use the same
model.</p>
<p>The layer loads with the first three embedding values as red, green and blue: cells of like texture get
like colours. The embedding raster stays tied to its imagery file: a query refuses it for another raster.</p>
<h3>Advanced parameters</h3>
<p><b>Stride (m)</b>: distance between cells (empty: the cell size, no overlap). <b>Max. nodata share of a
cell</b>: cells with more nodata are skipped (default 0.5). <b>Band</b>: the raster band to use (empty: the
luminance of RGB, or band 1). <b>Inference runtime</b>: auto (ONNX Runtime when it is installed and the model
has an .onnx file, else torch), ONNX Runtime or torch.</p>"""

    def initAlgorithm(self, config=None) -> None:
        from qgis.core import QgsProcessing

        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Earth imagery (a raster file)")))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AREA, self.tr("Area to embed"),
            [QgsProcessing.TypeVectorPolygon], optional=True))
        cell = QgsProcessingParameterDistance(self.CELL_SIZE, self.tr("Cell size (m)"),
                                              defaultValue=None, optional=True, minValue=0.0)
        cell.setDefaultUnit(QgsUnitTypes.DistanceMeters)
        self.addParameter(cell)
        self.addParameter(self._model_parameter(self.MODEL, self.tr("Model file")))
        advanced = [
            self._grid_parameter(self.STRIDE),
            self._grid_parameter(self.MIN_COVERAGE),
            self._grid_parameter(self.MAX_NODATA),
            self._grid_parameter(self.BAND),
            device_parameter(self.DEVICE, self.tr("Device")),
            self._grid_parameter(self.BATCH_SIZE),
            self._grid_parameter(self.ALLOW_LARGE),
            self._runtime_parameter(self.RUNTIME),
        ]
        self._add_advanced(advanced)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT, self.tr("Embedding raster")))
        self.addOutput(QgsProcessingOutputNumber(self.CELL_COUNT, self.tr("Number of cells")))
        self.addOutput(QgsProcessingOutputNumber(self.ENCODED_COUNT, self.tr("Number of cells encoded")))
        self.addOutput(QgsProcessingOutputString(self.DEVICE_USED, self.tr("Device used")))

    # -- main thread ---------------------------------------------------------------------
    def prepareAlgorithm(self, parameters, context, feedback) -> bool:
        layer = self._imagery_layer(parameters, context)
        self._raster_path = gdal_path(layer)
        if self._raster_path is None:
            raise QgsProcessingException(
                f"'{layer.name()}' is not a raster file (provider '{layer.providerType()}'). An embedding raster "
                "stays tied to its imagery file: save the imagery as a GeoTIFF first (Export > Save As...).")
        return True

    # -- worker thread -------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback):
        self.check_dependencies()
        out = self.parameterAsOutputLayer(parameters, self.OUTPUT, context)
        if not out.lower().endswith((".tif", ".tiff")):
            raise QgsProcessingException(f"The embedding raster is written as a GeoTIFF, but '{out}' is not a .tif "
                                         "file. Give a file name ending in .tif.")
        with engine_errors("Embedding the area"):
            from ..engine.embed import EmbedParams, run_embed_area

            params = EmbedParams(
                raster=self._raster_path,
                area=area_from_source(self.parameterAsSource(parameters, self.AREA, context), feedback),
                cell_size_m=self._optional_number(parameters, self.CELL_SIZE, context),
                stride_m=self._optional_number(parameters, self.STRIDE, context),
                min_coverage=self.parameterAsDouble(parameters, self.MIN_COVERAGE, context),
                max_nodata=self.parameterAsDouble(parameters, self.MAX_NODATA, context),
                band=self._optional_int(parameters, self.BAND, context),
                model=self.parameterAsFile(parameters, self.MODEL, context) or None,
                device=device_value(self, parameters, self.DEVICE, context),
                batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                force=self.parameterAsBool(parameters, self.ALLOW_LARGE, context),
                runtime=self._runtime(parameters, context, self.RUNTIME))
            result = run_embed_area(params, out, ProcessingFeedbackAdapter(feedback))
        grid = result.grid
        feedback.pushInfo(f"Embedded {result.encoded:,} of {len(grid):,} cells of {grid.cell_size_m:g} m "
                          f"(grid {grid.n_rows} x {grid.n_cols}) in {result.seconds:.1f} s on {result.device}.")
        if context.willLoadLayerOnCompletion(out):
            context.layerToLoadOnCompletionDetails(out).setPostProcessor(EmbeddingsStyler.create())
        return {self.OUTPUT: out, self.CELL_COUNT: len(grid), self.ENCODED_COUNT: result.encoded,
                self.DEVICE_USED: result.device}
