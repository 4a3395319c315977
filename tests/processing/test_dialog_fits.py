"""Every algorithm's dialog shows all of its parameters at its default size: no label or widget is
wider than the parameters panel (a long one pushed the reference's "..." button out of sight)."""

from __future__ import annotations

import pytest

from ..conftest import PROVIDER_ID


@pytest.mark.parametrize("alg_name", ["findanalogs", "embedarea", "compareregions", "fewshotlandforms",
                                      "embedimages", "trainencoder"])
def test_the_dialog_fits_its_default_width(analog_provider, qgis_app, qgis_iface, monkeypatch, alg_name):
    from processing.gui.AlgorithmDialog import AlgorithmDialog
    from qgis.core import QgsApplication
    from qgis.gui import QgsBrowserGuiModel
    from qgis.PyQt.QtWidgets import QLabel, QScrollArea

    browser = QgsBrowserGuiModel()  # the dialog's panel asks QGIS for one; the pytest-qgis iface has none
    monkeypatch.setattr(qgis_iface, "browserModel", lambda: browser, raising=False)

    alg = QgsApplication.processingRegistry().createAlgorithmById(f"{PROVIDER_ID}:{alg_name}")
    dialog = AlgorithmDialog(alg, False, None)
    try:
        dialog.show()
        qgis_app.processEvents()
        area = dialog.mainWidget().findChild(QScrollArea)
        width = area.viewport().width()
        assert area.widget().minimumSizeHint().width() <= width
        # Advanced parameters too: they are hidden until their group is opened, then they would widen it.
        wide = [(label.text(), label.minimumSizeHint().width()) for label in area.widget().findChildren(QLabel)
                if label.minimumSizeHint().width() > width]
        assert not wide
    finally:
        dialog.close()
        dialog.deleteLater()
