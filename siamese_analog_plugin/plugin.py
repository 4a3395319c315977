"""QGIS glue: registers the Processing provider, the toolbar and menu, and the map tool.

The plugin loads even when the inference runtime (onnxruntime or torch) or another package is
missing: the algorithms stay listed (and refuse to run with the install command), and the message
bar says what to install.
"""

from __future__ import annotations

from qgis.core import Qgis, QgsApplication, QgsMessageLog

from .processing.base import install_hint, missing_dependencies

__all__ = ["MENU", "TOOLBAR", "LOG_TAG", "SiameseAnalogPlugin"]

MENU = "&Siamese Analog Finder"
TOOLBAR = "Siamese Analog Finder"
LOG_TAG = "Siamese Analog Finder"
GUI_MODULE = f"{__package__}.gui.actions"


def installer_packages(missing: list[str]) -> list[str]:
    """What the installer offers for ``missing`` (from ``missing_dependencies()``): "torch" there
    means no encoder runtime at all, and ONNX Runtime (~80 MB, no training) is the one to get."""
    from .dependencies import PACKAGES

    names = ["onnxruntime" if name == "torch" else name for name in missing]
    return [name for name in dict.fromkeys(names) if name in PACKAGES]


class SiameseAnalogPlugin:
    """The object QGIS gets from ``classFactory``.

    Attributes:
        iface: the QGIS interface.
        provider: the Processing provider while loaded.
        toolbar: the plugin's toolbar while loaded (the map tool adds its actions to it).
        gui: the map-canvas face (``gui.actions.AnalogGui``) when that module is installed.
        missing: pip names of missing dependencies found at load time.
    """

    MENU = MENU

    def __init__(self, iface) -> None:
        self.iface = iface
        self.provider = None
        self.toolbar = None
        self.gui = None
        self.missing: list[str] = []
        self.install_message = None
        self.install_action = None
        self.installer_dialog = None
        try:  # packages the plugin's installer put in its own folder (end of sys.path)
            from .gui.installer import activate_plugin_deps

            activate_plugin_deps()
        except ImportError:
            pass

    # -- QGIS plugin API -------------------------------------------------------------------
    def initProcessing(self) -> None:
        """Register the provider (QGIS calls this for ``hasProcessingProvider=yes`` plugins)."""
        if self.provider is not None:
            return
        from .processing.provider import SiameseAnalogProvider

        provider = SiameseAnalogProvider()
        if QgsApplication.processingRegistry().addProvider(provider):
            self.provider = provider
            # Reload once registered: the example model's steps can only find our algorithms
            # (and so declare their outputs) when the provider is in the registry.
            provider.refreshAlgorithms()
        else:  # a provider with our id is already there (a second copy of the plugin)
            QgsMessageLog.logMessage("The Processing provider 'siameseanalog' is already registered; "
                                     "is the plugin installed twice?", LOG_TAG, Qgis.MessageLevel.Warning)

    def initGui(self) -> None:
        self.initProcessing()
        self.toolbar = self.iface.addToolBar(TOOLBAR)
        self.toolbar.setObjectName("SiameseAnalogFinderToolbar")
        self._report_missing_dependencies()
        from qgis.PyQt.QtWidgets import QAction

        self.install_action = QAction("Install Python Packages…", self.iface.mainWindow())
        self.install_action.setObjectName("siameseAnalogInstallPackages")
        self.install_action.setToolTip("Install onnxruntime (searches) or torch (training) into the plugin's folder")
        self.install_action.triggered.connect(lambda _checked=False: self.open_installer())
        self.iface.addPluginToMenu(MENU, self.install_action)
        try:
            from .gui.actions import AnalogGui
        except ModuleNotFoundError as exc:
            if exc.name != GUI_MODULE:
                raise
            AnalogGui = None  # noqa: N806 - the map tool is not installed in this build
        if AnalogGui is not None:
            self.gui = AnalogGui(self.iface, self)
            self.gui.initGui()

    def unload(self) -> None:
        if self.install_action is not None:
            self.iface.removePluginMenu(MENU, self.install_action)
            self.install_action.deleteLater()
            self.install_action = None
        if self.gui is not None:
            try:
                self.gui.unload()
            finally:
                self.gui = None
        if self.toolbar is not None:
            main = self.iface.mainWindow() if self.iface is not None else None
            if main is not None and hasattr(main, "removeToolBar"):
                main.removeToolBar(self.toolbar)
            self.toolbar.hide()
            self.toolbar.setParent(None)
            self.toolbar.deleteLater()
            self.toolbar = None
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None

    # -- helpers ---------------------------------------------------------------------------
    def _report_missing_dependencies(self) -> None:
        self.missing = missing_dependencies()
        if not self.missing:
            return
        hint = install_hint(self.missing)
        QgsMessageLog.logMessage(hint, LOG_TAG, Qgis.MessageLevel.Warning)

        installable = installer_packages(self.missing)
        if installable and self.iface is not None:
            from .gui.installer import offer_install

            names = ", ".join(installable)
            self.install_message = offer_install(
                self.iface, installable, f"needs {names} to run its encoder; QGIS's Python lacks it.",
                on_installed=self._installed)
            if self.install_message is not None:
                return
        bar = self.iface.messageBar() if self.iface is not None else None
        if bar is not None:
            bar.pushMessage(LOG_TAG, hint, level=Qgis.MessageLevel.Warning, duration=0)

    def open_installer(self, names: list[str] | None = None):
        """Open the dependency installer for ``names`` (default: what is missing, else onnxruntime
        and torch); returns the dialog."""
        from .dependencies import PACKAGES, missing_packages
        from .gui.installer import DependencyInstallerDialog

        if names is None:
            names = installer_packages(missing_dependencies()) or missing_packages(list(PACKAGES)) \
                or ["onnxruntime"]
        self.installer_dialog = DependencyInstallerDialog(names, parent=self.iface.mainWindow())
        self.installer_dialog.installed.connect(self._installed)
        self.installer_dialog.show()
        return self.installer_dialog

    def _installed(self, ok: bool) -> None:
        """After the installer: the algorithms check their dependencies again when run."""
        if ok:
            self.missing = missing_dependencies()
