"""What every Siamese Analog Finder algorithm shares: ids, translation, help, errors, feedback.

Algorithms are thin adapters: they read parameters, call the engine in ``core`` and turn its
errors into :class:`QgsProcessingException`. The engine is imported lazily (inside
``processAlgorithm``) so the toolbox still lists the algorithms when torch or another
dependency is missing; ``canExecute`` then says what to install.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from pathlib import Path

from qgis.core import (
    QgsProcessingAlgorithm,
    QgsProcessingException,
    QgsProcessingFeedback,
    QgsProcessingLayerPostProcessorInterface,
    QgsProcessingParameterDefinition,
    QgsProcessingParameterEnum,
    QgsProcessingParameterFile,
)
from qgis.PyQt.QtCore import QCoreApplication
from qgis.PyQt.QtGui import QIcon

from ..engine.errors import AnalogFinderError, SearchCancelled
from ..engine.feedback import Feedback

__all__ = [
    "DEPENDENCIES",
    "AnalogAlgorithm",
    "KeptAlivePostProcessor",
    "ProcessingFeedbackAdapter",
    "engine_errors",
    "missing_dependencies",
    "install_hint",
    "plugin_icon",
    "resource_path",
]

# module -> pip package. numpy/rasterio/shapely/pyproj/osgeo come with QGIS on most installs.
# The encoder runs on ONNX Runtime (~80 MB) or on torch (~750 MB; training needs it): either will do.
DEPENDENCIES = {
    "torch": "torch",
    "numpy": "numpy",
    "rasterio": "rasterio",
    "shapely": "shapely",
    "pyproj": "pyproj",
    "matplotlib": "matplotlib",
}
RUNTIME_ALTERNATIVES = {"torch": "onnxruntime"}  # a module missing that another stands in for
TRAINING_DEPENDENCIES = {"torch": "torch"}
RUNTIME_CHOICES = ("auto", "onnx", "torch")
HELP_URL = "https://github.com/siamese-analog-finder/siamese-analog-finder#readme"
PLUGIN_DIR = Path(__file__).resolve().parent.parent


def _found(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None  # None: a blocked import behaves as not installed
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_dependencies(modules: dict[str, str] | None = None) -> list[str]:
    """The pip names of required modules that cannot be imported (without importing them).

    With the default modules, torch counts as present when ONNX Runtime is (it runs every
    search, embedding and map); training asks for :data:`TRAINING_DEPENDENCIES` itself.
    """
    missing = []
    for module, package in (modules or DEPENDENCIES).items():
        if _found(module):
            continue
        if modules is None and module in RUNTIME_ALTERNATIVES and _found(RUNTIME_ALTERNATIVES[module]):
            continue
        missing.append(package)
    return missing


def install_hint(packages: list[str]) -> str:
    """A sentence telling exactly what to install, for messages and logs.

    ``pip install`` into QGIS's own Python is refused on Debian/Ubuntu (PEP 668) and may replace
    QGIS's numpy; the command given installs into the plugin's own folder instead.
    """
    from qgis.core import QgsApplication

    from .. import dependencies

    target = dependencies.deps_dir(QgsApplication.qgisSettingsDirPath())
    hint = (f"Siamese Analog Finder needs the Python package(s) {', '.join(packages)}, which are not installed "
            "in QGIS's Python. Click Install… in the message bar (Plugins > Siamese Analog Finder > Install "
            "Python Packages…), or install into the plugin's folder by hand")
    known = [p for p in packages if p in dependencies.PACKAGES]
    if known:
        hint += ": " + dependencies.manual_command(known, target)
    else:
        hint += f": python3 -m pip install --target \"{target}\" {' '.join(packages)}"
    if "torch" in packages and "onnxruntime" not in packages:
        hint += ("; to search and map without training, ONNX Runtime (much smaller) is enough: "
                 + dependencies.manual_command(["onnxruntime"], target))
    hint += (". Debian/Ubuntu: sudo apt install python3-torch also works. Windows: run it in the OSGeo4W Shell. "
             "See the README (Install) for each platform.")
    return hint


def resource_path(*parts: str) -> Path:
    """A file under ``resources/``: inside the installed plugin, else in the source checkout."""
    for base in (PLUGIN_DIR / "resources", PLUGIN_DIR.parent / "resources"):
        candidate = base.joinpath(*parts)
        if candidate.exists():
            return candidate
    return PLUGIN_DIR.joinpath("resources", *parts)


def plugin_icon() -> QIcon:
    """The plugin's icon (empty icon when the file is missing)."""
    path = resource_path("icon.svg")
    return QIcon(str(path)) if path.exists() else QIcon()



class KeptAlivePostProcessor(QgsProcessingLayerPostProcessorInterface):
    """Base of the post-processors that style loaded results (on the main thread).

    QGIS keeps only a raw pointer to a post-processor, so an instance collected by Python
    crashes or silently does nothing: :meth:`create` keeps every instance alive here, trimmed
    to the latest 256 so a long session does not grow the list without bound.
    """

    _alive: list = []

    @classmethod
    def create(cls, *args):
        """Make a post-processor that outlives the Python call that asked for it."""
        instance = cls(*args)
        KeptAlivePostProcessor._alive.append(instance)
        del KeptAlivePostProcessor._alive[:-256]
        return instance

class ProcessingFeedbackAdapter(Feedback):
    """Engine :class:`~..core.feedback.Feedback` over a ``QgsProcessingFeedback``.

    Progress goes to the progress bar (and, a line per 10 %, to the log); log lines go to
    ``pushInfo``; cancelling the dialog stops the engine at its next batch.

    Args:
        feedback: the Processing feedback (may be ``None``: silent, never cancelled).
        start, end: the share of the progress bar this engine call fills (0..100).
    """

    def __init__(self, feedback: QgsProcessingFeedback | None, start: float = 0.0, end: float = 100.0) -> None:
        self.feedback = feedback
        self.start = start
        self.end = end
        self._last_tenth = -1
        self.logs: list[str] = []

    def progress(self, fraction: float, message: str = "") -> None:
        if self.feedback is None:
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        self.feedback.setProgress(self.start + (self.end - self.start) * fraction)
        tenth = int(fraction * 10)
        if message and tenth != self._last_tenth:
            self._last_tenth = tenth
            self.feedback.setProgressText(message)

    def log(self, message: str) -> None:
        self.logs.append(message)
        if self.feedback is not None:
            if message.startswith("Warning: "):
                self.feedback.pushWarning(message)
            else:
                self.feedback.pushInfo(message)

    def cancelled(self) -> bool:
        return self.feedback is not None and self.feedback.isCanceled()


def vector_file(algorithm, parameters, name: str, context) -> str | None:
    """The file behind a vector layer parameter (an OGR layer), for the check that no output is
    an input; ``None`` for memory layers and the like. Main thread (``prepareAlgorithm``)."""
    layer = algorithm.parameterAsVectorLayer(parameters, name, context)
    if layer is None or layer.providerType() != "ogr":
        return None
    return layer.source().split("|")[0]


@contextlib.contextmanager
def engine_errors(what: str = "The algorithm"):
    """Turn engine errors into ``QgsProcessingException`` with the engine's own message.

    ``AnalogFinderError`` messages already name the problem and the fix; a cancel becomes a
    clear "cancelled, nothing written"; anything else is reported as a bug-like failure with
    its text rather than a bare traceback.
    """
    try:
        yield
    except QgsProcessingException:
        raise
    except SearchCancelled as exc:
        raise QgsProcessingException(f"{what} was cancelled. Nothing was written.") from exc
    except AnalogFinderError as exc:
        raise QgsProcessingException(str(exc)) from exc
    except MemoryError as exc:
        raise QgsProcessingException(f"{what} ran out of memory. Use a smaller batch size, a larger cell size "
                                     "or a smaller area.") from exc
    except ImportError as exc:
        missing = [exc.name] if getattr(exc, "name", None) else missing_dependencies()
        raise QgsProcessingException(install_hint(missing or ["torch"])) from exc


def join_help_lines(html: str) -> str:
    """One line per paragraph: the help panel shows the source's line breaks inside sentences."""
    return " ".join(line.strip() for line in html.splitlines() if line.strip())


DEVICE_CHOICES = ("auto", "cpu", "cuda")


def device_parameter(name: str, description: str = "Device"):
    """A choice of device (auto: a GPU when there is one), stored as its name ("auto", "cpu",
    "cuda"), so remembered settings and scripts keep passing strings."""
    from qgis.core import QgsProcessingParameterEnum

    param = QgsProcessingParameterEnum(name, description, list(DEVICE_CHOICES), defaultValue="auto",
                                       usesStaticStrings=True)
    param.setHelp("auto: the GPU when there is one, else the CPU")
    return param


def device_value(algorithm: QgsProcessingAlgorithm, parameters, name: str, context) -> str:
    """The chosen device name ("auto" when not set)."""
    return (algorithm.parameterAsEnumString(parameters, name, context) or "auto").strip()


class AnalogAlgorithm(QgsProcessingAlgorithm):
    """Base class: subclasses set ``ALG_ID``, ``DISPLAY_NAME``, ``HELP`` and implement the rest."""

    ALG_ID = ""
    DISPLAY_NAME = ""
    SHORT_DESCRIPTION = ""
    HELP = ""
    GROUP = "Mars analogs"
    GROUP_ID = "marsanalogs"

    def tr(self, text: str) -> str:
        return QCoreApplication.translate(type(self).__name__, text)

    def createInstance(self) -> AnalogAlgorithm:
        return type(self)()

    def name(self) -> str:
        return self.ALG_ID

    def displayName(self) -> str:
        return self.tr(self.DISPLAY_NAME)

    def group(self) -> str:
        return self.tr(self.GROUP)

    def groupId(self) -> str:
        return self.GROUP_ID

    def shortDescription(self) -> str:
        return self.tr(self.SHORT_DESCRIPTION)

    def shortHelpString(self) -> str:
        return join_help_lines(self.tr(self.HELP))

    def helpUrl(self) -> str:
        return HELP_URL

    def icon(self) -> QIcon:
        return plugin_icon()

    def canExecute(self):
        """Refuse to run (with the install command) when a required package is missing."""
        missing = missing_dependencies()
        if missing:
            return False, install_hint(missing)
        return True, ""

    def _imagery_layer(self, parameters, context, what: str = "The Earth imagery layer",
                       hint: str = "Choose a raster layer that draws on the map."):
        """The algorithm's INPUT raster layer, or a one-line error naming it when it is missing or unreadable."""
        layer = self.parameterAsRasterLayer(parameters, self.INPUT, context)
        if layer is None or not layer.isValid():
            raise QgsProcessingException(f"{what} is missing or cannot be read. {hint}")
        return layer

    def _model_parameter(self, name: str, description: str) -> QgsProcessingParameterFile:
        """The optional model file: ``.onnx`` (ONNX Runtime) or ``.pt`` (torch)."""
        return QgsProcessingParameterFile(name, description, optional=True,
                                          fileFilter=self.tr("Model files (*.onnx *.pt)"))

    def _grid_parameter(self, name: str, label: str | None = None):
        """The one definition of a grid or encoder parameter every algorithm shares (STRIDE,
        MIN_COVERAGE, MAX_NODATA, BAND, BATCH_SIZE, ALLOW_LARGE): same type, default, range and short
        label (``label`` replaces the label where the algorithm words it for itself)."""
        from qgis.core import (
            QgsProcessingParameterBoolean,
            QgsProcessingParameterDistance,
            QgsProcessingParameterNumber,
            QgsUnitTypes,
        )

        number, double, integer = QgsProcessingParameterNumber, QgsProcessingParameterNumber.Double, \
            QgsProcessingParameterNumber.Integer
        if name == "STRIDE":
            param = QgsProcessingParameterDistance(name, self.tr(label or "Stride (m)"), defaultValue=None,
                                                   optional=True, minValue=0.0)
            param.setDefaultUnit(QgsUnitTypes.DistanceMeters)
            return param
        if name == "ALLOW_LARGE":
            return QgsProcessingParameterBoolean(name, self.tr(label or "Allow grids of over a million cells"),
                                                 defaultValue=False)
        args = {"MIN_COVERAGE": ("Min. cell share inside area", double, 0.5, {"minValue": 0.01, "maxValue": 1.0}),
                "MAX_NODATA": ("Max. nodata share of a cell", double, 0.5, {"minValue": 0.0, "maxValue": 0.99}),
                "BAND": ("Band", integer, None, {"optional": True, "minValue": 1}),
                "BATCH_SIZE": ("Cells encoded together (batch size)", integer, 128,
                               {"minValue": 1, "maxValue": 65536})}[name]
        return number(name, self.tr(label or args[0]), args[1], args[2], **args[3])

    def _add_advanced(self, params) -> None:
        """Add parameters under the dialog's *Advanced parameters*."""
        for param in params:
            param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
            self.addParameter(param)

    def _runtime_parameter(self, name: str = "RUNTIME") -> QgsProcessingParameterEnum:
        """The inference runtime (advanced): auto (ONNX Runtime when it is installed and the model has an
        .onnx file, else torch), ONNX Runtime or torch. Short choices: a long one widens the dialog
        past its default size, hiding the reference's "..." button."""
        param = QgsProcessingParameterEnum(
            name, self.tr("Inference runtime"),
            [self.tr("auto"), self.tr("ONNX Runtime"), self.tr("torch")], defaultValue=0)
        param.setFlags(param.flags() | QgsProcessingParameterDefinition.FlagAdvanced)
        return param

    def _runtime(self, parameters, context, name: str = "RUNTIME") -> str:
        """The runtime chosen (``auto`` when the parameter is absent, e.g. in older models)."""
        if parameters.get(name) is None:
            return "auto"
        return RUNTIME_CHOICES[self.parameterAsEnum(parameters, name, context)]

    @staticmethod
    def _model_file_problem(model) -> str | None:
        """Why a model path cannot be a model file (``None``: it can)."""
        if isinstance(model, str) and model and not model.lower().endswith((".pt", ".onnx")):
            return (f"The model '{model}' is not a model file (.onnx or .pt). Give a model written by 'Train "
                    "Siamese encoder' (or export-onnx), or leave the model empty to use the shipped one.")
        return None

    def check_dependencies(self) -> None:
        """Raise the install hint as a ``QgsProcessingException`` (``processing.run`` skips ``canExecute``)."""
        ok, message = self.canExecute()
        if not ok:
            raise QgsProcessingException(message)

    # -- parameter helpers shared by the algorithms -------------------------------------------
    def _optional_number(self, parameters, name: str, context, integer: bool = False) -> float | int | None:
        """A number (``integer``: an int) parameter that may be left empty (``None``; 0 also
        means "not given")."""
        value = parameters.get(name)
        if value is None or value == "":
            return None
        read = self.parameterAsInt if integer else self.parameterAsDouble
        number = read(parameters, name, context)
        return number if number > 0 else None

    def _optional_int(self, parameters, name: str, context) -> int | None:
        """An integer parameter that may be left empty (see :meth:`_optional_number`)."""
        return self._optional_number(parameters, name, context, integer=True)

    @staticmethod
    def _check_raster_and_cells(out_raster: str, out_cells: str, raster_what: str, cells_what: str) -> None:
        """The engine writes a GeoTIFF and a GeoPackage: refuse other extensions with a plain message."""
        if not out_raster.lower().endswith((".tif", ".tiff")):
            raise QgsProcessingException(f"The {raster_what} is written as a GeoTIFF, but '{out_raster}' is not a "
                                         ".tif file. Give a file name ending in .tif.")
        if not out_cells.lower().endswith(".gpkg"):
            raise QgsProcessingException(f"The {cells_what} are written as a GeoPackage, but '{out_cells}' is not a "
                                         ".gpkg file. Give a file name ending in .gpkg.")


class Stopwatch:
    """Seconds since creation, for log lines."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
