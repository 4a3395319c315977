"""The dependency installer dialog in a real QGIS: pip really runs (a wheel built in the test),
its log shows live, and the package imports afterwards without a restart."""

from __future__ import annotations

import importlib
import sys

import pytest

from ..test_dependencies import make_wheel


def wait_for(condition, timeout_s: float = 300.0) -> None:
    """Spin the Qt event loop (the QProcess signals arrive there) until ``condition()``."""
    import time

    from qgis.PyQt.QtCore import QCoreApplication

    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "timed out"
        QCoreApplication.processEvents()
        time.sleep(0.02)


@pytest.fixture
def restore_path(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("tinyanalogpkg", None)


def test_dialog_runs_pip_and_loads_the_package(qgis_app, tmp_path, restore_path):
    from siamese_analog_plugin import dependencies
    from siamese_analog_plugin.gui.installer import DependencyInstallerDialog

    target = tmp_path / "deps"
    dialog = DependencyInstallerDialog(["onnxruntime"], target=target)
    assert dialog.plan.python is not None
    # Install the test's own wheel instead of onnxruntime (no network, seconds).
    dialog.plan.requirements = [str(make_wheel(tmp_path))]
    assert "numpy" not in " ".join(dialog.plan.command)
    dialog.names = []  # nothing of PACKAGES to check after pip
    results = []
    dialog.installed.connect(results.append)
    dialog.show()
    dialog.start()
    assert not dialog.install_button.isEnabled()
    wait_for(lambda: results)
    log = dialog.log.toPlainText()
    assert results == [True], log
    assert "--target" in log and "Successfully installed tinyanalogpkg" in log
    assert sys.path[-1] == str(target)
    assert importlib.import_module("tinyanalogpkg").VALUE == "installed 0.1"
    assert dependencies.module_available("tinyanalogpkg")
    dialog.close()


def test_a_failing_pip_says_so_and_allows_a_retry(qgis_app, tmp_path, restore_path):
    from siamese_analog_plugin.gui.installer import DependencyInstallerDialog

    dialog = DependencyInstallerDialog(["onnxruntime"], target=tmp_path / "deps")
    dialog.plan.requirements = [str(tmp_path / "no_such_package-1.0-py3-none-any.whl")]
    results = []
    dialog.installed.connect(results.append)
    dialog.start()
    wait_for(lambda: results)
    assert results == [False]
    assert "pip failed" in dialog.log.toPlainText()
    assert dialog.install_button.isEnabled()
    dialog.close()


def test_message_bar_offers_the_installer(qgis_iface, tmp_path):
    from qgis.PyQt.QtWidgets import QApplication

    from siamese_analog_plugin.gui.installer import DependencyInstallerDialog, offer_install

    item = offer_install(qgis_iface, ["onnxruntime"], "needs onnxruntime")
    try:
        assert item is not None and qgis_iface.messageBar().currentItem() is item
        assert "onnxruntime" in item.text()
        item._install_button.click()
        QApplication.processEvents()
        dialog = item._installer_dialog
        assert isinstance(dialog, DependencyInstallerDialog) and dialog.isVisible()
        assert dialog.names == ["onnxruntime"]
        dialog.close()
    finally:
        qgis_iface.messageBar().popWidget(item)
