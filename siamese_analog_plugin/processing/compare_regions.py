"""Processing algorithm ``siameseanalog:compareregions``: Earth regions x Mars references (the paper's table)."""

from __future__ import annotations

import os
import shutil
import tempfile

from qgis.core import (
    QgsProcessing,
    QgsProcessingException,
    QgsProcessingOutputNumber,
    QgsProcessingParameterDistance,
    QgsProcessingParameterField,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterLayer,
    QgsProcessingParameterVectorDestination,
    QgsProcessingParameterVectorLayer,
    QgsProviderRegistry,
    QgsUnitTypes,
    QgsVectorFileWriter,
    QgsVectorLayer,
)

from .base import AnalogAlgorithm, ProcessingFeedbackAdapter, device_parameter, device_value, engine_errors
from .embed_area import embeddings_parameter_path
from .layers import gdal_path, reference_paths

__all__ = ["CompareRegionsAlgorithm", "regions_file"]


def regions_file(layer: QgsVectorLayer, work_dir_factory) -> tuple[str, str | None]:
    """``(path, layer name)`` GDAL can read for ``layer``: its own file for an OGR layer, else a
    GeoPackage written into ``work_dir_factory()`` (memory and database layers). Main thread."""
    if layer.providerType() == "ogr":
        parts = QgsProviderRegistry.instance().decodeUri("ogr", layer.source())
        path = parts.get("path")
        if path and os.path.exists(path) and not parts.get("subset"):
            return path, parts.get("layerName") or None
    path = os.path.join(work_dir_factory(), "regions.gpkg")
    options = QgsVectorFileWriter.SaveVectorOptions()
    options.driverName = "GPKG"
    options.layerName = "regions"
    from qgis.core import QgsCoordinateTransformContext

    write = getattr(QgsVectorFileWriter, "writeAsVectorFormatV3", None) or QgsVectorFileWriter.writeAsVectorFormatV2
    result = write(layer, path, QgsCoordinateTransformContext(), options)
    error = result[0] if isinstance(result, tuple) else result
    if error != QgsVectorFileWriter.NoError:
        raise QgsProcessingException(f"The region layer '{layer.name()}' could not be copied for reading "
                                     f"({result[1] if isinstance(result, tuple) and len(result) > 1 else error}). "
                                     "Save it as a GeoPackage and run again.")
    return path, "regions"


class CompareRegionsAlgorithm(AnalogAlgorithm):
    """Every region of a polygon layer against every Mars reference: min, quartiles, best site."""

    ALG_ID = "compareregions"
    DISPLAY_NAME = "Compare regions with Mars references"
    SHORT_DESCRIPTION = ("For every Earth region and every Mars reference: the minimum, quartiles and maximum "
                         "dissimilarity of the region's cells and where its best cell is.")

    INPUT = "INPUT"
    EMBEDDINGS = "EMBEDDINGS"
    REGIONS = "REGIONS"
    NAME_FIELD = "NAME_FIELD"
    REFERENCE = "REFERENCE"
    CELL_SIZE = "CELL_SIZE"
    STRIDE = "STRIDE"
    MIN_COVERAGE = "MIN_COVERAGE"
    MAX_NODATA = "MAX_NODATA"
    BAND = "BAND"
    REFERENCE_RESOLUTION = "REFERENCE_RESOLUTION"
    MODEL = "MODEL"
    DEVICE = "DEVICE"
    RUNTIME = "RUNTIME"
    BATCH_SIZE = "BATCH_SIZE"
    ALLOW_LARGE = "ALLOW_LARGE"
    OUTPUT_CSV = "OUTPUT_CSV"
    OUTPUT_HTML = "OUTPUT_HTML"
    OUTPUT_CELLS = "OUTPUT_CELLS"
    REGION_COUNT = "REGION_COUNT"
    REFERENCE_COUNT = "REFERENCE_COUNT"

    HELP = """<p>The comparison table of the analog papers: every <b>Earth region</b> (a polygon, named by a field)
against every <b>Mars reference</b> image. For each pair: the <b>minimum</b>, <b>quartiles</b>, <b>median</b> and
<b>maximum</b> dissimilarity over the region's cells (lower = more Mars-like), the longitude/latitude of the
region's best cell and its number of cells.</p>
<h3>How to use it</h3>
<ol>
<li><b>Earth imagery</b>: a raster file covering the regions; optional when an <b>embedding raster</b> (from
<i>Embed area</i>) is given: the cells then come from it and nothing is encoded again.</li>
<li><b>Regions</b>: a polygon layer; features with the same name are one region. A cell belongs to a region
when its centre lies inside.</li>
<li><b>Mars references</b>: one column of the table each.</li>
</ol>
<h3>Outputs</h3>
<p>A <b>CSV</b> (columns region, reference, min, q1, median, q3, max, best_lon, best_lat, cells), an
<b>HTML page</b> with the heatmap of minimum dissimilarity and a box plot per region (opens in the results
viewer), and optionally the <b>cells</b> (one dissimilarity column per reference).</p>
<p><b>Cell size (m)</b>: empty = the references' ground size (or the embedding raster's own); <b>Model
file</b>: empty = the shipped encoder, or the embedding raster's.</p>
<h3>Advanced parameters</h3>
<p><b>Stride (m)</b>: distance between cells (empty: the cell size, no overlap). <b>Max. nodata share of a
cell</b>: cells with more nodata are skipped (default 0.5). <b>Band</b>: the raster band to use (empty: the
luminance of RGB, or band 1). <b>Inference runtime</b>: auto (ONNX Runtime when it is installed and the model
has an .onnx file, else torch), ONNX Runtime or torch. <b>Reference resolution (m/pixel)</b>: the ground
resolution of references that are not georeferenced.</p>"""

    def initAlgorithm(self, config=None) -> None:
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.INPUT, self.tr("Earth imagery"), optional=True))
        self.addParameter(QgsProcessingParameterRasterLayer(
            self.EMBEDDINGS, self.tr("Embedding raster"), optional=True))
        self.addParameter(QgsProcessingParameterVectorLayer(
            self.REGIONS, self.tr("Regions (polygons)"), [QgsProcessing.TypeVectorPolygon]))
        self.addParameter(QgsProcessingParameterField(
            self.NAME_FIELD, self.tr("Field with the region names"), parentLayerParameterName=self.REGIONS))
        self.addParameter(QgsProcessingParameterMultipleLayers(
            self.REFERENCE, self.tr("Mars reference image(s)"), QgsProcessing.TypeRaster))
        cell = QgsProcessingParameterDistance(self.CELL_SIZE, self.tr("Cell size (m)"),
                                              defaultValue=None, optional=True, minValue=0.0)
        cell.setDefaultUnit(QgsUnitTypes.DistanceMeters)
        self.addParameter(cell)
        self.addParameter(self._model_parameter(
            self.MODEL, self.tr("Model file")))
        advanced = [
            self._grid_parameter(self.STRIDE),
            self._grid_parameter(self.MIN_COVERAGE, "Min. cell share inside regions"),
            self._grid_parameter(self.MAX_NODATA),
            self._grid_parameter(self.BAND),
            QgsProcessingParameterNumber(self.REFERENCE_RESOLUTION,
                                         self.tr("Reference resolution (m/pixel)"),
                                         QgsProcessingParameterNumber.Double, None, optional=True, minValue=0.0),
            device_parameter(self.DEVICE, self.tr("Device")),
            self._grid_parameter(self.BATCH_SIZE),
            self._grid_parameter(self.ALLOW_LARGE),
            self._runtime_parameter(self.RUNTIME),
        ]
        self._add_advanced(advanced)
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_CSV, self.tr("Table (CSV)"), self.tr("CSV files (*.csv)")))
        self.addParameter(QgsProcessingParameterFileDestination(
            self.OUTPUT_HTML, self.tr("Report (HTML)"), self.tr("HTML files (*.html)"),
            optional=True))
        self.addParameter(QgsProcessingParameterVectorDestination(
            self.OUTPUT_CELLS, self.tr("Cell layer"),
            QgsProcessing.TypeVectorPolygon, optional=True, createByDefault=False))
        self.addOutput(QgsProcessingOutputNumber(self.REGION_COUNT, self.tr("Number of regions")))
        self.addOutput(QgsProcessingOutputNumber(self.REFERENCE_COUNT, self.tr("Number of references")))

    # -- main thread ---------------------------------------------------------------------
    def checkParameterValues(self, parameters, context):
        """The imagery or its embeddings: one of them is needed (both are optional parameters)."""
        if all(parameters.get(k) in (None, "") for k in (self.INPUT, self.EMBEDDINGS)):
            return False, ("Give the Earth imagery (a raster file) or its embedding raster (from Embed area).")
        return super().checkParameterValues(parameters, context)

    def prepareAlgorithm(self, parameters, context, feedback) -> bool:
        """Resolve the layers to files on the main thread (QGIS layers belong to it)."""
        self._work_dir = None
        self._embeddings = embeddings_parameter_path(self, parameters, self.EMBEDDINGS, context)
        self._raster_path = None
        if parameters.get(self.INPUT) not in (None, ""):
            layer = self._imagery_layer(parameters, context, hint="Choose a raster file layer.")
            self._raster_path = gdal_path(layer)
            if self._raster_path is None:
                raise QgsProcessingException(f"'{layer.name()}' is not a raster file (provider "
                                             f"'{layer.providerType()}'). Save it as a GeoTIFF first, or give its "
                                             "embedding raster.")
        regions = self.parameterAsVectorLayer(parameters, self.REGIONS, context)
        if regions is None or not regions.isValid():
            raise QgsProcessingException("The region layer is missing or cannot be read. Choose a polygon layer.")
        self._regions, self._regions_layer = regions_file(regions, self._make_work_dir)
        self._references = reference_paths(self.parameterAsLayerList(parameters, self.REFERENCE, context))
        return True

    def _make_work_dir(self) -> str:
        if self._work_dir is None:
            self._work_dir = tempfile.mkdtemp(prefix="siamese_regions_")
        return self._work_dir

    # -- worker thread -------------------------------------------------------------------
    def processAlgorithm(self, parameters, context, feedback):
        self.check_dependencies()
        out_csv = self.parameterAsFileOutput(parameters, self.OUTPUT_CSV, context)
        out_html = self.parameterAsFileOutput(parameters, self.OUTPUT_HTML, context) or None
        out_cells = self.parameterAsOutputLayer(parameters, self.OUTPUT_CELLS, context) or None
        try:
            with engine_errors("The comparison"):
                from ..engine.compare import CompareParams, run_compare

                params = CompareParams(
                    raster=self._raster_path, regions=self._regions, regions_layer=self._regions_layer,
                    name_field=self.parameterAsString(parameters, self.NAME_FIELD, context),
                    references=self._references, embeddings=self._embeddings,
                    cell_size_m=self._optional_number(parameters, self.CELL_SIZE, context),
                    stride_m=self._optional_number(parameters, self.STRIDE, context),
                    min_coverage=self.parameterAsDouble(parameters, self.MIN_COVERAGE, context),
                    max_nodata=self.parameterAsDouble(parameters, self.MAX_NODATA, context),
                    band=self._optional_int(parameters, self.BAND, context),
                    reference_resolution_m=self._optional_number(parameters, self.REFERENCE_RESOLUTION, context),
                    model=self.parameterAsFile(parameters, self.MODEL, context) or None,
                    device=device_value(self, parameters, self.DEVICE, context),
                    batch_size=self.parameterAsInt(parameters, self.BATCH_SIZE, context),
                    force=self.parameterAsBool(parameters, self.ALLOW_LARGE, context),
                    runtime=self._runtime(parameters, context, self.RUNTIME))
                result = run_compare(params, out_csv, out_html, out_cells, ProcessingFeedbackAdapter(feedback))
        finally:
            if self._work_dir:
                shutil.rmtree(self._work_dir, ignore_errors=True)
        for region in result.regions:
            best = [r for r in result.rows if r["region"] == region and r["cells"]]
            if best:
                top = min(best, key=lambda r: r["min"])
                feedback.pushInfo(f"{region}: most Mars-like against {top['reference']} (minimum dissimilarity "
                                  f"{top['min']:.4f} at lon {top['best_lon']:.4f}, lat {top['best_lat']:.4f})")
        if out_cells and context.willLoadLayerOnCompletion(out_cells):
            from .find_analogs import ResultStyler

            context.layerToLoadOnCompletionDetails(out_cells).setPostProcessor(ResultStyler.create("cells"))
        results = {self.OUTPUT_CSV: out_csv, self.REGION_COUNT: len(result.regions),
                   self.REFERENCE_COUNT: len(result.references)}
        if out_html:
            results[self.OUTPUT_HTML] = out_html
        if out_cells:
            results[self.OUTPUT_CELLS] = out_cells
        return results
