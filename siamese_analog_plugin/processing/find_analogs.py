"""Processing algorithm ``siameseanalog:findanalogs``: map how Mars-like every cell of an area is."""

from __future__ import annotations

import os
import shutil
import tempfile

from qgis.core import (
    QgsProcessing,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingOutputString,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterDistance,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFeatureSource,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorDestination,
    QgsProcessingUtils,
    QgsUnitTypes,
)

from .base import (
    AnalogAlgorithm,
    KeptAlivePostProcessor,
    ProcessingFeedbackAdapter,
    device_parameter,
    device_value,
    engine_errors,
    vector_file,
)
from .layers import RenderedRasterSource, area_from_source, gdal_path, reference_paths

__all__ = ["FindAnalogsAlgorithm", "ResultStyler"]

AGGREGATE_OPTIONS = ("nearest", "mean")


class ResultStyler(KeptAlivePostProcessor):
    """Styles a result layer once QGIS has loaded it; make one with ``ResultStyler.create(kind)``."""

    def __init__(self, kind: str, run: str = "") -> None:
        super().__init__()
        self.kind = kind
        self.run = run

    def postProcessLayer(self, layer, context, feedback) -> None:
        from ..styles import arrange_result_layers, mark_result_layer, style_result_layer

        if layer is not None and layer.isValid():
            style_result_layer(layer, self.kind)
            mark_result_layer(layer, self.kind, self.run)
            project = layer.project() or context.project()
            if project is not None:
                arrange_result_layers(project, self.run)


class ReferenceImagesParameter(QgsProcessingParameterMultipleLayers):
    """Raster layers or image files. Existing files are accepted as they are: QGIS's own check
    resolves every string as a map layer, trying OGR first, which logs "[OGR] Cannot open
    <reference>.tif" whenever the dialog checks its values."""

    def checkValueIsAcceptable(self, value, context=None) -> bool:
        values = value if isinstance(value, (list, tuple)) else [value] if isinstance(value, str) and value else None
        if values and all(isinstance(v, str) and os.path.isfile(v) for v in values):
            return True
        return super().checkValueIsAcceptable(value, context)

    def valueAsPythonString(self, value, context) -> str:
        values = value if isinstance(value, (list, tuple)) else None
        if values and all(isinstance(v, str) and os.path.isfile(v) for v in values):
            return repr(list(values))
        return super().valueAsPythonString(value, context)

    def clone(self):
        copy = ReferenceImagesParameter(self.name(), self.description(), self.layerType(), self.defaultValue(),
                                        bool(self.flags() & QgsProcessingParameterDefinition.FlagOptional))
        copy.setFlags(self.flags())
        return copy


class FindAnalogsAlgorithm(AnalogAlgorithm):
    """Find Mars analog sites: Earth imagery + Mars reference -> dissimilarity map and cells."""

    ALG_ID = "findanalogs"
    DISPLAY_NAME = "Find Mars analog sites"
    SHORT_DESCRIPTION = "Cut an area of Earth imagery into cells and map how much each looks like a Mars reference."

    INPUT = "INPUT"
    AREA = "AREA"
    REFERENCE = "REFERENCE"
    CELL_SIZE = "CELL_SIZE"
    STRIDE = "STRIDE"
    MIN_COVERAGE = "MIN_COVERAGE"
    MODEL = "MODEL"
    DEVICE = "DEVICE"
    RUNTIME = "RUNTIME"
    BATCH_SIZE = "BATCH_SIZE"
    MAX_NODATA = "MAX_NODATA"
    BAND = "BAND"
    REFERENCE_RESOLUTION = "REFERENCE_RESOLUTION"
    AGGREGATE = "AGGREGATE"
    TOP_K = "TOP_K"
    ALLOW_LARGE = "ALLOW_LARGE"
    EMBEDDINGS = "EMBEDDINGS"
    KEEP_EMBEDDINGS = "KEEP_EMBEDDINGS"
    SCHEDULER = "SCHEDULER"
    OUTPUT_RASTER = "OUTPUT_RASTER"
    OUTPUT_CELLS = "OUTPUT_CELLS"
    OUTPUT_REPORT = "OUTPUT_REPORT"
    OUTPUT_SITES = "OUTPUT_SITES"
    CELL_COUNT = "CELL_COUNT"
    SCORED_COUNT = "SCORED_COUNT"
    DEVICE_USED = "DEVICE_USED"
    CELLS_PER_SECOND = "CELLS_PER_SECOND"
    BEST_DISSIMILARITY = "BEST_DISSIMILARITY"

    HELP = """<p>Finds the places on Earth whose ground looks most like a patch of Mars. The area is cut into
square <b>cells</b>; a Siamese neural network turns each cell and the Mars reference into short vectors
(embeddings), and the distance between them is the cell's <b>dissimilarity</b>: <b>lower means more
Mars-like</b>.</p>
<h3>How to use it</h3>
<ol>
<li><b>Earth imagery</b>: any raster layer QGIS can draw: a GeoTIFF, or a satellite basemap
(XYZ/WMS tiles, e.g. the imagery layers of QuickMapServices or XYZ Tiles in the Browser). Tile
layers are read through QGIS at the resolution the network needs; give an <b>area</b> with them.</li>
<li><b>Search area</b> (optional): polygons to search; tick <i>Selected features only</i> to use just
the selected ones. Empty: the whole raster.</li>
<li><b>Mars reference image(s)</b>: PNG, JPEG or GeoTIFF of the Mars terrain to match (e.g. a HiRISE
or CTX crop). With several, each cell is compared with the closest one.</li>
<li><b>Cell size</b> in metres: the ground size of one cell. Match it to the ground size of the
reference for a like-for-like comparison. Empty: the reference's own ground size when it is
georeferenced (else 100 raster pixels), but never fewer than 32 imagery pixels a cell: a cell
of a few coarse pixels has no texture left to compare (the log and the report warn when the
imagery is much coarser than the reference).</li>
<li>Run. The results load styled: red cells are the most Mars-like. The optional HTML report shows the
distribution of dissimilarity with its quartiles and the best sites with their coordinates and a
picture of each beside the reference.</li>
</ol>
<h3>Outputs</h3>
<p><b>Dissimilarity raster</b>: one pixel per cell (GeoTIFF, nodata -9999). <b>Cells</b>: a GeoPackage of
cell polygons with <i>dissimilarity</i>, <i>rank</i> (1 = most Mars-like), <i>percentile</i>, <i>lon</i>,
<i>lat</i>, <i>status</i>, <i>valid_fraction</i> and the nearest <i>reference</i>; its layer
<i>analog_sites</i> holds the best sites as points.</p>
<h3>Tips</h3>
<p><b>Stride</b> (empty: the cell size, no overlap) smaller than the cell size makes overlapping cells
(finer map, more work). <b>Model file</b>: empty uses the shipped encoder. Cells mostly
outside the area (<b>minimum coverage</b>) or mostly nodata are skipped. The run stops with a clear message
when the grid would be absurdly large (usually a cell size in the wrong unit); tick <i>Allow grids of
over a million cells</i> to insist. <b>Device</b>: auto (a GPU when there is one), cpu or cuda.
Cancelling leaves no partial files.</p>
<h3>Embed once, query many</h3>
<p><b>Embedding raster</b> (optional): an embedding raster of this imagery made by <i>Embed area</i>; its
cells are compared without encoding them again (its grid, cell size and model are used).
<b>Keep embeddings</b> (optional): also write the embeddings computed on the way, for later searches,
<i>Find similar cells</i> and <i>Compare regions</i>.</p>
<h3>Advanced parameters</h3>
<p><b>Max. nodata share of a cell</b>: cells with more nodata are skipped (default 0.5). <b>Band</b>: the
raster band to use (empty: the luminance of RGB, or band 1). <b>Reference resolution (m/pixel)</b>: the
ground resolution of references that are not georeferenced (plain PNG/JPEG), so the default cell size can
match them. <b>Several references: compare with</b> the nearest one, or their mean. <b>Inference
runtime</b>: auto (ONNX Runtime when it is installed and the model has an .onnx file, else torch),
ONNX Runtime or torch. <b>Dask scheduler</b>: empty runs on this computer; <i>local:N</i> starts N
worker processes here, <i>tcp://HOST:PORT</i> or a scheduler file uses a Dask cluster that can read
the imagery.</p>"""

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(self.INPUT, self.tr("Earth imagery")))
        self.addParameter(QgsProcessingParameterFeatureSource(
            self.AREA, self.tr("Search area"),
            [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(ReferenceImagesParameter(
            self.REFERENCE, self.tr("Mars reference image(s)"), QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.EMBEDDINGS, self.tr("Embedding raster"), optional=True))
        cell = QgsProcessingParameterDistance(self.CELL_SIZE, self.tr("Cell size (m)"),
                                              defaultValue=None, optional=True, minValue=0.0)
        cell.setDefaultUnit(QgsUnitTypes.DistanceMeters)
        self.addParameter(cell)
        self.addParameter(self._grid_parameter(self.STRIDE))
        self.addParameter(self._grid_parameter(self.MIN_COVERAGE))
        self.addParameter(self._model_parameter(self.MODEL, self.tr("Model file")))
        self.addParameter(device_parameter(self.DEVICE, self.tr("Device")))
        advanced = [
            self._grid_parameter(self.BATCH_SIZE),
            self._grid_parameter(self.MAX_NODATA),
            self._grid_parameter(self.BAND),
            QgsProcessingParameterNumber(self.REFERENCE_RESOLUTION,
                                         self.tr("Reference resolution (m/pixel)"),
                                         QgsProcessingParameterNumber.Double, None, optional=True, minValue=0.0),
            QgsProcessingParameterEnum(self.AGGREGATE, self.tr("Several references: compare with"),
                                       [self.tr("the nearest reference"), self.tr("their mean")], defaultValue=0),
            QgsProcessingParameterNumber(self.TOP_K, self.tr("Number of best sites to list"),
                                         QgsProcessingParameterNumber.Integer, 10, minValue=1, maxValue=10000),
            self._grid_parameter(self.ALLOW_LARGE),
            self._runtime_parameter(self.RUNTIME),
            QgsProcessingParameterString(
                self.SCHEDULER, self.tr("Dask scheduler"), defaultValue="", optional=True),
        ]
        self._add_advanced(advanced)
        self.addParameter(QgsProcessingParameterRasterDestination(
            self.OUTPUT_RASTER, self.tr("Dissimilarity raster (low = more Mars-like)")))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_CELLS, self.tr("Analog cells"), QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_REPORT, self.tr("Report (HTML)"), self.tr("HTML files (*.html)"), optional=True,
            createByDefault=False))
        keep = QgsProcessingParameterRasterDestination(
            self.KEEP_EMBEDDINGS, self.tr("Keep embeddings"),
            optional=True, createByDefault=False)
        keep.setFlags(keep.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        self.addParameter(keep)
        self.addOutput(QgsProcessingOutputVectorLayer(self.OUTPUT_SITES, self.tr("Top analog sites"),
                                                      QgsProcessing.TypeVectorPoint))
        self.addOutput(QgsProcessingOutputNumber(self.CELL_COUNT, self.tr("Number of cells")))
        self.addOutput(QgsProcessingOutputNumber(self.SCORED_COUNT, self.tr("Number of cells scored")))
        self.addOutput(QgsProcessingOutputNumber(self.CELLS_PER_SECOND, self.tr("Throughput (cells per second)")))
        self.addOutput(QgsProcessingOutputNumber(self.BEST_DISSIMILARITY, self.tr("Lowest dissimilarity")))
        self.addOutput(QgsProcessingOutputString(self.DEVICE_USED, self.tr("Device used")))

    def hasHtmlOutputs(self) -> bool:
        """The report is optional: without this, the dialog says "HTML output has been generated"
        after every run, failed ones included (the report's path is logged when there is one)."""
        return False

    # -- main thread ---------------------------------------------------------------------
    def checkParameterValues(self, parameters, context):
        """Name a missing reference file plainly (QGIS alone says "incorrect parameter value")."""
        values = parameters.get(self.REFERENCE)
        values = values if isinstance(values, (list, tuple)) else [values] if values else []
        project = context.project() if context is not None else None
        for value in values:
            if not isinstance(value, str) or not value or os.path.exists(value):
                continue
            if project is not None and (project.mapLayer(value) or project.mapLayersByName(value)):
                continue
            if "://" in value or value.startswith("/vsi"):
                continue
            return False, (f"The reference image '{value}' does not exist. Check the path, or choose a PNG, JPEG "
                           "or GeoTIFF of the Mars terrain to match.")
        problem = self._model_file_problem(parameters.get(self.MODEL))
        if problem:
            return False, problem
        if values and all(isinstance(v, str) and os.path.isfile(v) for v in values):
            # QGIS's own check resolves each string as a map layer, trying OGR first ("[OGR] Cannot
            # open <reference>.tif" in the log on every run): hand it the files as raster layers.
            # Those layers compute statistics for their renderer, which GDAL would save beside the
            # user's file (<reference>.aux.xml): inputs are never touched, so no PAM file while they live.
            from osgeo import gdal
            from qgis.core import QgsRasterLayer

            before = gdal.GetThreadLocalConfigOption("GDAL_PAM_ENABLED", None)
            gdal.SetThreadLocalConfigOption("GDAL_PAM_ENABLED", "NO")
            try:
                checked = dict(parameters)
                checked[self.REFERENCE] = [QgsRasterLayer(v, os.path.basename(v), "gdal") for v in values]
                answer = super().checkParameterValues(checked, context)
                del checked  # the layers close their files here, while PAM is off
                return answer
            finally:
                gdal.SetThreadLocalConfigOption("GDAL_PAM_ENABLED", before)
        return super().checkParameterValues(parameters, context)

    def prepareAlgorithm(self, parameters, context, feedback) -> bool:
        """Resolve layers to files on the main thread (QGIS layers belong to it)."""
        layer = self._imagery_layer(parameters, context)
        self._raster_name = layer.name()
        self._raster_path = gdal_path(layer)
        self._rendered = None if self._raster_path else RenderedRasterSource(layer)
        self._references = reference_paths(self._reference_layers(parameters, context))
        self._remember = {key: parameters.get(key) for key in (self.CELL_SIZE, self.STRIDE, self.MIN_COVERAGE,
                                                               self.MODEL, self.DEVICE, self.BATCH_SIZE)}
        self._remember[self.REFERENCE] = list(self._references)
        from .embed_area import embeddings_parameter_path

        self._embeddings = embeddings_parameter_path(self, parameters, self.EMBEDDINGS, context)
        if self._embeddings and self._raster_path is None:
            raise QgsProcessingException(f"'{layer.name()}' is a tile/web layer, but an embedding raster belongs to "
                                         "an imagery file. Choose the raster file it was made from as the imagery, "
                                         "or leave the embedding raster empty.")
        self._area_file = vector_file(self, parameters, self.AREA, context)
        return True

    def _reference_layers(self, parameters, context) -> list:
        """REFERENCE as files and raster layers. Files are taken as they are: resolving them as
        map layers (``parameterAsLayerList``) first tries OGR, which logs "[OGR] Cannot open"."""
        values = parameters.get(self.REFERENCE)
        values = values if isinstance(values, (list, tuple)) else [values] if values else []
        if all(isinstance(v, str) and os.path.isfile(v) for v in values):
            return list(values)
        return self.parameterAsLayerList(parameters, self.REFERENCE, context)

    def postProcessAlgorithm(self, context, feedback):
        """On the main thread after a successful run: remember the reference and settings for
        the next search (the drawing tool and the dialog start from them), whoever started it."""
        try:
            from ..gui.settings import save_last_used

            save_last_used({k: v for k, v in getattr(self, "_remember", {}).items() if v is not None})
        except Exception as exc:  # remembering is a convenience, never a failure
            feedback.pushInfo(f"(The settings could not be remembered: {exc})")
        return {}

    # -- worker thread -------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback):
        self.check_dependencies()
        out_raster = self.parameterAsOutputLayer(parameters, self.OUTPUT_RASTER, context)
        out_cells = self.parameterAsOutputLayer(parameters, self.OUTPUT_CELLS, context)
        out_report = self.parameterAsFileOutput(parameters, self.OUTPUT_REPORT, context) or None
        self._check_raster_and_cells(out_raster, out_cells, "dissimilarity raster", "analog cells")
        keep = self.parameterAsOutputLayer(parameters, self.KEEP_EMBEDDINGS, context) or None
        if keep and not keep.lower().endswith((".tif", ".tiff")):
            raise QgsProcessingException(f"The embeddings are kept as a GeoTIFF, but '{keep}' is not a .tif file. "
                                         "Give a file name ending in .tif.")
        adapter = ProcessingFeedbackAdapter(feedback, 0.0, 95.0 if out_report else 100.0)
        work_dir = None
        with engine_errors("The search"):
            from ..engine.outputs import check_destination
            from ..engine.runtime import load_runtime
            from ..engine.safety import check_outputs
            from ..engine.search import SearchParams, run_search

            # Before anything is read: an output that is an input (or another output) is refused.
            check_outputs({"dissimilarity raster": out_raster, "analog cells": out_cells, "report": out_report,
                           "kept embeddings": keep},
                          {"Earth imagery": self._raster_path, "reference": self._references,
                           "area": self._area_file, "embedding raster": self._embeddings})
            if out_report:
                check_destination(out_report, "report")
            area = area_from_source(self.parameterAsSource(parameters, self.AREA, context), feedback)
            cell = self._optional_number(parameters, self.CELL_SIZE, context)
            reference_res = self._optional_number(parameters, self.REFERENCE_RESOLUTION, context)
            model = self.parameterAsFile(parameters, self.MODEL, context) or None
            device = device_value(self, parameters, self.DEVICE, context)
            # An embedding raster names its own model: load it there unless one is given.
            runtime = self._runtime(parameters, context, self.RUNTIME)
            encoder = None if self._embeddings and not model else load_runtime(model, runtime, device)
            try:
                raster = self._raster_path
                if raster is None:
                    cell = cell or self._cell_from_references(encoder.input_size, reference_res)
                    work_dir = tempfile.mkdtemp(prefix="siamese_analog_")
                    raster = self._rendered.render(os.path.join(work_dir, "imagery.tif"), area, cell,
                                                   encoder.input_size, feedback)
                params = SearchParams(
                    raster=raster, references=self._references, area=area, cell_size_m=cell,
                    stride_m=self._optional_number(parameters, self.STRIDE, context),
                    min_coverage=self.parameterAsDouble(parameters, self.MIN_COVERAGE, context),
                    max_nodata=self.parameterAsDouble(parameters, self.MAX_NODATA, context),
                    band=self._optional_int(parameters, self.BAND, context),
                    reference_resolution_m=reference_res, model=model, device=device,
                    batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                    aggregate=AGGREGATE_OPTIONS[self.parameterAsEnum(parameters, self.AGGREGATE, context)],
                    force=self.parameterAsBool(parameters, self.ALLOW_LARGE, context),
                    top_k=self.parameterAsInt(parameters, self.TOP_K, context),
                    embeddings=self._embeddings, keep_embeddings=keep, runtime=runtime,
                    scheduler=(self.parameterAsString(parameters, self.SCHEDULER, context) or "").strip() or None)
                also = None
                if out_report:
                    from .report import report_html

                    def _write_report(result, tmp: str) -> None:
                        feedback.setProgressText("Writing the report")
                        text = report_html(result, raster, top=params.top_k, raster_label=self._raster_name,
                                           warnings=[line[len("Warning: "):] for line in adapter.logs
                                                     if line.startswith("Warning: ")])
                        with open(tmp, "w", encoding="utf-8") as fh:
                            fh.write(text)
                        feedback.setProgress(100)

                    # The report is moved into place with the raster and the cells, as one set.
                    also = {"report": (out_report, _write_report)}
                result = run_search(params, out_raster, out_cells, adapter, encoder=encoder, also_write=also)
            finally:
                if work_dir:
                    shutil.rmtree(work_dir, ignore_errors=True)

        n, scored = len(result.grid), int(result.scored.sum())
        feedback.pushInfo(f"Device used: {result.device}. Cells: {n:,} ({scored:,} scored) of "
                          f"{result.grid.cell_size_m:g} m. Throughput: {result.cells_per_s:,.0f} cells/s "
                          f"({result.seconds:.1f} s).")
        best = result.best(min(5, params.top_k))
        if best:
            feedback.pushInfo("Most Mars-like cells: " + "; ".join(
                f"#{s['rank']} id {s['id']} at lon {s['lon']:.4f}, lat {s['lat']:.4f} (dissimilarity "
                f"{s['dissimilarity']:.4f})" for s in best))
        sites = f"{out_cells}|layername=analog_sites"
        self._style_on_load(context, out_raster, out_cells, sites)
        from .embed_area import EmbeddingsStyler, tag_layers_with_embeddings

        tag_layers_with_embeddings(context, [out_raster, out_cells], self._embeddings or keep)
        if keep and context.willLoadLayerOnCompletion(keep):
            context.layerToLoadOnCompletionDetails(keep).setPostProcessor(EmbeddingsStyler.create())
        results = {
            self.OUTPUT_RASTER: out_raster, self.OUTPUT_CELLS: out_cells, self.OUTPUT_SITES: sites,
            self.CELL_COUNT: n, self.SCORED_COUNT: scored, self.CELLS_PER_SECOND: result.cells_per_s,
            self.BEST_DISSIMILARITY: best[0]["dissimilarity"] if best else None, self.DEVICE_USED: result.device,
        }
        if out_report:
            results[self.OUTPUT_REPORT] = out_report
        if keep:
            results[self.KEEP_EMBEDDINGS] = keep
        return results

    # -- helpers ---------------------------------------------------------------------------
    def _cell_from_references(self, input_size: int, reference_res: float | None) -> float:
        """The cell size for a rendered (tile) layer when none was given: the references' ground size."""
        import numpy as np

        from ..engine.imagery import load_references

        refs = load_references(self._references, input_size, reference_res)
        grounds = [r.ground_size_m for r in refs if r.ground_size_m]
        if not grounds:
            raise QgsProcessingException(
                f"'{self._raster_name}' is a tile/web layer, so the cell size cannot default to 100 raster pixels, "
                "and the Mars reference is not georeferenced. Give a cell size in metres (e.g. the ground size of "
                "the reference image), or the reference's metres per pixel.")
        return float(np.median(grounds))

    def _style_on_load(self, context: QgsProcessingContext, out_raster: str, out_cells: str, sites: str) -> None:
        """Attach stylers to the outputs QGIS will load, and load the top sites beside the cells."""
        import uuid

        run = uuid.uuid4().hex  # the stylers put this run's layers together, in a fixed order
        if context.willLoadLayerOnCompletion(out_raster):
            context.layerToLoadOnCompletionDetails(out_raster).setPostProcessor(ResultStyler.create("raster", run))
        if context.willLoadLayerOnCompletion(out_cells):
            details = context.layerToLoadOnCompletionDetails(out_cells)
            details.setPostProcessor(ResultStyler.create("cells", run))
            from ..styles import SITES_LAYER_NAME

            context.addLayerToLoadOnCompletion(sites, QgsProcessingContext.LayerDetails(
                SITES_LAYER_NAME, details.project, self.OUTPUT_SITES, QgsProcessingUtils.LayerHint.Vector))
            context.layerToLoadOnCompletionDetails(sites).setPostProcessor(ResultStyler.create("sites", run))

