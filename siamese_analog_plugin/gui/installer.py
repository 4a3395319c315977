"""The dependency installer: a dialog that pip-installs onnxruntime (or torch) into the plugin's
own folder, with the pip log shown live, and loads it without a restart.

The command and the folder come from :mod:`..dependencies` (no widgets there); this module
only runs it in a ``QProcess`` (the GUI stays responsive, nothing blocks the main thread).
"""

from __future__ import annotations

from pathlib import Path

from qgis.core import Qgis, QgsApplication, QgsMessageLog
from qgis.PyQt.QtCore import QProcess, QProcessEnvironment, pyqtSignal
from qgis.PyQt.QtWidgets import (
    QDialog,
    QDialogButtonBox,
    QLabel,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
)

from .. import dependencies

__all__ = ["plugin_deps_dir", "activate_plugin_deps", "DependencyInstallerDialog", "offer_install"]

LOG_TAG = "Siamese Analog Finder"


def plugin_deps_dir() -> Path:
    """``<QGIS profile>/python/siamese_analog_deps/pyXY``: the folder the installer fills."""
    return dependencies.deps_dir(QgsApplication.qgisSettingsDirPath())


def activate_plugin_deps() -> bool:
    """Put the plugin's package folder (when it exists) at the end of ``sys.path``."""
    return dependencies.activate(plugin_deps_dir())


class DependencyInstallerDialog(QDialog):
    """Installs ``names`` (keys of :data:`dependencies.PACKAGES`) into ``target``.

    Signals:
        installed(bool): emitted when pip has finished; ``True`` when the packages now import.
    """

    installed = pyqtSignal(bool)

    def __init__(self, names, target: str | Path | None = None, parent=None) -> None:
        super().__init__(parent)
        self.names = list(names)
        self.target = Path(target) if target is not None else plugin_deps_dir()
        self.plan = dependencies.plan_install(self.names, self.target)
        self.process: QProcess | None = None
        self.succeeded: bool | None = None
        self.setWindowTitle("Siamese Analog Finder: install Python packages")
        self.setObjectName("SiameseAnalogInstaller")
        self.resize(720, 420)

        parts = [f"<b>{n}</b> ({dependencies.PACKAGES[n].purpose}; {dependencies.PACKAGES[n].size})"
                 for n in self.names]
        text = (f"Siamese Analog Finder needs {', '.join(parts)}. It installs with pip into the plugin's own "
                f"folder<br><tt>{self.target}</tt><br>placed after QGIS's own packages: QGIS's numpy, GDAL and "
                "Qt are never replaced. Needs a connection to the Python Package Index.")
        if self.plan.python is not None:
            text += f"<br>Python: <tt>{self.plan.python}</tt>"
        if self.plan.python is None:
            text += ("<br><b>QGIS's Python interpreter was not found</b>, so pip cannot run from here. Install "
                     "by hand as the README says.")
        elif not self.plan.requirements:
            text += "<br>Everything is installed already."
        self.label = QLabel(text)
        self.label.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setObjectName("pipLog")
        self.log.setPlaceholderText("pip's output appears here.")
        if self.plan.requirements:
            self.log.appendPlainText("Will run: " + " ".join(self.plan.command))
        self.buttons = QDialogButtonBox()
        self.install_button = QPushButton("Install")
        self.install_button.setObjectName("installButton")
        self.buttons.addButton(self.install_button, QDialogButtonBox.ButtonRole.AcceptRole)
        self.close_button = self.buttons.addButton(QDialogButtonBox.StandardButton.Close)
        self.install_button.clicked.connect(self.start)
        self.close_button.clicked.connect(self.reject)
        self.install_button.setEnabled(self.plan.python is not None and bool(self.plan.requirements))
        layout = QVBoxLayout(self)
        for widget in (self.label, self.progress, self.log, self.buttons):
            layout.addWidget(widget)

    # -- running pip -----------------------------------------------------------------------
    def start(self) -> None:
        """Run pip (returns at once; :attr:`installed` says when it is done)."""
        if self.process is not None or self.plan.python is None or not self.plan.requirements:
            return
        self.target.mkdir(parents=True, exist_ok=True)
        command = self.plan.command
        self.log.appendPlainText("$ " + " ".join(command))
        self.progress.setRange(0, 0)  # busy: pip gives no reliable overall progress
        self.install_button.setEnabled(False)
        self.process = QProcess(self)
        env = QProcessEnvironment.systemEnvironment()
        for name in ("PYTHONPATH", "PYTHONHOME", "PIP_USER", "PIP_REQUIRE_VIRTUALENV"):
            env.remove(name)  # QGIS sets PYTHONPATH for itself; pip must see a plain interpreter
        env.insert("PYTHONUNBUFFERED", "1")
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.readyReadStandardOutput.connect(self._read_output)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._failed_to_start)
        self.process.start(command[0], command[1:])

    def _read_output(self) -> None:
        data = bytes(self.process.readAllStandardOutput()).decode("utf-8", "replace")
        for line in data.splitlines():
            if line.strip():
                self.log.appendPlainText(line.rstrip())

    def _failed_to_start(self, error) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.log.appendPlainText(f"Could not start {self.plan.python}.")
            self._done(False)

    def _finished(self, code: int, _status=None) -> None:
        self._read_output()
        ok = code == 0
        if ok:
            modules = [dependencies.PACKAGES[n].module for n in self.names]
            error = dependencies.check_import(self.plan.python, self.target, modules) if modules else None
            if error:  # e.g. a wheel built for another platform: a missing shared library
                self.log.appendPlainText(f"pip finished but {', '.join(self.names)} does not import: {error}")
                ok = False
            else:
                dependencies.activate(self.target)
                missing = dependencies.missing_packages(self.names)
                ok = not missing
                if missing:
                    self.log.appendPlainText(f"pip finished but {', '.join(missing)} still cannot be imported.")
        else:
            self.log.appendPlainText(f"pip failed (exit code {code}). See its messages above; the README lists "
                                     "how to install by hand.")
        self._done(ok)

    def _done(self, ok: bool) -> None:
        if self.succeeded is not None:
            return
        self.succeeded = ok
        bar = self.log.verticalScrollBar()
        bar.setValue(bar.maximum())  # the outcome, not the middle of pip's log
        self.progress.setRange(0, 1)
        self.progress.setValue(1 if ok else 0)
        if ok:
            self.log.appendPlainText(f"Installed {', '.join(self.names)}: ready to use, no restart needed.")
            QgsMessageLog.logMessage(f"Installed {', '.join(self.names)} into {self.target}", LOG_TAG,
                                     Qgis.MessageLevel.Info)
        else:
            self.install_button.setEnabled(True)
            self.process = None
        self.installed.emit(ok)


def offer_install(iface, names, message: str, on_installed=None):
    """A message-bar warning with an *Install…* button that opens the installer for ``names``.

    Returns the message-bar item (``None`` without a message bar).
    """
    bar = iface.messageBar() if iface is not None else None
    if bar is None:
        return None
    item = bar.createMessage(LOG_TAG, message)
    button = QPushButton("Install…")
    button.setObjectName("siameseAnalogInstallDeps")
    button.setToolTip(f"Install {', '.join(names)} with pip into the plugin's own folder")

    def open_dialog() -> None:
        dialog = DependencyInstallerDialog(names, parent=iface.mainWindow())
        if on_installed is not None:
            dialog.installed.connect(on_installed)
        dialog.installed.connect(lambda ok: ok and bar.popWidget(item))
        dialog.show()
        item._installer_dialog = dialog  # kept alive with the message (tests and the desktop check find it)

    button.clicked.connect(open_dialog)
    item.layout().addWidget(button)
    bar.pushWidget(item, Qgis.MessageLevel.Warning, 0)
    item._install_button = button
    return item
