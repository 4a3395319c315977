"""Processing algorithm ``siameseanalog:fewshotlandforms``: a landform map from a few labelled cells."""

from __future__ import annotations

import os
import shutil
import tempfile

from qgis.core import (
    QgsCategorizedSymbolRenderer,
    QgsFeatureRequest,
    QgsFillSymbol,
    QgsGeometry,
    QgsPalettedRasterRenderer,
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterField,
    QgsProcessingParameterFile,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsRendererCategory,
    QgsWkbTypes,
)
from qgis.PyQt.QtGui import QColor

from .base import (
    AnalogAlgorithm,
    KeptAlivePostProcessor,
    ProcessingFeedbackAdapter,
    device_parameter,
    device_value,
    engine_errors,
    vector_file,
)
from .layers import RenderedRasterSource, area_from_source, gdal_path

__all__ = ["FewShotLandformAlgorithm", "ClassStyler", "style_class_raster", "style_class_cells"]

RASTER_LAYER_NAME = "Landform classes"
CELLS_LAYER_NAME = "Landform cells"


def style_class_raster(layer, class_names: list[str], name: str | None = RASTER_LAYER_NAME):
    """Paletted renderer: one colour per class (value i + 1), labelled with the class name."""
    from ..engine.classes import class_colours

    classes = [QgsPalettedRasterRenderer.Class(i + 1, QColor(*rgb), cls)
               for i, (cls, rgb) in enumerate(zip(class_names, class_colours(len(class_names))))]
    renderer = QgsPalettedRasterRenderer(layer.dataProvider(), 1, classes)
    renderer.setOpacity(0.7)  # the imagery stays readable under the classes
    layer.setRenderer(renderer)
    if name:
        layer.setName(name)
    layer.triggerRepaint()
    return layer


def style_class_cells(layer, class_names: list[str], name: str | None = CELLS_LAYER_NAME):
    """Categorised renderer on ``class``: the same colour per class as the raster, one legend entry
    each, as outlines (the raster below fills the cells; two fills would mix the colours)."""
    from ..engine.classes import class_colours

    categories = []
    for cls, rgb in zip(class_names, class_colours(len(class_names))):
        symbol = QgsFillSymbol.createSimple({"style": "no", "outline_color": ",".join(map(str, rgb)),
                                             "outline_width": "0.4"})
        categories.append(QgsRendererCategory(cls, symbol, cls))
    layer.setRenderer(QgsCategorizedSymbolRenderer("class", categories))
    if name:
        layer.setName(name)
    layer.triggerRepaint()
    return layer


class ClassStyler(KeptAlivePostProcessor):
    """Styles a class raster or cell layer once QGIS has loaded it; make one with ``ClassStyler.create``."""

    def __init__(self, kind: str, class_names: list[str], run: str = "", examples: str | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.class_names = list(class_names)
        self.run = run
        self.examples = examples  # the labelled examples layer's id: kept above the results

    def postProcessLayer(self, layer, context, feedback) -> None:
        from ..styles import arrange_result_layers, mark_result_layer, raise_layer

        if layer is None or not layer.isValid():
            return
        if self.kind == "raster":
            style_class_raster(layer, self.class_names)
        else:
            style_class_cells(layer, self.class_names)
        mark_result_layer(layer, "classes_" + self.kind, self.run)
        project = layer.project() or context.project()
        if project is not None:
            arrange_result_layers(project, self.run)
            if self.examples:
                raise_layer(project, self.examples)


class FewShotLandformAlgorithm(AnalogAlgorithm):
    """Map landforms over an area from a few labelled examples (cosine-distance classifier)."""

    ALG_ID = "fewshotlandforms"
    DISPLAY_NAME = "Map landforms from a few examples"
    SHORT_DESCRIPTION = "Label a few cells per landform; get a landform map of the whole area."

    INPUT = "INPUT"
    AREA = "AREA"
    EXAMPLES = "EXAMPLES"
    CLASS_FIELD = "CLASS_FIELD"
    SUPPORT_FOLDER = "SUPPORT_FOLDER"
    CELL_SIZE = "CELL_SIZE"
    MODEL = "MODEL"
    STRIDE = "STRIDE"
    MIN_COVERAGE = "MIN_COVERAGE"
    MAX_NODATA = "MAX_NODATA"
    DEVICE = "DEVICE"
    RUNTIME = "RUNTIME"
    BATCH_SIZE = "BATCH_SIZE"
    ALLOW_LARGE = "ALLOW_LARGE"
    EMBEDDINGS = "EMBEDDINGS"
    OUTPUT_RASTER = "OUTPUT_RASTER"
    OUTPUT_CELLS = "OUTPUT_CELLS"
    CELL_COUNT = "CELL_COUNT"
    CLASSIFIED_COUNT = "CLASSIFIED_COUNT"
    CLASSES = "CLASSES"

    HELP = """<p>Maps landforms over a whole area from a <b>few labelled examples</b> (after SDFT, stepwise deep
feature transfer). The area is cut into square <b>cells</b>; the Siamese encoder turns every cell into an
embedding; each class is the normalised mean embedding of its examples (its <i>prototype</i>), and every cell
gets the class whose prototype is closest in angle (<b>cosine</b>).</p>
<h3>How to use it</h3>
<ol>
<li><b>Imagery</b>: the raster to map (a GeoTIFF, or a tile layer with an area and a cell size).</li>
<li><b>Area</b> (optional): polygons to map; empty = the whole raster.</li>
<li><b>Labelled examples</b>: a point or polygon layer with a <b>class field</b>. A point stands for the
cell-sized square around it; a polygon for the cells inside it. Label a few cells (1-10) of each landform,
including an "other" class for the rest. Or give a <b>folder of example images</b> instead,
one sub-folder per class (<i>folder/crater/*.png</i>...).</li>
<li><b>Cell size</b> in metres (empty: 100 raster pixels); the examples are read at the same size.</li>
<li><b>Model</b>: empty for the shipped encoder (on a Mars raster: the shipped Mars landform model, the encoder
after a transfer step on HiRISE landforms), or a model from the stepwise transfer (the <i>transfer</i>
command); a step-2 model carries its own classes, so the examples may then be left empty.</li>
</ol>
<h3>Outputs</h3>
<p><b>Class raster</b>: one pixel per cell (GeoTIFF, byte; class i is value i, 0 = not classified), with a
colour table and class names. <b>Cells</b>: GeoPackage polygons with <i>class</i>, <i>cosine</i> (similarity
to the class prototype), <i>confidence</i> (softmax of the scaled cosines) and <i>margin</i> (best minus
second-best cosine; small = ambiguous). Both load styled with one colour per class and a legend.
Cancelling leaves no partial files.</p>
<p><b>Embedding raster</b> (optional): an embedding raster of this imagery made by <i>Embed area</i>: its
cells are classified without encoding them again.</p>
<h3>Advanced parameters</h3>
<p><b>Stride (m)</b>: distance between cells (empty: the cell size, no overlap). <b>Max. nodata share of a
cell</b>: cells with more nodata are skipped (default 0.5). <b>Inference runtime</b>: auto (ONNX Runtime
when it is installed and the model has an .onnx file, else torch), ONNX Runtime or torch.</p>"""

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Imagery to map")))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AREA, self.tr("Area to map"), [QgsProcessing.TypeVectorPolygon],
            optional=True))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.EXAMPLES, self.tr("Labelled examples"),
            [QgsProcessing.TypeVectorPoint, QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterField(
            self.CLASS_FIELD, self.tr("Class field of the examples"), parentLayerParameterName=self.EXAMPLES,
            optional=True))
        self.addParameter(QgsProcessingParameterFile(
            self.SUPPORT_FOLDER, self.tr("Or: folder of examples"),
            behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterNumber(
            self.CELL_SIZE, self.tr("Cell size (m)"),
            QgsProcessingParameterNumber.Double, None, optional=True, minValue=0.0))
        self.addParameter(self._model_parameter(self.MODEL, self.tr("Model file")))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.EMBEDDINGS, self.tr("Embedding raster"),
            optional=True))
        advanced = [
            self._grid_parameter(self.STRIDE),
            self._grid_parameter(self.MIN_COVERAGE),
            self._grid_parameter(self.MAX_NODATA),
            device_parameter(self.DEVICE, self.tr("Device")),
            self._grid_parameter(self.BATCH_SIZE),
            self._grid_parameter(self.ALLOW_LARGE),
            self._runtime_parameter(self.RUNTIME),
        ]
        self._add_advanced(advanced)
        self.addParameter(QgsProcessingParameterRasterDestination(self.OUTPUT_RASTER, self.tr("Landform classes")))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_CELLS, self.tr("Landform cells"), QgsProcessing.TypeVectorPolygon))
        self.addOutput(QgsProcessingOutputNumber(self.CELL_COUNT, self.tr("Number of cells")))
        self.addOutput(QgsProcessingOutputNumber(self.CLASSIFIED_COUNT, self.tr("Number of cells classified")))
        self.addOutput(QgsProcessingOutputString(self.CLASSES, self.tr("Classes (comma separated)")))

    # -- main thread ---------------------------------------------------------------------
    def prepareAlgorithm(self, parameters, context, feedback) -> bool:
        """Resolve the imagery layer to a file on the main thread (QGIS layers belong to it)."""
        layer = self._imagery_layer(parameters, context, "The imagery layer")
        self._raster_path = gdal_path(layer)
        examples = self.parameterAsVectorLayer(parameters, self.EXAMPLES, context)
        self._examples_id = examples.id() if examples is not None and context.project() is not None \
            and context.project().mapLayer(examples.id()) is not None else None
        self._rendered = None if self._raster_path else RenderedRasterSource(layer)
        from .embed_area import embeddings_parameter_path

        self._embeddings = embeddings_parameter_path(self, parameters, self.EMBEDDINGS, context)
        if self._embeddings and self._raster_path is None:
            raise QgsProcessingException(f"'{layer.name()}' is a tile/web layer, but an embedding raster belongs to "
                                         "an imagery file. Choose the raster file it was made from as the imagery, "
                                         "or leave the embedding raster empty.")
        self._inputs = {"imagery": self._raster_path, "examples": vector_file(self, parameters, self.EXAMPLES, context),
                        "area": vector_file(self, parameters, self.AREA, context),
                        "embedding raster": self._embeddings}
        return True

    # -- worker thread -------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback):
        self.check_dependencies()
        out_raster = self.parameterAsOutputLayer(parameters, self.OUTPUT_RASTER, context)
        out_cells = self.parameterAsOutputLayer(parameters, self.OUTPUT_CELLS, context)
        self._check_raster_and_cells(out_raster, out_cells, "class raster", "cells")
        adapter = ProcessingFeedbackAdapter(feedback)
        work_dir = None
        with engine_errors("The landform mapping"):
            from ..engine.landforms import FewShotParams, run_fewshot_map
            from ..engine.runtime import load_runtime
            from ..engine.safety import check_outputs

            # Before anything is read: an output that is an input (or another output) is refused.
            check_outputs({"class raster": out_raster, "cells": out_cells}, self._inputs)

            support = self._support(parameters, context, feedback)
            area = area_from_source(self.parameterAsSource(parameters, self.AREA, context), feedback)
            cell = self._optional_number(parameters, self.CELL_SIZE, context)
            model = self.parameterAsFile(parameters, self.MODEL, context) or None
            device = device_value(self, parameters, self.DEVICE, context)
            # An embedding raster names its own model: load that one unless a model is given.
            if self._embeddings and not model:
                from ..engine.embeddings import EmbeddingRaster

                model = EmbeddingRaster.open(self._embeddings).facts.model_path or None
            runtime = self._runtime(parameters, context, self.RUNTIME)
            if not model and self._raster_path and not self._embeddings:  # a Mars raster: the Mars landform model
                from ..engine.imagery import describe_raster
                from ..engine.landforms import default_landform_model

                model = default_landform_model(describe_raster(self._raster_path).crs_wkt, runtime, device,
                                               feedback.pushInfo)
            encoder = load_runtime(model, runtime, device)
            try:
                raster = self._raster_path
                if raster is None:
                    if not cell:
                        raise QgsProcessingException("The imagery is a tile/web layer: give a cell size in metres.")
                    work_dir = tempfile.mkdtemp(prefix="siamese_fewshot_")
                    raster = self._rendered.render(os.path.join(work_dir, "imagery.tif"), area, cell,
                                                   encoder.input_size, feedback)
                params = FewShotParams(
                    raster=raster, area=area, cell_size_m=cell,
                    stride_m=self._optional_number(parameters, self.STRIDE, context),
                    min_coverage=self.parameterAsDouble(parameters, self.MIN_COVERAGE, context),
                    max_nodata=self.parameterAsDouble(parameters, self.MAX_NODATA, context),
                    model=model, device=device, runtime=runtime,
                    batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                    force=self.parameterAsBool(parameters, self.ALLOW_LARGE, context), embeddings=self._embeddings)
                result = run_fewshot_map(params, support, out_raster, out_cells, adapter, encoder=encoder)
            finally:
                if work_dir:
                    shutil.rmtree(work_dir, ignore_errors=True)
        n, classified = len(result.grid), int(result.classified.sum())
        feedback.pushInfo(f"Classified {classified:,} of {n:,} cells of {result.grid.cell_size_m:g} m in "
                          f"{result.seconds:.1f} s on {result.device}: "
                          + ", ".join(f"{k} {v:,}" for k, v in result.counts().items()))
        self._style_on_load(context, out_raster, out_cells, result.class_names)
        return {self.OUTPUT_RASTER: out_raster, self.OUTPUT_CELLS: out_cells, self.CELL_COUNT: n,
                self.CLASSIFIED_COUNT: classified, self.CLASSES: ",".join(result.class_names)}

    # -- helpers ---------------------------------------------------------------------------
    def _support(self, parameters, context, feedback):
        """Labelled features from the examples layer, or the image folder, or ``None`` (model's classes)."""
        from ..engine.support import LabelledFeatures

        folder = self.parameterAsFile(parameters, self.SUPPORT_FOLDER, context)
        source = self.parameterAsSource(parameters, self.EXAMPLES, context)
        if source is None:
            return folder or None
        if folder:
            raise QgsProcessingException("Give either labelled examples (a layer) or a folder of example images, "
                                         "not both.")
        field = self.parameterAsString(parameters, self.CLASS_FIELD, context)
        if not field:
            raise QgsProcessingException("Choose the class field of the labelled examples (the field that holds "
                                         "each example's landform name).")
        if source.fields().lookupField(field) < 0:
            raise QgsProcessingException(f"The labelled examples have no field '{field}'. Choose one of: "
                                         f"{', '.join(source.fields().names())}.")
        crs = source.sourceCrs()
        if not crs.isValid():
            raise QgsProcessingException("The labelled examples have no coordinate reference system. Set the "
                                         "layer's CRS and run again.")
        from shapely import wkb

        items, ids = [], []
        request = QgsFeatureRequest().setSubsetOfAttributes([field], source.fields())
        for feature in source.getFeatures(request):
            if feedback is not None and feedback.isCanceled():
                break
            value = feature[field]
            geom = feature.geometry()
            if value is None or str(value).strip() in ("", "NULL") or geom is None or geom.isEmpty():
                continue
            if QgsWkbTypes.isCurvedType(geom.wkbType()):
                geom = QgsGeometry(geom.constGet().segmentize())
            items.append((wkb.loads(bytes(geom.asWkb())), str(value).strip()))
            ids.append(feature.id())
        if not items:
            raise QgsProcessingException(f"No labelled example has a value in '{field}' (or none is selected while "
                                         "'Selected features only' is on). Label a few cells per landform.")
        return LabelledFeatures(items, crs.toWkt(), ids)

    def _style_on_load(self, context: QgsProcessingContext, out_raster: str, out_cells: str,
                       class_names: list[str]) -> None:
        import uuid

        run, examples = uuid.uuid4().hex, getattr(self, "_examples_id", None)
        if context.willLoadLayerOnCompletion(out_raster):
            context.layerToLoadOnCompletionDetails(out_raster).setPostProcessor(
                ClassStyler.create("raster", class_names, run, examples))
        if context.willLoadLayerOnCompletion(out_cells):
            context.layerToLoadOnCompletionDetails(out_cells).setPostProcessor(
                ClassStyler.create("cells", class_names, run, examples))

